"""Typed settings of the remote tiers (Valkey/Redis and S3), sections of the config tree.

Pure code, no client library imported: `kvdepot.tiers.valkey` and `kvdepot.tiers.s3` (each
behind its optional extra) build tiers from these. Every field has a type, a default and a
one-line doc (`metadata["doc"]`), as in `kvdepot.config`. Durations are whole milliseconds
(`*_ms`), which the config loader coerces like any integer. A tier is off until its address
(`valkey.address`, `s3.bucket`) is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kvdepot.errors import ConfigError

MiB = 1 << 20
_PREFIX = re.compile(r"^[A-Za-z0-9_.:/-]+$")  # no glob characters, no hash-tag braces
S3_ADDRESSING_STYLES = ("auto", "path", "virtual")


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass(slots=True)
class ValkeyConfig:
    """Valkey or Redis tier, single server or cluster (off unless `address` is set)."""

    address: str | None = _doc(
        "host:port of the server, or of cluster nodes (comma-separated); unset disables it", None
    )
    cluster: bool = _doc("cluster mode: discover the nodes and route each key to its slot", False)
    key_prefix: str = _doc(
        "first part of every key: <prefix>:<namespace>:{<chunk hash>}", "kvdepot"
    )
    ttl_s: int = _doc("expire chunks this long after they are stored; 0: never", 0)
    username: str | None = _doc("ACL user name; unset: the default user", None)
    password: str | None = _doc("password of the ACL user (or requirepass)", None)
    password_file: str | None = _doc(
        "file holding the password (mode 0600); overrides valkey.password", None
    )
    tls: bool = _doc("connect with TLS", False)
    tls_ca_file: str | None = _doc("CA bundle that signs the server certificate", None)
    tls_cert_file: str | None = _doc("client certificate, for mutual TLS", None)
    tls_key_file: str | None = _doc("private key of the client certificate", None)
    tls_check_hostname: bool = _doc("check that the certificate names the host", True)
    connect_timeout_ms: int = _doc("time allowed to open a connection", 500)
    timeout_ms: int = _doc("time allowed for each reply (socket read/write timeout)", 2000)
    part_size_bytes: int = _doc(
        "blobs larger than this are stored as several values (each read costs a copy)", 64 * MiB
    )
    breaker_failures: int = _doc("consecutive failures that make a server count as down", 3)
    breaker_cooldown_ms: int = _doc("how long a down server is skipped before a probe", 5000)
    codec: str = _doc("codec of chunks in Valkey: raw, lossless, int8, fp8, cachegen, ...", "raw")

    def validate(self) -> ValkeyConfig:
        """Raise ConfigError naming the first invalid field; return self when valid."""
        for host_port in self.addresses():
            host, _, port = host_port.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"valkey.address {host_port!r}: write host:port")
        if not _PREFIX.match(self.key_prefix):
            raise ConfigError(
                f"valkey.key_prefix {self.key_prefix!r}: use letters, digits and _.:/- only"
            )
        if self.ttl_s < 0:
            raise ConfigError("valkey.ttl_s must be >= 0 (0: no expiry)")
        if self.part_size_bytes < 1024:
            raise ConfigError("valkey.part_size_bytes must be at least 1024")
        _check_remote_timing("valkey", self.connect_timeout_ms, self.timeout_ms, self)
        return self

    def addresses(self) -> list[str]:
        """The configured host:port strings (empty when the tier is off)."""
        return [a.strip() for a in (self.address or "").split(",") if a.strip()]


@dataclass(slots=True)
class S3Config:
    """S3 or S3-compatible object store tier (off unless `bucket` is set)."""

    bucket: str | None = _doc("bucket that holds the chunks; unset disables the S3 tier", None)
    prefix: str = _doc("first part of every object key: <prefix>/<namespace>/<hash>", "kvdepot")
    endpoint_url: str | None = _doc("endpoint of an S3-compatible store; unset: AWS", None)
    region: str | None = _doc("region; unset: from the standard AWS configuration", None)
    access_key_id: str | None = _doc(
        "access key; unset (preferred): the standard AWS chain (environment, "
        "~/.aws/credentials, instance or container role)",
        None,
    )
    secret_access_key: str | None = _doc(
        "secret key that goes with access_key_id; prefer the standard AWS chain", None
    )
    addressing_style: str = _doc("bucket in the host name or the path: auto, path, virtual", "auto")
    tls_verify: bool = _doc("verify the endpoint's TLS certificate", True)
    tls_ca_file: str | None = _doc("CA bundle for the endpoint; unset: the system's", None)
    connect_timeout_ms: int = _doc("time allowed to open a connection", 1000)
    timeout_ms: int = _doc("time allowed for each read from the connection", 2000)
    max_attempts: int = _doc(
        "attempts per request, the first included; a hung store costs this x timeout_ms once", 2
    )
    max_workers: int = _doc("requests in flight at once (thread pool size)", 8)
    breaker_failures: int = _doc("consecutive failures that make the store count as down", 3)
    breaker_cooldown_ms: int = _doc("how long a down store is skipped before a probe", 5000)
    codec: str = _doc("codec of chunks in S3: raw, lossless, int8, fp8, cachegen, ...", "raw")

    def validate(self) -> S3Config:
        """Raise ConfigError naming the first invalid field; return self when valid."""
        if self.bucket is not None and not self.bucket.strip():
            raise ConfigError("s3.bucket cannot be blank (unset it to disable the S3 tier)")
        if not _PREFIX.match(self.prefix) or self.prefix.startswith("/"):
            raise ConfigError(f"s3.prefix {self.prefix!r}: use letters, digits and _.:/- only")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError("s3.access_key_id and s3.secret_access_key go together")
        if self.addressing_style not in S3_ADDRESSING_STYLES:
            raise ConfigError(
                f"s3.addressing_style {self.addressing_style!r}: "
                f"choose one of {list(S3_ADDRESSING_STYLES)}"
            )
        if self.max_attempts < 1:
            raise ConfigError("s3.max_attempts must be >= 1")
        if self.max_workers < 1:
            raise ConfigError("s3.max_workers must be >= 1")
        _check_remote_timing("s3", self.connect_timeout_ms, self.timeout_ms, self)
        return self


def _check_remote_timing(
    section: str, connect_timeout_ms: int, timeout_ms: int, cfg: ValkeyConfig | S3Config
) -> None:
    if connect_timeout_ms <= 0 or timeout_ms <= 0:
        raise ConfigError(f"{section}.connect_timeout_ms and {section}.timeout_ms must be > 0")
    if cfg.breaker_failures < 1:
        raise ConfigError(f"{section}.breaker_failures must be >= 1")
    if cfg.breaker_cooldown_ms < 0:
        raise ConfigError(f"{section}.breaker_cooldown_ms must be >= 0")
