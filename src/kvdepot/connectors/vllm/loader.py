"""Layer-by-layer scatter of staged KV into vLLM's pages, while the forward pass runs.

Runs in vLLM's worker process, on CPU. `WorkerSide.start_load_kv` reads the chunks into its
staging buffer before the forward pass (a read can fail, and a failure is reported before the
KV is used) and hands the whole pages to a `LayerLoader`. Its thread scatters them layer by
layer, while the model computes the first layers. vLLM's attention calls
`wait_for_layer_load(layer)` before it reads a layer's pages; that call blocks until the
layer is in. The copies release the GIL, and a small forward pass leaves a core idle, so
most of the scatter is hidden (docs/benchmarks.md).

Invariants:
- Only whole pages below a request's load end go through the thread. The forward pass writes
  the new tokens' KV into the page holding the load end (and later ones), so the caller
  scatters that partial page itself, before the forward pass.
- `finish` (end of the step) joins the thread. A layer whose scatter failed, or any job when
  some layer was never waited for (a vLLM that reads pages without `wait_for_layer_load`),
  makes its blocks failed loads: vLLM recomputes them rather than use KV that may have
  arrived late.
- A failed scatter sets every layer's event, so the forward pass never hangs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvdepot.connectors.vllm.pages import KVParts, PagedLayout, first_of_run, scatter_layer
from kvdepot.logutil import RateLimitedLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScatterJob:
    """Whole pages of one request to fill.

    Attributes:
        kv: `[L, 2, P*N, H, D]`, token order (a view of the staging buffer).
        page_ids: the P kernel pages, in token order.
        block_ids: the vLLM blocks they belong to (reported if the scatter fails).
    """

    kv: torch.Tensor
    page_ids: torch.Tensor
    block_ids: list[int]


class LayerLoader:
    """One step's scatter jobs, layer by layer on a thread of its own."""

    def __init__(self, layers: Sequence[KVParts], paged: PagedLayout) -> None:
        self._layers = layers
        self._paged = paged
        self._log = RateLimitedLog(logger)
        self._ready = [threading.Event() for _ in layers]
        self._failed_layer = len(layers)  # the first layer not (or not surely) loaded
        self._waited: set[int] = set()
        self._jobs: list[ScatterJob] = []
        self._thread: threading.Thread | None = None

    def start(self, jobs: list[ScatterJob]) -> None:
        """Begin scattering `jobs` (the staged KV must stay untouched until `finish`)."""
        self._jobs = jobs
        self._thread = threading.Thread(target=self._run, name="kvdepot-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        runs = [first_of_run(job.page_ids) for job in self._jobs]
        layer = 0
        try:
            for layer, parts in enumerate(self._layers):
                for job, first in zip(self._jobs, runs, strict=True):
                    scatter_layer(job.kv[layer], parts, self._paged, job.page_ids, first)
                self._ready[layer].set()
        except Exception as exc:  # reported as failed loads in finish
            self._log.warning("scatter", "kvdepot: scatter failed, recomputing: %s", exc)
            self._failed_layer = layer
            for event in self._ready:
                event.set()

    def wait(self, layer: int) -> None:
        """Block until layer `layer`'s pages are in (or their scatter failed)."""
        self._waited.add(layer)
        self._ready[layer].wait()

    def finish(self) -> set[int]:
        """Join the thread; the blocks to report as failed loads (see the module docstring)."""
        if self._thread is None:
            return set()
        self._thread.join()
        self._thread = None
        bad = self._failed_layer < len(self._layers)
        if not bad and len(self._waited) < len(self._layers):
            self._log.warning(
                "unwaited",
                "kvdepot: vLLM read %d of %d layers without waiting for their load; recomputing",
                len(self._layers) - len(self._waited),
                len(self._layers),
            )
            bad = True
        return {block for job in self._jobs for block in job.block_ids} if bad else set()
