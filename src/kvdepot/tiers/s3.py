"""The S3 tier: one sealed chunk per object in any S3-compatible store, shared by hosts.

Runs in the process that owns the `TieredStore` (engine or daemon); many such processes may
share a bucket. Object key: `<prefix>/<namespace hex>/<chunk hash hex>`; the namespace digest
carries model fingerprint, layout, shard rank and tenant salt, so namespaces never share an
object. Batches run concurrently on a bounded thread pool (`max_workers` requests in flight).

Invariants:
- `get` serves only blobs whose checksum verifies (`open_blob(verify=True)`); a corrupt object
  is deleted, counted and answered as a miss. Because every blob carries its own checksum,
  botocore's per-request CRC is off ("when_required"): it would cost a pass over each chunk.
- Every request has connect and read timeouts and a bounded number of attempts, and goes
  through one circuit breaker for the store; a failure is a miss or a dropped put, counted and
  logged (rate-limited), never an exception out of `contains` / `get` / `put` / `delete` /
  `clear`. Every future is kept and its result (or exception) collected.
- A put of an object that exists (HEAD answers 200) uploads nothing and counts as stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal, TypeVar, cast

from kvdepot.codec.format import EncodedChunk, open_blob
from kvdepot.errors import ConfigError, CorruptChunk
from kvdepot.keys import ChunkKey
from kvdepot.logutil import RateLimitedLog
from kvdepot.metrics import Metrics, TierMetrics
from kvdepot.remote_config import S3Config
from kvdepot.tiers.base import TierUsage
from kvdepot.tiers.breaker import CircuitBreaker

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        ReadTimeoutError,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the S3 tier needs boto3: pip install 'kvdepot[s3]'") from exc

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

logger = logging.getLogger(__name__)

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
_AddressingStyle = Literal["auto", "virtual", "path"]
T = TypeVar("T")
U = TypeVar("U")


class S3Tier:
    """Chunks as objects in one bucket, behind a circuit breaker."""

    name = "s3"

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "kvdepot",
        *,
        max_workers: int = 8,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
        metrics: TierMetrics | None = None,
    ) -> None:
        """Wire a tier over a boto3 S3 client (see `open_s3_tier`); nothing is sent yet."""
        self.bucket = bucket
        self._client = client
        self._prefix = prefix.rstrip("/")
        self._metrics = metrics if metrics is not None else Metrics().tier(self.name)
        self._log = RateLimitedLog(logger)
        self._breaker = CircuitBreaker(
            f"s3 bucket {bucket}", self._metrics,
            failure_threshold=breaker_failures, cooldown_s=breaker_cooldown_s,
        )  # fmt: skip
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="kvdepot-s3")
        self._lock = threading.Lock()
        self._num_objects = 0
        self._num_bytes = 0
        self._is_closed = False

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        outcomes = self._map(self._head, keys, "error")
        self._count("contains", outcomes)
        return [outcome == "ok" for outcome in outcomes]

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        start = time.perf_counter()
        missed: tuple[str, bytes | None] = ("error", None)
        results = self._map(self._get_one, keys, missed)
        self._count("get", [outcome for outcome, _ in results])
        blobs = [blob for _, blob in results]
        self._metrics.bytes("read", sum(len(blob) for blob in blobs if blob is not None))
        self._metrics.latency("get", time.perf_counter() - start)
        return blobs

    def put(self, items: Sequence[tuple[ChunkKey, EncodedChunk]]) -> int:
        start = time.perf_counter()
        outcomes = self._map(self._put_one, list(dict(items).items()), "error")
        num_stored = sum(outcome in ("ok", "present") for outcome in outcomes)
        self._count("put", ["ok" if o == "present" else o for o in outcomes])
        self._metrics.latency("put", time.perf_counter() - start)
        return num_stored

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        names = list(dict.fromkeys(self._name(key) for key in keys))
        for start in range(0, len(names), _DELETE_BATCH):
            self._delete_names(names[start : start + _DELETE_BATCH])

    def clear(self) -> None:
        """Remove every object under this tier's prefix (all namespaces and tenants)."""

        def list_and_delete() -> None:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self._prefix}/"
            )
            for page in pages:
                names = [item["Key"] for item in page.get("Contents", []) if "Key" in item]
                if names:
                    self._delete_names(names)

        outcome, _ = self._call("clear", list_and_delete)
        self._metrics.op("clear", outcome)
        with self._lock:
            self._num_objects = self._num_bytes = 0

    def usage(self) -> TierUsage:
        """Approximate: objects this instance uploaded (minus corrupt ones it deleted) since
        it was opened; other writers, `delete` and bucket lifecycle rules are not seen, and
        capacity is reported as 0 (unbounded)."""
        with self._lock:
            return TierUsage(self._num_bytes, 0, self._num_objects)

    def close(self) -> None:
        """Wait for requests in flight, then release connections; later calls answer misses."""
        with self._lock:
            self._is_closed = True
        self._pool.shutdown(wait=True)
        self._client.close()

    def _name(self, key: ChunkKey) -> str:
        return f"{self._prefix}/{key.namespace.hex()}/{key.chunk_hash.hex()}"

    def _head(self, key: ChunkKey) -> str:
        outcome, _ = self._call(
            "head", lambda: self._client.head_object(Bucket=self.bucket, Key=self._name(key))
        )
        return outcome

    def _get_one(self, key: ChunkKey) -> tuple[str, bytes | None]:
        name = self._name(key)
        outcome, blob = self._call(
            "get", lambda: self._client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        )
        if blob is None:
            return outcome, None
        try:
            open_blob(blob, key=key, verify=True)
        except CorruptChunk as exc:
            self._metrics.corrupt([key])
            self._log.warning("corrupt", "s3 tier: deleting corrupt object %s: %s", name, exc)
            self._delete_names([name])
            self._account(-len(blob), -1)
            return "miss", None
        return "hit", blob

    def _put_one(self, item: tuple[ChunkKey, EncodedChunk]) -> str:
        key, chunk = item
        name = self._name(key)
        outcome = self._head(key)
        if outcome == "ok":
            return "present"
        if outcome != "miss":
            return outcome
        sealed = chunk.bound(key).sealed()
        body = b"".join((sealed.header.pack(), sealed.contiguous_payload()))
        outcome, _ = self._call(
            "put", lambda: self._client.put_object(Bucket=self.bucket, Key=name, Body=body)
        )
        if outcome == "ok":
            self._metrics.bytes("write", len(body))
            self._account(len(body), 1)
        return outcome

    def _delete_names(self, names: list[str]) -> None:
        objects = [{"Key": name} for name in names]
        outcome, reply = self._call(
            "delete",
            lambda: self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": objects, "Quiet": True},  # type: ignore[typeddict-item]
            ),
        )
        errors = reply.get("Errors", []) if reply is not None else []
        if errors:
            self._log.warning("delete", "s3 tier: %d deletes failed: %s", len(errors), errors[0])
        self._metrics.op("delete", outcome if not errors else "error", len(names))

    def _call(self, what: str, request: Callable[[], T]) -> tuple[str, T | None]:
        """(outcome, result) of `request` through the breaker; outcome is "ok", "miss"
        (404), "breaker_open" or "error" (counted by the breaker and logged)."""
        with self._lock:
            if self._is_closed:
                return "error", None
        if not self._breaker.allow():
            return "breaker_open", None
        try:
            result = request()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                self._breaker.record_success()
                return "miss", None
            return self._failed(what, exc), None
        except (BotoCoreError, OSError) as exc:
            return self._failed(what, exc), None
        self._breaker.record_success()
        return "ok", result

    def _failed(self, what: str, exc: Exception) -> str:
        is_timeout = isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError)
        self._breaker.record_failure(exc, is_timeout=is_timeout)
        self._log.warning(f"s3-{what}", "s3 tier: %s failed: %s", what, exc)
        return "error"

    def _map(self, fn: Callable[[U], T], items: Sequence[U], failed: T) -> list[T]:
        """`fn` over `items` on the pool, in order; an exception becomes `failed` (logged)."""
        with self._lock:
            if self._is_closed:
                return [failed] * len(items)
        if len(items) <= 1:
            return [self._settle(fn, item, failed) for item in items]
        futures = []
        for item in items:
            try:
                futures.append(self._pool.submit(self._settle, fn, item, failed))
            except RuntimeError:  # closed meanwhile
                break
        results = [future.result() for future in futures]
        return results + [failed] * (len(items) - len(results))

    def _settle(self, fn: Callable[[U], T], item: U, failed: T) -> T:
        try:
            return fn(item)
        except Exception as exc:  # a bug must not take the engine down: log it, miss
            self._log.error("s3-bug", "s3 tier: unexpected error: %r", exc)
            return failed

    def _count(self, op: str, outcomes: Sequence[object]) -> None:
        tally: dict[str, int] = {}
        for outcome in outcomes:
            tally[str(outcome)] = tally.get(str(outcome), 0) + 1
        for outcome, count in tally.items():
            self._metrics.op(op, outcome, count)

    def _account(self, nbytes: int, num_objects: int) -> None:
        with self._lock:
            self._num_bytes = max(0, self._num_bytes + nbytes)
            self._num_objects = max(0, self._num_objects + num_objects)


def open_s3_tier(config: S3Config, metrics: TierMetrics | None = None) -> S3Tier:
    """An S3 tier for `config` (which must name a bucket). Builds the client only: the first
    request goes out on first use, so a store that is down at start only costs misses.

    Raises:
        ConfigError: `config` is invalid or names no bucket.
    """
    config.validate()
    if config.bucket is None:
        raise ConfigError("s3.bucket is not set: name the bucket that holds the chunks")
    return S3Tier(
        make_s3_client(config), config.bucket, config.prefix,
        max_workers=config.max_workers, breaker_failures=config.breaker_failures,
        breaker_cooldown_s=config.breaker_cooldown_ms / 1000, metrics=metrics,
    )  # fmt: skip


def make_s3_client(config: S3Config) -> S3Client:
    """The boto3 client the tier uses: timeouts, bounded attempts, a connection per worker.

    Credentials: `access_key_id`/`secret_access_key` when set, else boto3's standard chain
    (environment, shared files, instance or container role).
    """
    session = boto3.session.Session(
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        region_name=config.region,
    )
    client_config = Config(
        connect_timeout=config.connect_timeout_ms / 1000,
        read_timeout=config.timeout_ms / 1000,
        retries={"total_max_attempts": config.max_attempts, "mode": "standard"},
        max_pool_connections=config.max_workers,
        s3={"addressing_style": cast(_AddressingStyle, config.addressing_style)},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client(
        "s3",
        endpoint_url=config.endpoint_url,
        config=client_config,
        verify=config.tls_ca_file if config.tls_ca_file else config.tls_verify,
    )
