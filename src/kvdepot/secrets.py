"""Secrets read from files (`daemon.token_file`, `valkey.password_file`).

Pure code, run once at the edge by `kvdepot.config.load_config` in whichever process loads
the config. Invariant: a secret is never read from a file that other users can read, and an
unreadable or empty file is a `ConfigError` naming the file and the fix, never a silent
fallback to no secret.
"""

from __future__ import annotations

import os
import stat

from kvdepot.errors import ConfigError


def read_secret_file(path: str) -> str:
    """The secret held in the file at `path`, without its one trailing newline.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, readable by others, or
            holds no secret.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    if mode & 0o004:
        raise ConfigError(
            f"secret file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}` (on Kubernetes: defaultMode 0400 on the secret volume)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"secret file {path} is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret.strip():
        raise ConfigError(f"secret file {path} is empty; write the secret into it")
    return secret
