"""Auth and permissions: token checks, bearer headers, private directories, secret files,
redacted config output, the admin endpoint under hostile headers, private disk-tier files."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvdepot.bench.servers import free_port
from kvdepot.codec import RawCodec, encode_chunk
from kvdepot.config import REDACTED, SECRET_FIELDS, KVDepotConfig, load_config, redacted
from kvdepot.daemon.auth import bearer_token, ensure_private_dir, tokens_match
from kvdepot.errors import ConfigError
from kvdepot.keys import CacheNamespace, ChunkHash, ChunkKey
from kvdepot.layout import DType
from kvdepot.secrets import read_secret_file
from kvdepot.tiers.disk import DiskTier

ROOT = Path(__file__).resolve().parents[1]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def secret_file(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return str(path)


# --- tokens_match / bearer_token ------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected", "is_match"),
    [
        ("secret", "secret", True),
        (b"secret", "secret", True),
        ("secreT", "secret", False),
        ("tökén", "tökén", True),
        ("tökén".encode(), "tökén", True),
        ("tökén", "token", False),
        ("token", "tökén", False),
        (b"t\xf6ken", "tökén", False),  # latin-1 bytes are not the UTF-8 token
        (b"\xff\xfe", "secret", False),
        ("\ud800", "secret", False),  # a lone surrogate cannot be encoded: no match, no raise
        ("", "", False),
        ("anything", "", False),  # an empty expected token matches nothing
        (b"", "", False),
    ],
)
def test_tokens_match_never_raises(given: str | bytes, expected: str, is_match: bool) -> None:
    assert tokens_match(given, expected) is is_match


def test_tokens_match_refuses_values_of_other_types() -> None:
    assert tokens_match(42, "42") is False  # type: ignore[arg-type]
    assert tokens_match(None, "x") is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        ("Bearer t\xf6ken", "t\xf6ken"),
        (None, None),
        ("", None),
        ("abc", None),  # a bare token without the scheme
        ("Basic abc", None),
        ("Bearerabc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer abc def", None),  # extra parts
        ("Token abc", None),
    ],
)
def test_bearer_token_parses_only_the_bearer_scheme(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


# --- ensure_private_dir -----------------------------------------------------------------------


def test_ensure_private_dir_creates_0700_with_parents(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        target = tmp_path / "a" / "b" / "run"
        ensure_private_dir(target)
    finally:
        os.umask(old_umask)
    assert mode_of(target) == 0o700
    ensure_private_dir(target)  # an existing private directory is accepted


def test_ensure_private_dir_applies_mode_despite_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        ensure_private_dir(tmp_path / "shared", mode=0o750)
    finally:
        os.umask(old_umask)
    assert mode_of(tmp_path / "shared") == 0o750


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o1777])
def test_ensure_private_dir_refuses_group_or_other_writable(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "run"
    target.mkdir()
    target.chmod(mode)
    with pytest.raises(ConfigError, match=r"writable by group or others.*chmod go-w"):
        ensure_private_dir(target)


def test_ensure_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(real)
    with pytest.raises(ConfigError, match="symlink"):
        ensure_private_dir(tmp_path / "run")
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    with pytest.raises(ConfigError, match="symlink"):
        ensure_private_dir(tmp_path / "dangling")


def test_ensure_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_private_dir(tmp_path / "run")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_ensure_private_dir_refuses_a_directory_of_another_user(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir(mode=0o700)
    os.chown(target, 54321, -1)
    with pytest.raises(ConfigError, match="belongs to uid 54321"):
        ensure_private_dir(target)


# --- read_secret_file and the config --------------------------------------------------------


def test_read_secret_file_strips_one_trailing_newline(tmp_path: Path) -> None:
    assert read_secret_file(secret_file(tmp_path / "a", "s3cret\n")) == "s3cret"
    assert read_secret_file(secret_file(tmp_path / "b", "tökén\r\n")) == "tökén"
    assert read_secret_file(secret_file(tmp_path / "c", "pass word ")) == "pass word "
    assert read_secret_file(secret_file(tmp_path / "d", "x", 0o640)) == "x"  # group may read


@pytest.mark.parametrize("text", ["", "\n", "  \n"])
def test_read_secret_file_refuses_an_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        read_secret_file(secret_file(tmp_path / "token", text))


def test_read_secret_file_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    path = secret_file(tmp_path / "token", "s3cret", 0o644)
    with pytest.raises(ConfigError, match=r"readable by other users.*chmod 600"):
        read_secret_file(path)


def test_read_secret_file_refuses_a_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read secret file"):
        read_secret_file(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="cannot read secret file"):
        read_secret_file(str(tmp_path))  # a directory
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    (tmp_path / "bin").chmod(0o600)
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_secret_file(str(tmp_path / "bin"))


def test_token_file_overrides_token(tmp_path: Path) -> None:
    path = secret_file(tmp_path / "token", "from-file\n")
    config = load_config(overrides={"daemon.token": "inline", "daemon.token_file": path})
    assert config.daemon.token == "from-file"
    by_env = load_config(env={"KVDEPOT_DAEMON_TOKEN_FILE": path})
    assert by_env.daemon.token == "from-file"
    assert load_config().daemon.token == ""


def test_password_file_overrides_password(tmp_path: Path) -> None:
    path = secret_file(tmp_path / "password", "pw\n")
    config = load_config(overrides={"valkey.password": "inline", "valkey.password_file": path})
    assert config.valkey.password == "pw"
    assert load_config(overrides={"valkey.password": "inline"}).valkey.password == "inline"


def test_a_bad_secret_file_names_its_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"daemon\.token_file: cannot read"):
        load_config(overrides={"daemon.token_file": str(tmp_path / "absent")})
    loose = secret_file(tmp_path / "pw", "pw", 0o604)
    with pytest.raises(ConfigError, match=r"valkey\.password_file: .*chmod 600"):
        load_config(overrides={"valkey.password_file": loose})


def test_redacted_hides_set_secrets_only() -> None:
    config = load_config(
        overrides={
            "daemon.token": "tok",
            "valkey.password": "pw",
            "s3.access_key_id": "AKIAEXAMPLE",
            "s3.secret_access_key": "sk",
        }
    )
    tree = redacted(config)
    assert tree["daemon"]["token"] == REDACTED
    assert tree["valkey"]["password"] == REDACTED
    assert tree["s3"]["secret_access_key"] == REDACTED
    assert tree["s3"]["access_key_id"] == "AKIAEXAMPLE"
    assert config.daemon.token == "tok"  # the config itself is untouched
    assert {"daemon.token", "valkey.password", "s3.secret_access_key"} == SECRET_FIELDS
    unset = redacted(KVDepotConfig())
    assert unset["daemon"]["token"] == ""
    assert unset["valkey"]["password"] is None
    assert unset["s3"]["secret_access_key"] is None


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KVDEPOT_")}


def test_cli_config_prints_secrets_redacted(tmp_path: Path) -> None:
    path = secret_file(tmp_path / "pw", "valkey-pw-from-file\n")
    out = subprocess.run(
        [
            sys.executable, "-m", "kvdepot.cli", "config",
            "--daemon-token", "daemon-secret-xyz", "--valkey-password-file", path,
            "--s3-access-key-id", "AKIAVISIBLE", "--s3-secret-access-key", "s3-secret-xyz",
        ],
        capture_output=True, text=True, check=True, env=_clean_env(), timeout=60,
    )  # fmt: skip
    tree = json.loads(out.stdout)
    assert tree["daemon"]["token"] == REDACTED
    assert tree["valkey"]["password"] == REDACTED
    assert tree["valkey"]["password_file"] == path
    assert tree["s3"]["secret_access_key"] == REDACTED
    assert tree["s3"]["access_key_id"] == "AKIAVISIBLE"
    for secret in ("daemon-secret-xyz", "valkey-pw-from-file", "s3-secret-xyz"):
        assert secret not in out.stdout + out.stderr


def test_cli_config_reports_a_bad_token_file(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvdepot.cli", "config", "--daemon-token-file", "/nonexistent/t"],
        capture_output=True, text=True, env=_clean_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "daemon.token_file" in out.stderr
    assert "Traceback" not in out.stderr


# --- the admin endpoint -------------------------------------------------------------------------

TOKEN = "tökén-admin"


def post_clear(port: int, authorization: bytes | None) -> int:
    """Status of a raw `POST /clear` whose Authorization header is sent as these bytes."""
    request = b"POST /clear HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
    if authorization is not None:
        request += b"Authorization: " + authorization + b"\r\n"
    request += b"Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        response = b""
        while chunk := conn.recv(4096):
            response += chunk
    return int(response.split(b" ", 2)[1])


def get_status(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return int(conn.recv(4096).split(b" ", 2)[1])


@pytest.fixture
def admin_daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """A `kvdepot serve` whose token comes from a file; (process, HTTP port, log path)."""
    port = free_port()
    token_file = secret_file(tmp_path / "token", TOKEN + "\n")
    log = tmp_path / "daemon.log"
    args = [
        sys.executable, "-m", "kvdepot.cli", "serve",
        "--daemon-socket-path", str(tmp_path / "run" / "daemon.sock"),
        "--memory-capacity-bytes", "32MiB", "--memory-prefault", "false",
        "--daemon-http-port", str(port), "--daemon-token-file", token_file,
    ]  # fmt: skip
    with open(log, "ab") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=sink, env=_clean_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {log.read_text()}")
            try:
                if get_status(port, "/healthz") == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.integration
def test_admin_clear_needs_a_bearer_token_and_survives_bad_headers(
    admin_daemon: tuple[subprocess.Popen[bytes], int, Path], tmp_path: Path
) -> None:
    proc, port, log = admin_daemon
    utf8 = TOKEN.encode()
    assert post_clear(port, b"Bearer " + utf8) == 200
    assert post_clear(port, b"bearer " + utf8) == 200
    assert post_clear(port, utf8) == 401  # the bare token, no scheme
    assert post_clear(port, b"Basic " + utf8) == 401
    assert post_clear(port, b"Bearer " + utf8 + b" extra") == 401
    assert post_clear(port, b"Bearer t\xf6ken") == 401  # non-ASCII, latin-1
    assert post_clear(port, b"Bearer " + TOKEN.encode("latin-1")) == 401
    assert post_clear(port, b"Bearer \xff\xfe\x80") == 401
    assert post_clear(port, None) == 401
    assert get_status(port, "/healthz") == 200
    assert proc.poll() is None
    assert "Traceback" not in log.read_text(errors="replace")
    assert mode_of(tmp_path / "run") == 0o700


# --- disk tier permissions ---------------------------------------------------------------------


def _store_one(tier: DiskTier) -> Path:
    key = ChunkKey(CacheNamespace("m", "l").digest, ChunkHash(bytes(range(16))))
    array = np.arange(32, dtype=np.float16)
    assert tier.put([(key, encode_chunk(array, DType.FLOAT16, RawCodec()))]) == 1
    chunk_hex = key.chunk_hash.hex()
    return tier.root / key.namespace.hex() / chunk_hex[:2] / f"{chunk_hex}.kvc"


@pytest.mark.parametrize(
    ("kwargs", "file_mode", "dir_mode"),
    [({}, 0o600, 0o700), ({"file_mode": 0o640, "dir_mode": 0o750}, 0o640, 0o750)],
)
def test_disk_tier_files_and_directories_have_private_modes(
    tmp_path: Path, kwargs: dict[str, int], file_mode: int, dir_mode: int
) -> None:
    root = tmp_path / "cache" / "disk"
    old_umask = os.umask(0o077)  # would narrow 0640/0750 if the modes were not set exactly
    try:
        tier = DiskTier.open(root, 1 << 20, fsync=False, **kwargs)  # type: ignore[arg-type]
        path = _store_one(tier)
    finally:
        os.umask(old_umask)
    tier.close()
    assert mode_of(path) == file_mode
    for directory in (root, root / ".tmp", path.parent, path.parent.parent):
        assert mode_of(directory) == dir_mode, directory


def test_disk_modes_from_config_reach_the_tier(tmp_path: Path) -> None:
    from kvdepot.store import open_store

    config = load_config(
        overrides={
            "disk.path": str(tmp_path / "disk"),
            "disk.file_mode": "0640",
            "disk.dir_mode": "0750",
            "memory.capacity_bytes": "8MiB",
            "memory.prefault": False,
        }
    )
    store = open_store(config)
    store.close()
    assert mode_of(tmp_path / "disk") == 0o750
    assert mode_of(tmp_path / "disk" / ".tmp") == 0o750


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("disk.file_mode", "rw-------", "not an octal mode"),
        ("disk.file_mode", "0606", "writable by others"),
        ("disk.file_mode", "0700", "no execute bits"),
        ("disk.file_mode", "0400", "owner read and write"),
        ("disk.file_mode", "4600", r"0000-0777"),
        ("disk.dir_mode", "0777", "writable by others"),
        ("disk.dir_mode", "0500", "owner needs rwx"),
        ("disk.dir_mode", "", "not an octal mode"),
    ],
)
def test_bad_disk_modes_are_config_errors(field: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides={field: value})


def test_group_modes_are_accepted() -> None:
    config = load_config(overrides={"disk.file_mode": "640", "disk.dir_mode": "0o750"})
    assert config.disk.file_mode_bits() == 0o640
    assert config.disk.dir_mode_bits() == 0o750
