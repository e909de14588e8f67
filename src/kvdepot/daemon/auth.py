"""Authentication checks of the daemon: token comparison, bearer headers, private directories.

Runs in the daemon process (socket server, HTTP admin thread, `kvdepot serve` start-up). Pure
functions, no state.

Invariants:
- `tokens_match` and `bearer_token` never raise, whatever a client sends: a malformed or
  non-ASCII credential is a refusal, not a crash; tokens compare in constant time as UTF-8
  bytes, and an empty expected token matches nothing.
- `ensure_private_dir` either leaves a directory that only the current user can write to, or
  raises `ConfigError` saying how to fix it: the default socket directory
  (`/tmp/kvdepot-<uid>`) is predictable, so another local user could have created it first.
"""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

from kvdepot.errors import ConfigError

_BEARER = "bearer"


def tokens_match(given: str | bytes, expected: str) -> bool:
    """Whether `given` equals `expected`, compared in constant time as UTF-8 bytes.

    Never raises: a value that is neither str nor bytes, or that cannot be encoded, does not
    match; nothing matches an empty `expected`.
    """
    if not isinstance(expected, str) or not expected:
        return False
    try:
        if isinstance(given, str):
            given_bytes = given.encode("utf-8", "surrogateescape")
        elif isinstance(given, bytes | bytearray):
            given_bytes = bytes(given)
        else:
            return False
        expected_bytes = expected.encode("utf-8", "surrogateescape")
    except UnicodeError:  # a lone surrogate outside the escape range
        return False
    return hmac.compare_digest(given_bytes, expected_bytes)


def bearer_token(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <token>` header, else None.

    The scheme is case-insensitive; exactly one credential must follow it after a space. A
    bare token, another scheme or extra parts give None.
    """
    if not isinstance(header, str):
        return None
    scheme, sep, credential = header.strip().partition(" ")
    credential = credential.strip()
    if not sep or scheme.lower() != _BEARER or not credential or len(credential.split()) != 1:
        return None
    return credential


def ensure_private_dir(path: Path, *, mode: int = 0o700) -> None:
    """Create `path` (and its parents) with `mode`, or check that the existing one is private.

    Raises:
        ConfigError: `path` exists but is not a directory, is a symlink, belongs to another
            user or is writable by group or others; or it cannot be created.
    """
    try:
        path.mkdir(mode=mode, parents=True)
    except FileExistsError:
        _check_private_dir(path)
        return
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc}") from None
    os.chmod(path, mode)  # mkdir's mode is narrowed by the umask


def _check_private_dir(path: Path) -> None:
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot inspect directory {path}: {exc}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(
            f"{path} is a symlink, refused as a private directory; remove it "
            "(or choose another path) and start again"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} exists and is not a directory; remove it or choose another path")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"directory {path} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}): another user may have created it; remove it or choose "
            "another path"
        )
    if info.st_mode & 0o022:
        raise ConfigError(
            f"directory {path} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod go-w {path}` "
            "or choose another path"
        )
