"""Remote tiers behind RAM and disk: two engine processes share chunks through Valkey / S3.

Each process has its own RAM and disk tiers; the second finds the first one's KV in the
remote tier, promotes it and generates exactly what plain `generate` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvdepot.bench.servers import LocalServer
from kvdepot.config import load_config
from kvdepot.remote_config import S3Config

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.servers"]

ENGINE = """
    import json, sys
    import torch
    from kvdepot.config import load_config
    from kvdepot.store import open_store
    from kvdepot.connectors.transformers import KVDepotGenerator
    from tests.helpers import plain_generate, tiny_llama

    config = load_config(overrides=json.loads(sys.argv[1]))
    model = tiny_llama()
    prompt = list(range(11, 75))
    with open_store(config) as store:
        generator = KVDepotGenerator.for_model(model, store, chunk_size_tokens=16)
        result = generator.generate(prompt, max_new_tokens=6)
        store.flush(30)
        tiers = {name: u.num_objects for name, u in store.usage().items()}
    print(json.dumps({"cached": result.num_cached_tokens,
                      "same": result.token_ids == plain_generate(model, prompt, 6),
                      "tiers": tiers}))
"""


def run_engine(overrides: dict[str, object]) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ENGINE), json.dumps(overrides)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def engine_overrides(tmp_path: Path, name: str, remote: dict[str, object]) -> dict[str, object]:
    return {
        "chunk_size_tokens": 16, "memory.capacity_bytes": "64MiB", "memory.prefault": False,
        "disk.path": str(tmp_path / name / "disk"), "disk.fsync": False, **remote,
    }  # fmt: skip


def test_two_engines_share_through_valkey(tmp_path: Path, valkey: LocalServer) -> None:
    remote = {"valkey.address": f"127.0.0.1:{valkey.port}", "valkey.key_prefix": "share-test"}
    first = run_engine(engine_overrides(tmp_path, "a", remote))
    assert first["cached"] == 0 and first["same"]
    second = run_engine(engine_overrides(tmp_path, "b", remote))
    assert second["cached"] == 63 and second["same"]  # all but the last prompt token


def test_two_engines_share_through_s3(
    tmp_path: Path, s3_server: LocalServer, s3_config_for: object
) -> None:
    cfg: S3Config = s3_config_for(s3_server)  # type: ignore[operator]
    remote = {
        "s3.bucket": cfg.bucket, "s3.endpoint_url": cfg.endpoint_url, "s3.region": cfg.region,
        "s3.access_key_id": cfg.access_key_id, "s3.secret_access_key": cfg.secret_access_key,
        "s3.prefix": "share-test",
    }  # fmt: skip
    first = run_engine(engine_overrides(tmp_path, "a", remote))
    assert first["cached"] == 0 and first["same"]
    second = run_engine(engine_overrides(tmp_path, "b", remote))
    assert second["cached"] == 63 and second["same"]


def test_remote_sections_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "kvdepot.yaml"
    path.write_text("valkey:\n  address: 10.0.0.1:6379\n  ttl_s: 60\ns3:\n  bucket: kv\n")
    config = load_config(path)
    assert (config.valkey.address, config.valkey.ttl_s, config.s3.bucket) == (
        "10.0.0.1:6379", 60, "kv",
    )  # fmt: skip
