"""`kvdepot bench remote`: Valkey and S3 tier throughput vs the raw client on the same bytes.

Runs in the benchmark process, against throw-away servers it starts on 127.0.0.1 (the
`[servers]` extra) and stops afterwards. Every figure is a ratio to a limit measured in the
same run on values of the same sizes, the two alternating (`paired_seconds`):
- Valkey put / get of a batch of 256-token chunks (unsealed, as the store hands them over:
  the tier seals, checks presence, and verifies on read) vs one pipeline of raw SET / GET of
  the sealed blobs through the same connection and the same wire code (values sent from
  where they lie, replies read straight into place), so the ratio is what the tier adds;
- the same against valkey-py with its default settings (libvalkey command packer and reply
  parser), which copies each value on the way out and twice on the way in: what a user of
  the plain client would see;
- get of the same chunks stored as 4 parts each (`part_size_bytes` below the chunk size):
  a manifest round trip, then the parts read into one blob, vs the same raw GET;
- S3 put / get (HEAD before PUT, seal, verify) vs raw boto3 `put_object` / `get_object` of
  the same blobs on the same client and thread-pool size.
Server and client share this machine's cores, so both sides pay for the server's CPU alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvdepot.bench.servers import HOST, LocalServer, seaweed_s3, valkey_server, weed_path
from kvdepot.bench.tiers import CHUNK_TOKENS, LAYOUTS, Result, results_table
from kvdepot.bench.timing import gbps, paired_seconds
from kvdepot.codec import EncodedChunk, RawCodec, encode_chunk
from kvdepot.keys import CacheNamespace, ChunkKey, chunk_keys
from kvdepot.layout import KVLayout
from kvdepot.remote_config import S3Config, ValkeyConfig

_S3_KEYS = ("kvdepot-bench", "kvdepot-bench-secret", "kvdepot-bench")  # access, secret, bucket


@dataclass(slots=True)
class RemoteRun:
    """Results of one `run`, with the versions they were measured with."""

    results: list[Result] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def _chunks(layout: KVLayout, total_bytes: int) -> tuple[list[ChunkKey], list[EncodedChunk]]:
    chunk_nbytes = layout.bytes_per_token * CHUNK_TOKENS
    num_chunks = max(2, total_bytes // chunk_nbytes)
    shape = layout.chunk_shape(CHUNK_TOKENS)
    rng = np.random.default_rng(0)
    ns = CacheNamespace("bench-model", layout.layout_id)
    keys = chunk_keys(list(range(num_chunks * CHUNK_TOKENS)), CHUNK_TOKENS, ns)
    chunks = [
        encode_chunk(rng.integers(0, 2**16, size=shape, dtype=np.uint16), layout.dtype, RawCodec())
        for _ in keys
    ]
    return keys, chunks


def _blob(chunk: EncodedChunk) -> bytes:
    sealed = chunk.sealed()
    return sealed.header.pack() + bytes(sealed.contiguous_payload())


@dataclass(slots=True)
class _Pairs:
    """Paired measurements of one layout and batch, collected as `Result` rows."""

    layout: str
    nbytes: int
    repeats: int
    rows: list[Result] = field(default_factory=list)

    def add(
        self, metric: str, limit: Callable[[], object], ours: Callable[[], object],
        setup: Callable[[], object] | None = None,
    ) -> None:  # fmt: skip
        for run in (limit, ours):  # untimed: connections, server buffers, first allocations
            if setup is not None:
                setup()
            run()
        limit_s, ours_s, ratio = paired_seconds(
            limit, ours, self.repeats, limit_setup=setup, ours_setup=setup
        )
        ours_gbps, limit_gbps = gbps(self.nbytes, ours_s), gbps(self.nbytes, limit_s)
        self.rows.append(
            Result(self.layout, metric, ours_gbps, limit_gbps, "GB/s", ratio, ">= 0.8")
        )


def bench_valkey(
    name: str, layout: KVLayout, total_bytes: int, repeats: int, port: int
) -> list[Result]:
    import valkey

    from kvdepot.tiers.valkey import open_valkey_tier
    from kvdepot.tiers.valkey_wire import NodeClient, open_client

    keys, chunks = _chunks(layout, total_bytes)
    items = list(zip(keys, chunks, strict=True))
    blobs = [_blob(chunk) for chunk in chunks]
    nbytes = sum(len(blob) for blob in blobs)
    config = ValkeyConfig(address=f"{HOST}:{port}", key_prefix="bench", timeout_ms=60_000)
    tier = open_valkey_tier(config)
    raw = open_client(config, HOST, port)
    plain = NodeClient(valkey.Valkey(host=HOST, port=port, socket_timeout=60))
    names = [f"raw:{i}" for i in range(len(blobs))]

    def flush() -> None:
        raw.command("FLUSHALL")

    def raw_set() -> None:
        raw.pipeline([("SET", n, b) for n, b in zip(names, blobs, strict=True)])

    def plain_set() -> None:
        plain.pipeline([("SET", n, b) for n, b in zip(names, blobs, strict=True)])

    def ours_put() -> None:
        assert tier.put(items) == len(items), "valkey tier dropped puts"

    def raw_get() -> None:
        assert all(isinstance(v, bytes) for v in raw.get(names))

    def plain_get() -> None:
        assert all(isinstance(v, bytes) for v in plain.pipeline([("GET", n) for n in names]))

    def ours_get() -> None:
        assert all(blob is not None for blob in tier.get(keys)), "valkey tier missed"

    # The same chunks stored as 4 parts each, as a server with a lower value limit needs.
    part_nbytes = -(-nbytes // len(blobs) // 4)
    split = open_valkey_tier(
        dataclasses.replace(config, key_prefix="split", part_size_bytes=part_nbytes)
    )

    def split_get() -> None:
        assert all(blob is not None for blob in split.get(keys)), "valkey tier missed"

    pairs = _Pairs(name, nbytes, repeats)
    try:
        pairs.add("valkey put vs raw SET", raw_set, ours_put, flush)
        pairs.add("valkey put vs valkey-py defaults", plain_set, ours_put, flush)
        raw_set()
        ours_put()
        split.put(items)
        pairs.add("valkey get vs raw GET", raw_get, ours_get)
        pairs.add("valkey get vs valkey-py defaults", plain_get, ours_get)
        pairs.add("valkey get, 4 parts vs raw GET", raw_get, split_get)
    finally:
        flush()
        for closable in (tier, split, raw, plain):
            closable.close()
    return pairs.rows


def bench_s3(
    name: str, layout: KVLayout, total_bytes: int, repeats: int, port: int
) -> list[Result]:
    from kvdepot.tiers.s3 import make_s3_client, open_s3_tier

    keys, chunks = _chunks(layout, total_bytes)
    items = list(zip(keys, chunks, strict=True))
    blobs = [_blob(chunk) for chunk in chunks]
    nbytes = sum(len(blob) for blob in blobs)
    access_key, secret_key, bucket = _S3_KEYS
    config = S3Config(
        bucket=bucket, endpoint_url=f"http://{HOST}:{port}", region="us-east-1",
        access_key_id=access_key, secret_access_key=secret_key, addressing_style="path",
        prefix="bench", timeout_ms=60_000,
    )  # fmt: skip
    tier = open_s3_tier(config)
    client = make_s3_client(config)
    pool = ThreadPoolExecutor(config.max_workers)
    names = [f"raw/{i}" for i in range(len(blobs))]

    def raw_put() -> None:
        def put(i: int) -> object:
            return client.put_object(Bucket=bucket, Key=names[i], Body=blobs[i])

        list(pool.map(put, range(len(blobs))))

    def raw_get() -> None:
        def get(n: str) -> bytes:
            return client.get_object(Bucket=bucket, Key=n)["Body"].read()

        assert all(len(b) > 0 for b in pool.map(get, names))

    def clear() -> None:
        tier.clear()
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": n} for n in names]})

    def ours_put() -> None:
        assert tier.put(items) == len(items), "s3 tier dropped puts"

    def ours_get() -> None:
        assert all(blob is not None for blob in tier.get(keys)), "s3 tier missed"

    pairs = _Pairs(name, nbytes, repeats)
    try:
        pairs.add("s3 put vs raw put_object", raw_put, ours_put, clear)
        raw_put()
        ours_put()
        pairs.add("s3 get vs raw get_object", raw_get, ours_get)
    finally:
        clear()
        pool.shutdown()
        tier.close()
        client.close()
    return pairs.rows


def run(
    layouts: Sequence[str] = ("small",),
    total_mib: int = 64,
    repeats: int = 5,
    work_dir: Path | None = None,
    backends: Sequence[str] = ("valkey", "s3"),
) -> RemoteRun:
    """Start the servers, run each backend's benchmark for each layout, stop the servers.

    Args:
        layouts: names in `kvdepot.bench.tiers.LAYOUTS` ("small": 5.6 MiB chunks, "7b": 32 MiB).
        total_mib: bytes moved per timed batch (at least two chunks).
        repeats: timed pairs per figure (medians are reported).
        work_dir: where the servers keep data and logs (a temporary folder inside it).
        backends: "valkey", "s3" or both.
    """
    out = RemoteRun(versions=_client_versions())
    root = Path(tempfile.mkdtemp(prefix="kvdepot-bench-remote-", dir=work_dir))
    servers: list[LocalServer] = []
    try:
        if "valkey" in backends:
            server = valkey_server(root / "valkey").start()
            servers.append(server)
            out.versions["valkey-server"] = _valkey_version(server.port)
            for name in layouts:
                out.results += bench_valkey(
                    name, LAYOUTS[name], total_mib << 20, repeats, server.port
                )
        if "s3" in backends:
            access_key, secret_key, bucket = _S3_KEYS
            server = seaweed_s3(
                root / "s3", access_key=access_key, secret_key=secret_key, bucket=bucket
            ).start()
            servers.append(server)
            out.versions["seaweedfs"] = _weed_version()
            for name in layouts:
                out.results += bench_s3(name, LAYOUTS[name], total_mib << 20, repeats, server.port)
    finally:
        for server in servers:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)
    return out


def report(run: RemoteRun) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in run.versions.items())
    head = f"kvdepot bench remote | {platform.machine()} | {os.cpu_count()} cores | {versions}"
    return f"{head}\n{results_table(run.results)}"


def _client_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("valkey", "libvalkey", "boto3"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _valkey_version(port: int) -> str:
    from kvdepot.bench.servers import resp_command

    info = resp_command(port, "INFO", "server")
    text = info.decode() if isinstance(info, bytes) else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return fields.get("valkey_version", fields.get("redis_version", "?")).strip()


def _weed_version() -> str:
    done = subprocess.run([str(weed_path()), "version"], capture_output=True, timeout=30)
    words = done.stdout.decode(errors="replace").split()
    return words[2] if len(words) > 2 else "?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", default="small,7b", help="comma list of: small, 7b")
    parser.add_argument("--total-mib", type=int, default=64, help="KV bytes per run")
    parser.add_argument("--repeats", type=int, default=5, help="pairs per figure")
    parser.add_argument("--backends", default="valkey,s3", help="comma list")


def cli_main(args: argparse.Namespace) -> int:
    measured = run(
        layouts=tuple(args.layouts.split(",")), total_mib=args.total_mib, repeats=args.repeats,
        backends=tuple(args.backends.split(",")),
    )  # fmt: skip
    print(report(measured))
    return 0
