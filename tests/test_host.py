"""SharedStoreHost: the shared RAM-tier file is locked by its owner, and only files whose
owner is gone are cleaned up (PID probes are wrong across PID namespaces)."""

from __future__ import annotations

import os
from pathlib import Path

from kvdepot import load_config
from kvdepot.daemon.client import DaemonClient
from kvdepot.daemon.host import SharedStoreHost, create_locked_shm, remove_stale_shm
from tests.helpers import make_chunk, random_key


def test_a_live_owners_file_survives_cleanup_whatever_its_pid(tmp_path: Path) -> None:
    buffer, lock_fd = create_locked_shm(tmp_path, 1 << 20, prefault=False)
    assert buffer.path is not None and buffer.path.parent == tmp_path
    assert oct(buffer.path.stat().st_mode & 0o777) == oct(0o600)
    # As another container sees it: a PID that does not exist here.
    invisible = tmp_path / "kvdepot-4194000-0badf00d.shm"
    os.rename(buffer.path, invisible)
    assert remove_stale_shm(tmp_path) == []
    assert invisible.exists()
    buffer.close()  # the owner dies: its mapping and its fd go
    os.close(lock_fd)
    assert remove_stale_shm(tmp_path) == [invisible]
    assert not invisible.exists()


def test_a_file_left_by_an_owner_that_died_starting_is_removed(tmp_path: Path) -> None:
    half_made = tmp_path / ".kvdepot-123-0badf00d.tmp"
    half_made.write_bytes(bytes(4096))
    assert remove_stale_shm(tmp_path) == [half_made]


def test_a_host_serves_its_store_and_cleans_up(tmp_path: Path) -> None:
    config = load_config(
        overrides={
            "memory.capacity_bytes": "8MiB",
            "memory.prefault": False,
            "daemon.shm_dir": str(tmp_path),
            "daemon.http_port": 0,
        }
    )
    socket_path = tmp_path / "run" / "daemon.sock"
    host = SharedStoreHost.open(config, socket_path=socket_path)
    other = SharedStoreHost.open(config, socket_path=tmp_path / "run" / "other.sock")
    assert len(list(tmp_path.glob("kvdepot-*.shm"))) == 2  # neither removed the other's
    client = DaemonClient(socket_path=socket_path)
    key = random_key()
    assert client.put([(key, make_chunk(1))]) == 1
    assert host.store.contains([key]) == [True]
    client.close()
    host.close()
    other.close()
    assert list(tmp_path.glob("kvdepot-*.shm")) == []
    assert oct((tmp_path / "run").stat().st_mode & 0o777) == oct(0o700)
