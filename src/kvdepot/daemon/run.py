"""`kvdepot serve`: assemble and run the daemon until SIGTERM/SIGINT.

Runs in the daemon process. Creates the shared-memory RAM tier (a file in `shm_dir` named
after this process, removed at exit; files of dead daemons are removed at start), the tiered
store on it, the socket server and the HTTP admin endpoint. The token (TCP clients, POST
/clear) is taken from the config or generated and written next to the socket, mode 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import threading
from pathlib import Path

from kvdepot.config import KVDepotConfig
from kvdepot.daemon.http import AdminServer
from kvdepot.daemon.server import DaemonServer
from kvdepot.metrics import Metrics
from kvdepot.store import open_store
from kvdepot.tiers.arena import HostBuffer

logger = logging.getLogger(__name__)
_SHM_NAME = re.compile(r"^kvdepot-(\d+)-[0-9a-f]+\.shm$")


def token_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".token")


def remove_stale_shm(shm_dir: Path) -> None:
    for path in shm_dir.glob("kvdepot-*.shm"):
        match = _SHM_NAME.match(path.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            logger.info("removed %s, left by a daemon that died", path)
        except PermissionError:
            pass  # alive, someone else's


def _token(config: KVDepotConfig, socket_path: Path) -> str:
    token = config.daemon.token or secrets.token_urlsafe(24)
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = token_path(socket_path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token)
    return token


def run_daemon(config: KVDepotConfig, *, ready: threading.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT (call from the main thread); `ready` is set once the
    sockets accept connections."""
    d = config.daemon
    shm_dir = Path(d.shm_dir)
    remove_stale_shm(shm_dir)
    shm_path = shm_dir / f"kvdepot-{os.getpid()}-{secrets.token_hex(4)}.shm"
    buffer = HostBuffer.create_shared(
        shm_path, config.memory.capacity_bytes, prefault=config.memory.prefault
    )
    stop = threading.Event()
    try:
        metrics = Metrics()
        store = open_store(config, metrics, buffer=buffer)
        socket_path = Path(d.socket_path)
        server = DaemonServer(
            store,
            buffer,
            socket_path=socket_path,
            tcp_address=(d.tcp_host, d.tcp_port) if d.tcp_host else None,
            token=_token(config, socket_path),
            lease_ttl_s=d.lease_ttl_s,
        ).start()
        admin = AdminServer(server, d.http_host, d.http_port).start() if d.http_port else None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        logger.info(
            "kvdepot daemon %d: socket %s%s, RAM %.1f GiB in %s, disk %s, admin %s",
            os.getpid(), socket_path,
            f", tcp {server.tcp_address}" if server.tcp_address else "",
            config.memory.capacity_bytes / 2**30, shm_path, config.disk.path or "off",
            f"http://{admin.address[0]}:{admin.address[1]}" if admin else "off",
        )  # fmt: skip
        if ready is not None:
            ready.set()
        stop.wait()
        logger.info("shutting down: finishing write-back")
        server.stop()
        if admin is not None:
            admin.stop()
        store.close()
    finally:
        buffer.unlink()
        with contextlib.suppress(FileNotFoundError):
            token_path(Path(d.socket_path)).unlink()
