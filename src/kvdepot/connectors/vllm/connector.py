"""`KVDepotConnector`: the class vLLM loads; one instance per process and role.

vLLM creates it twice: in the scheduler process (EngineCore) with role SCHEDULER and in the
worker process with role WORKER. Each instance builds the same `ConnectorSettings` and
delegates vLLM's calls to its half: `SchedulerSide` or `WorkerSide`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvdepot.connectors.vllm.metadata import KVDepotMetadata
from kvdepot.connectors.vllm.scheduler import SchedulerSide
from kvdepot.connectors.vllm.settings import ConnectorSettings
from kvdepot.connectors.vllm.stats import COUNTS, empty, is_empty, merge, summary
from kvdepot.connectors.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class KVDepotConnector(KVConnectorBase_V1, SupportsHMA):  # type: ignore[misc]  # no vLLM stubs
    """kvdepot as a vLLM V1 KV connector; one instance per process and role."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        settings = ConnectorSettings.from_vllm(vllm_config, kv_cache_config)
        self.config = settings.config
        self.layout = settings.layout
        self.block_size = settings.block_size
        self.is_token_exact = settings.is_token_exact
        self.socket_path = settings.socket_path
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                # With "fail", a chunk evicted (or a daemon lost) between lookup and load
                # would fail the request; for a cache that is a miss, so vLLM recomputes.
                logger.warning("kvdepot: setting kv_load_failure_policy='recompute' (fail open)")
                transfer.kv_load_failure_policy = "recompute"
            self._scheduler = SchedulerSide(
                settings,
                is_loading=bool(transfer.is_kv_consumer),
                is_saving=bool(transfer.is_kv_producer),
            )
        else:
            self._worker = WorkerSide(settings)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss, never a lost result

    @property
    def scheduler_side(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("a scheduler-side call on the worker's connector")
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("a worker-side call on the scheduler's connector")
        return self._worker

    # ---- scheduler side ------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVDepotMetadata:
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's hybrid allocator (`SupportsHMA`): the block tables of every group."""
        return self.scheduler_side.request_finished(request, tuple(block_ids))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # The workers' stats: ours, or (vLLM 0.30, 0.31: rebuilt after IPC) vLLM's base class
        # holding our payload in `data`.
        data = getattr(getattr(connector_output, "kv_connector_stats", None), "data", None)
        self.scheduler_side.update_connector_output(
            set(connector_output.finished_sending or ()), data if isinstance(data, dict) else None
        )

    def reset_cache(self) -> bool | None:
        return self.scheduler_side.reset_cache()

    # ---- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            self._worker.step_started()  # the forward pass follows: timed for the ROI

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: object) -> None:
        self.worker_side.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: object,
    ) -> None:
        return  # all layers are saved together in wait_for_save

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self.worker_side.wait_for_save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose final save is done, asynchronous loads done); vLLM releases
        versions that predate `get_transfer_results` call this."""
        saved, received, failed = self._transfer_results()
        if failed:
            logger.warning("kvdepot: %d asynchronous loads failed: recomputed", len(failed))
        return saved or None, received or None

    def _transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        if self.has_connector_metadata():  # a step without wait_for_save (vLLM 0.30)
            self.worker_side.save_finished(self._get_connector_metadata())
        return self.worker_side.get_finished()

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """Saves done, asynchronous loads done and those that failed (vLLM recomputes a
        request whose load failed from its first token)."""
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        saved, received, failed = self._transfer_results()
        return KVConnectorTransferResults(
            finished_sending=saved, finished_recving=received, failed_recving=failed
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.get_block_ids_with_load_errors()

    # ---- vLLM's metrics -------------------------------------------------------------------

    def get_kv_connector_stats(self) -> Any:
        """What this side counted since the last step (vLLM sums the ranks' and the
        scheduler's and feeds `build_prom_metrics`'s metrics in its logging process)."""
        side = self._scheduler if self._scheduler is not None else self._worker
        data = side.stats.take() if side is not None else None
        return None if data is None else KVDepotStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        return KVDepotStats(data=merge(empty(), data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        return KVDepotPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        for side in (self._scheduler, self._worker):
            if side is not None:
                side.shutdown()


class KVDepotStats(KVConnectorStats):  # type: ignore[misc]  # no vLLM stubs
    """The connector's counts in vLLM's stats container (`kvdepot.connectors.vllm.stats`)."""

    def reset(self) -> None:
        self.data = empty()

    def aggregate(self, other: KVConnectorStats) -> KVDepotStats:
        merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return summary(self.data)

    def is_empty(self) -> bool:
        return is_empty(self.data)


class KVDepotPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]  # no vLLM stubs
    """kvdepot's series on `vllm serve`'s /metrics, per engine like vLLM's own:
    `vllm:kvdepot_<count>_total` for each of `COUNTS`, `..._uncached_requests_total`
    by reason, `..._tier_loaded_tokens_total` by tier, `..._blend_requests_total` by outcome
    and reason, the `vllm:kvdepot_load_seconds` /
    `..._save_seconds` histograms and `vllm:kvdepot_request_hit_ratio` (per request)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._per_engine(
                self._counter_cls(
                    name=f"vllm:kvdepot_{name}",
                    documentation=f"kvdepot: {doc}",
                    labelnames=labelnames,
                )
            )
            for name, doc in COUNTS.items()
        }
        self._uncached = self._counter_cls(
            name="vllm:kvdepot_uncached_requests",
            documentation="kvdepot: requests vLLM alone served (their KV cannot be keyed exactly)",
            labelnames=[*labelnames, "reason"],
        )
        self._blend = self._counter_cls(
            name="vllm:kvdepot_blend_requests",
            documentation="kvdepot: segmented (CacheBlend) requests: planned, blended, or "
            "fallback (served as a normal prefill) with its reason",
            labelnames=[*labelnames, "outcome", "reason"],
        )
        self._tiers = self._counter_cls(
            name="vllm:kvdepot_tier_loaded_tokens",
            documentation="kvdepot: tokens loaded, by the tier they came from",
            labelnames=[*labelnames, "tier"],
        )
        self._hit_ratio = self._per_engine(
            self._histogram_cls(
                name="vllm:kvdepot_request_hit_ratio",
                documentation="kvdepot: per request, prompt tokens loaded from kvdepot / "
                "prompt tokens",
                buckets=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                labelnames=labelnames,
            )
        )
        buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
        self._times = {
            field: self._per_engine(
                self._histogram_cls(
                    name=f"vllm:kvdepot_{field.removesuffix('_s')}_seconds",
                    documentation=f"kvdepot: seconds per {field.removesuffix('_s')}, "
                    "per request and step (each TP rank's)",
                    buckets=buckets,
                    labelnames=labelnames,
                )
            )
            for field in ("load_s", "save_s")
        }

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        return {i: metric.labels(*values) for i, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for name, n in (data.get("counts") or {}).items():
            if name in self._counters and n:
                self._counters[name][engine_idx].inc(n)
        labels = self.per_engine_labelvalues.get(engine_idx, [])
        for reason, n in (data.get("uncached") or {}).items():
            self._uncached.labels(*labels, reason).inc(n)
        for tier, n in (data.get("tiers") or {}).items():
            self._tiers.labels(*labels, tier).inc(n)
        for outcome, n in (data.get("blend") or {}).items():
            kind, _, reason = outcome.partition(":")
            self._blend.labels(*labels, kind, reason).inc(n)
        for ratio in data.get("hit_ratio") or []:
            self._hit_ratio[engine_idx].observe(ratio)
        for field, histograms in self._times.items():
            for seconds in data.get(field) or []:
                histograms[engine_idx].observe(seconds)
