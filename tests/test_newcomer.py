"""What a newcomer following the README hit: each silent failure now says what happened.

The environment is read by default; `open_cache` follows `mode`; a client with no daemon says
where it looked; a daemon asked for a disk it cannot use refuses to start (or, told to
tolerate it, says DISABLED everywhere an operator looks); bad codec names, abbreviated flags
and YAML errors are reported where they are made.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import kvdepot
from kvdepot import ConfigError, TieredStore, load_config, open_cache
from kvdepot.cli import main
from kvdepot.daemon.client import DaemonClient
from tests.helpers import Daemon, free_port, kvdepot_stats


def test_the_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVDEPOT_MODE", "daemon")
    monkeypatch.setenv("KVDEPOT_CHUNK_SIZE_TOKENS", "64")
    assert load_config().mode == "daemon"
    assert load_config(overrides={"chunk_size_tokens": 32}).chunk_size_tokens == 32  # env < flags
    assert load_config(env={}).mode == "embedded"


def test_open_cache_is_exported_and_follows_the_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert "open_cache" in kvdepot.__all__
    overrides = {"memory.capacity_bytes": "1MiB", "memory.prefault": False}
    embedded = open_cache(load_config(overrides=overrides))
    assert isinstance(embedded, TieredStore)
    embedded.close()
    monkeypatch.setenv("KVDEPOT_MODE", "daemon")
    monkeypatch.setenv("KVDEPOT_DAEMON_SOCKET_PATH", str(tmp_path / "nobody.sock"))
    with caplog.at_level(logging.WARNING, logger="kvdepot"):
        client = open_cache(load_config(overrides=overrides))
        assert isinstance(client, DaemonClient)
        assert client.lookup([]) == 0  # a miss, not an exception
        client.contains([])
    said = [r.getMessage() for r in caplog.records if "no daemon answers" in r.getMessage()]
    assert len(said) == 1  # once, then rate-limited
    assert str(tmp_path / "nobody.sock") in said[0] and "kvdepot serve" in said[0]
    client.close()


def test_an_unknown_codec_fails_in_config_not_later(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"disk\.codec 'zstd' is not a known codec"):
        load_config(env={}, overrides={"disk.codec": "zstd"})
    assert main(["config", "--s3-codec", "zip9000"]) == 2
    assert "s3.codec 'zip9000'" in capsys.readouterr().err
    assert load_config(env={}, overrides={"valkey.codec": "cachegen"}).valkey.codec == "cachegen"


def test_a_plugin_codec_is_known_once_its_plugin_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugin_example"))
    plugin = "kvdepot_fp16_codec:Fp16DowncastCodec"
    overrides = {"disk.codec": "fp16-downcast", "codec_plugins": plugin}
    assert load_config(env={}, overrides=overrides).disk.codec == "fp16-downcast"


def test_abbreviated_flags_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvdepot.cli", "config", "--memory-capacity-byte", "4GiB"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unrecognized arguments: --memory-capacity-byte" in done.stderr


def test_a_yaml_error_names_the_file_and_its_line(tmp_path: Path) -> None:
    path = tmp_path / "kvdepot.yaml"
    path.write_text("memory:\n  capacity_bytes: 1GiB\n bad: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(path) in str(caught.value) and "line 3, column 2" in str(caught.value)
    assert "<unicode string>" not in str(caught.value)


@pytest.mark.parametrize("how", ["a file", "under a file"])
def test_a_daemon_refuses_a_disk_it_cannot_use(tmp_path: Path, how: str) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    disk = blocker if how == "a file" else blocker / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "kvdepot.cli", "serve", "--disk-path", str(disk),
         "--memory-capacity-bytes", "16MiB", "--memory-prefault", "false",
         "--daemon-socket-path", str(tmp_path / "run" / "d.sock")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "the disk tier cannot be used" in done.stderr and "disk.required" in done.stderr
    assert not (tmp_path / "run" / "d.sock").exists()


def test_a_daemon_told_to_tolerate_it_says_disabled_everywhere(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    daemon = Daemon(tmp_path, http_port=free_port())
    daemon.extra = ["--disk-path", str(blocker), "--disk-required", "false"]
    daemon.start()
    try:
        status, body = daemon.http("/healthz")
        assert status == 200 and body.startswith(b"degraded: disk DISABLED (")
        stats = json.loads(daemon.http("/stats")[1])
        assert "Not a directory" in stats["disabled_tiers"]["disk"]
        shown = kvdepot_stats(daemon.socket_path)
        assert "disk    DISABLED (" in shown
    finally:
        daemon.stop()
    assert "disk DISABLED (" in (tmp_path / "daemon.log").read_text()  # the start banner


def test_an_embedded_store_serves_its_metrics_when_asked(tmp_path: Path) -> None:
    port = free_port()
    config = load_config(
        env={}, overrides={"memory.capacity_bytes": "1MiB", "memory.prefault": False,
                           "metrics_port": port},
    )  # fmt: skip
    store = open_cache(config)
    assert isinstance(store, TieredStore)
    store.lookup([])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "kvdepot_store_lookup_chunks_total" in body
    store.close()  # stops the server with the store
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_busy_metrics_port_is_logged_and_the_cache_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(
            env={}, overrides={"memory.capacity_bytes": "1MiB", "memory.prefault": False,
                               "metrics_port": port},
        )  # fmt: skip
        with caplog.at_level(logging.ERROR, logger="kvdepot"):
            store = open_cache(config)
        assert f"cannot serve /metrics on 127.0.0.1:{port}" in caplog.text
        assert store.lookup([]) == 0
        store.close()
