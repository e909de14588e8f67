"""SharedStoreHost: a tiered store whose RAM tier is a shared-memory file, served on a socket.

Runs in the process that owns the cache and serves it to others: `kvdepot serve`, or a vLLM
worker in embedded mode (which serves its store to vLLM's scheduler process). Both build it
the same way: clean up the files of dead owners, create and lock a new shared-memory file,
open the `TieredStore` on it, start the `DaemonServer`; `close` undoes it all.

Invariants:
- The RAM-tier file is `<shm_dir>/kvdepot-<pid>-<random>.shm`, mode 0600. Its owner holds an
  exclusive `flock` on it for its whole life, taken as the file is created (under a
  temporary name `.kvdepot-...tmp`, renamed once sized and touched).
- Stale-file cleanup deletes a file only when it can take that lock, i.e. when its owner is
  gone. A PID probe would be wrong across PID namespaces (containers sharing /dev/shm): a
  live owner there is invisible, and its file must stay. A file nobody can lock for us
  (permissions) is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from kvdepot.config import KVDepotConfig
from kvdepot.daemon.server import DaemonServer, ServerLimits
from kvdepot.metrics import Metrics
from kvdepot.store import TieredStore, open_store
from kvdepot.tiers.arena import HostBuffer

logger = logging.getLogger(__name__)
SHM_GLOBS = ("kvdepot-*.shm", ".kvdepot-*.tmp")  # the second: an owner that died starting


def remove_stale_shm(shm_dir: Path) -> list[Path]:
    """Delete the RAM-tier files in `shm_dir` whose owners are gone; returns them."""
    removed = []
    for path in sorted(p for pattern in SHM_GLOBS for p in shm_dir.glob(pattern)):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # vanished, or not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner lives (in whatever PID namespace)
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
            logger.info("removed %s, left by an owner that is gone", path)
        finally:
            os.close(fd)
    return removed


def create_locked_shm(
    shm_dir: Path, capacity_bytes: int, *, prefault: bool
) -> tuple[HostBuffer, int]:
    """A new RAM-tier file in `shm_dir`, mapped, and the fd that holds its lock (close it
    only after unlinking the file)."""
    name = f"kvdepot-{os.getpid()}-{secrets.token_hex(4)}"
    tmp_path = shm_dir / f".{name}.tmp"
    lock_fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    buffer: HostBuffer | None = None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else has it open yet
        buffer = HostBuffer.map_new_file(lock_fd, tmp_path, capacity_bytes, prefault=prefault)
        final = shm_dir / f"{name}.shm"
        os.rename(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        if buffer is not None:
            buffer.close()
        os.close(lock_fd)
        raise
    buffer.path = final
    return buffer, lock_fd


@dataclass(slots=True)
class SharedStoreHost:
    """The store, its shared RAM tier and the server, owned together."""

    store: TieredStore
    buffer: HostBuffer
    server: DaemonServer
    lock_fd: int

    @classmethod
    def open(
        cls,
        config: KVDepotConfig,
        *,
        socket_path: Path,
        token: str = "",
        metrics: Metrics | None = None,
        tcp: bool = True,
    ) -> SharedStoreHost:
        """Build and start everything for `config`; with `tcp`, a TCP listener too when
        `daemon.tcp_host` is set."""
        d = config.daemon
        shm_dir = Path(d.shm_dir)
        remove_stale_shm(shm_dir)
        buffer, lock_fd = create_locked_shm(
            shm_dir, config.memory.capacity_bytes, prefault=config.memory.prefault
        )
        try:
            store = open_store(config, metrics, buffer=buffer)
            try:
                server = DaemonServer(
                    store,
                    buffer,
                    socket_path=socket_path,
                    tcp_address=(d.tcp_host, d.tcp_port) if tcp and d.tcp_host else None,
                    token=token,
                    limits=ServerLimits.from_config(d),
                ).start()
            except BaseException:
                store.close()
                raise
        except BaseException:
            _drop_shm(buffer, lock_fd)
            raise
        return cls(store, buffer, server, lock_fd)

    def close(self) -> None:
        """Stop serving, finish write-back, remove the shared file (and its lock)."""
        try:
            self.server.stop()
            self.store.close()
        finally:
            _drop_shm(self.buffer, self.lock_fd)


def _drop_shm(buffer: HostBuffer, lock_fd: int) -> None:
    buffer.unlink()
    with contextlib.suppress(OSError):
        os.close(lock_fd)
