"""`kvdepot serve`: assemble and run the daemon until SIGTERM/SIGINT.

Runs in the daemon process. `SharedStoreHost` builds the shared-memory RAM tier (files of
owners that are gone are removed at start), the tiered store on it and the socket server;
this adds the HTTP admin endpoint and signal handling. The token (TCP clients, POST /clear)
is taken from the config (or `daemon.token_file`) or generated, and written next to the
socket, mode 0600, in the socket's private directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
from pathlib import Path

from kvdepot.config import KVDepotConfig
from kvdepot.daemon.auth import ensure_private_dir
from kvdepot.daemon.host import SharedStoreHost
from kvdepot.daemon.http import AdminServer
from kvdepot.errors import ConfigError
from kvdepot.metrics import Metrics

logger = logging.getLogger(__name__)


def token_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".token")


def _token(config: KVDepotConfig, socket_path: Path) -> str:
    token = config.daemon.token or secrets.token_urlsafe(24)
    ensure_private_dir(socket_path.parent)
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
    socket_path = Path(d.socket_path)
    stop = threading.Event()
    host = SharedStoreHost.open(
        config, socket_path=socket_path, token=_token(config, socket_path), metrics=Metrics()
    )
    disk_problem = host.store.disabled_tiers.get("disk")
    if disk_problem is not None and config.disk.required:
        host.close()
        with contextlib.suppress(FileNotFoundError):
            token_path(socket_path).unlink()
        raise ConfigError(
            f"the disk tier cannot be used ({disk_problem}); the daemon would keep nothing "
            "across a restart. Fix the path, or set disk.required: false "
            "(--disk-required false) to run from RAM only"
        )
    try:
        server = host.server
        admin = AdminServer(server, d.http_host, d.http_port).start() if d.http_port else None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        logger.info(
            "kvdepot daemon %d: socket %s%s, RAM %.1f GiB in %s, disk %s, admin %s",
            os.getpid(), socket_path,
            f", tcp {server.tcp_address}" if server.tcp_address else "",
            config.memory.capacity_bytes / 2**30, host.buffer.path,
            f"DISABLED ({disk_problem})" if disk_problem else config.disk.path or "off",
            f"http://{admin.address[0]}:{admin.address[1]}" if admin else "off",
        )  # fmt: skip
        if ready is not None:
            ready.set()
        stop.wait()
        logger.info("shutting down: finishing write-back")
        if admin is not None:
            admin.stop()
    finally:
        host.close()
        with contextlib.suppress(FileNotFoundError):
            token_path(socket_path).unlink()
