"""Fixtures with real servers on 127.0.0.1 for the remote-tier tests, and helpers around them.

Registered as a plugin by the test modules that need it (`pytest_plugins = ["tests.servers"]`).
Servers are module-scoped (one start per test file), started from the `[servers]` extra's
binaries by `kvdepot.bench.servers`, and stopped (process group killed if need be) afterwards.
Tests that kill or pause a server ask for a fresh one (`fresh_valkey`, `fresh_s3`). Test
modules import nothing from here (that would import it before pytest can rewrite its asserts):
everything they need comes as a fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvdepot.bench.servers import HOST, LocalServer, seaweed_s3, valkey_cluster, valkey_server
from kvdepot.remote_config import S3Config

S3_ACCESS_KEY = "kvdepot-test"
S3_SECRET_KEY = "kvdepot-test-secret"
S3_BUCKET = "kvdepot-test"


def start_s3(workdir: Path) -> LocalServer:
    return seaweed_s3(
        workdir, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, bucket=S3_BUCKET
    ).start()


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One Valkey server for the module."""
    server = valkey_server(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_valkey(tmp_path: Path) -> Iterator[LocalServer]:
    """A Valkey server of the test's own, to kill, pause and restart."""
    server = valkey_server(tmp_path / "valkey").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def valkey_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalServer]]:
    """A 3-node Valkey cluster (node i owns slots [i*16384/3, (i+1)*16384/3))."""
    nodes = valkey_cluster(tmp_path_factory.mktemp("valkey-cluster"), num_nodes=3)
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One SeaweedFS S3 server for the module, with `S3_BUCKET` created."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.kill()  # throw-away data: no need for its 2 s graceful stop


@pytest.fixture
def fresh_s3(tmp_path: Path) -> Iterator[LocalServer]:
    """An S3 server of the test's own, to kill and restart."""
    server = start_s3(tmp_path / "s3")
    yield server
    server.kill()


@pytest.fixture
def s3_config_for() -> Callable[[LocalServer], S3Config]:
    """S3Config (endpoint, credentials, bucket) that reaches a server from `start_s3`."""

    def config_for(server: LocalServer) -> S3Config:
        return S3Config(
            bucket=S3_BUCKET, endpoint_url=f"http://{HOST}:{server.port}", region="us-east-1",
            access_key_id=S3_ACCESS_KEY, secret_access_key=S3_SECRET_KEY,
            addressing_style="path",
        )  # fmt: skip

    return config_for
