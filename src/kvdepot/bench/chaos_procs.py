"""Real processes for the chaos suite: `kvdepot serve` daemons, client scripts, raw sockets.

Runs in the benchmark or test process. Daemons are `python -m kvdepot.cli serve` processes in
their own process groups, each with a private shared-memory directory (and a socket directory
short enough for a Unix socket address); `DaemonProcess` kills the group and removes what it
made when it exits, and measures the daemon from outside (`/proc/PID`: threads, RSS). A flag
this kvdepot does not know yet is left out and noted, so that a scenario still shows whether
its hole is there on code that predates the flag. Client scripts are `python -c` programs in
their own process groups too; `scripts()` kills and reaps every one of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvdepot.bench.chaos_kit import ScenarioResult, client_for
from kvdepot.config import FIELDS
from kvdepot.daemon import protocol as p
from kvdepot.daemon.client import DaemonClient


def known_flags() -> set[str]:
    """The config flags of the kvdepot that runs here (and in the daemons it starts)."""
    return {spec.flag for spec in FIELDS.values()}


def short_dir(workdir: Path, name: str) -> Path:
    """A private directory for a Unix socket: under `workdir` unless its path is too long
    for a socket address (108 bytes), then under the system temp directory."""
    path = workdir / name
    if len(str(path / "daemon.sock")) > 100:
        return Path(tempfile.mkdtemp(prefix="kvchaos-"))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass
class DaemonProcess:
    """A `kvdepot serve` process: start, SIGKILL, restart, measure; a context manager."""

    workdir: Path
    flags: list[str] = field(default_factory=list)
    optional: list[str] = field(default_factory=list)  # flag, value, ...: left out if unknown
    memory: str = "32MiB"
    disk: bool = False
    shm_dir: Path | None = None
    result: ScenarioResult | None = None
    proc: subprocess.Popen[bytes] | None = None
    run_dir: Path | None = None  # the socket's private directory, made at the first start
    _owned: list[Path] = field(default_factory=list)

    def _prepare(self) -> None:
        """Make the directories of the first start (those made here go at exit)."""
        if self.run_dir is not None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir = short_dir(self.workdir, "run")
        if self.run_dir.parent != self.workdir:
            self._owned.append(self.run_dir)
        if self.shm_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.shm_dir = Path(tempfile.mkdtemp(prefix="kvdepot-chaos-", dir=base))
            self._owned.append(self.shm_dir)

    @property
    def socket_path(self) -> Path:
        assert self.run_dir is not None, "start the daemon first"
        return self.run_dir / "daemon.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        known = known_flags()
        args = [
            sys.executable, "-m", "kvdepot.cli", "serve",
            "--daemon-socket-path", str(self.socket_path), "--daemon-shm-dir", str(self.shm_dir),
            "--memory-capacity-bytes", self.memory, "--memory-prefault", "false",
            "--disk-fsync", "false", "--daemon-http-port", "0", *self.flags,
        ]  # fmt: skip
        if self.disk:
            args += ["--disk-path", str(self.workdir / "disk")]
        for flag, value in zip(self.optional[::2], self.optional[1::2], strict=True):
            if flag in known:
                args += [flag, value]
            elif self.result is not None:
                self.result.note(f"this kvdepot has no {flag}: ran without it")
        return args

    def start(self, timeout_s: float = 60.0) -> DaemonProcess:
        self._prepare()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited at start:\n{self.log_text()[-2000:]}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(self.socket_path))
                    return self
                except OSError:
                    time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the daemon did not start in {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL the process group (a crash) and reap it."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM (clean shutdown), SIGKILL if it lingers."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        self.kill()

    def threads(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except (OSError, AssertionError):
            return 0

    def memory_mib(self, field_name: str = "VmRSS") -> float:
        """A `/proc/PID/status` size (VmRSS, RssAnon, ...) in MiB; 0 if unavailable."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
        except (OSError, AssertionError):
            pass
        return 0.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **options: float) -> DaemonClient:
        return client_for(self.socket_path, **options)

    def __enter__(self) -> DaemonProcess:
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        for path in self._owned:
            shutil.rmtree(path, ignore_errors=True)


def kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGKILL a process started with `start_new_session=True` (its group: its children
    too) unless it is reaped already, then reap it and close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
        proc.communicate(timeout=10)


def finish_script(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGKILL a spawned script (unless it has exited) and return what it printed
    (stdout, stderr) since the last line read."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        kill_group(proc)
        return "", ""
    return out or "", err or ""


def spawn_script(code: str, *args: str) -> subprocess.Popen[str]:
    """`python -c code args` in its own process group, stdin/stdout/stderr piped (text)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def read_line(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    """The next stdout line of `proc` ("" at EOF); the process is killed at the deadline."""
    timer = threading.Timer(timeout_s, kill_group, [proc])
    timer.start()
    try:
        assert proc.stdout is not None
        return proc.stdout.readline().strip()
    finally:
        timer.cancel()


@contextlib.contextmanager
def scripts() -> Iterator[list[subprocess.Popen[str]]]:
    """A list to put spawned scripts in; every one is killed (group) and reaped at exit."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            kill_group(proc)


@contextlib.contextmanager
def sampling(
    result: ScenarioResult, daemon: DaemonProcess, interval_s: float = 0.02
) -> Iterator[None]:
    """Record the daemon's thread count and RSS high-water marks while the block runs."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if daemon.is_alive:
                result.peak("daemon_threads", daemon.threads())
                result.peak("daemon_rss_mib", round(daemon.memory_mib(), 1))
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, name="chaos-sampler", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def raw_connection(
    socket_path: Path, *, hello: bool = True, timeout_s: float = 5.0
) -> socket.socket:
    """A Unix-socket connection speaking the protocol by hand (after `Hello` if asked)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(socket_path))
        if hello:
            p.send(sock, p.Hello(p.PROTOCOL_VERSION, "chaos-raw", os.getpid()))
            welcome = p.recv_response(sock)
            if not isinstance(welcome, p.Welcome):
                raise ConnectionError(f"daemon refused the hello: {welcome}")
    except BaseException:
        sock.close()
        raise
    return sock


def is_closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed `sock` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
