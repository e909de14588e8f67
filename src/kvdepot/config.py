"""The one typed configuration tree, and its loading: YAML file < KVDEPOT_* env < CLI flags.

Pure code; precedence is resolved once, at the edge (`load_config`), and nothing else in
kvdepot reads the environment. Every field has a type, a default and a one-line doc
(`metadata["doc"]`), which the CLI turns into `--section-field` flags and `KVDEPOT_SECTION_FIELD`
variables. Sizes accept suffixes: `512MiB`, `2GiB`, `1.5GB`. Secret files
(`daemon.token_file`, `valkey.password_file`) are read here too, once; print a config only
through `redacted`, which masks the `SECRET_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvdepot.errors import ConfigError
from kvdepot.keys import MAX_CHUNK_TOKENS, HashAlgorithm
from kvdepot.remote_config import S3Config, ValkeyConfig
from kvdepot.secrets import read_secret_file

GiB = 1 << 30
MiB = 1 << 20
ENV_PREFIX = "KVDEPOT_"
MODES = ("embedded", "daemon")
DEFAULT_SOCKET_PATH = f"/tmp/kvdepot-{os.getuid()}/daemon.sock"
EVICTION_POLICIES = ("prefix-aware", "lru")
BLEND_SELECTIONS = ("deviation", "query")
SECRET_FIELDS = frozenset({"daemon.token", "valkey.password", "s3.secret_access_key"})
REDACTED = "***"


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass(slots=True)
class MemoryConfig:
    """Host-RAM tier."""

    capacity_bytes: int = _doc("byte budget of the RAM tier, mapped once at start", 2 * GiB)
    eviction_policy: str = _doc("eviction order: prefix-aware or lru", "prefix-aware")
    prefault: bool = _doc("touch the whole budget at start (faster first writes)", True)


@dataclass(slots=True)
class DiskConfig:
    """Local-disk tier (off unless `path` is set)."""

    path: str | None = _doc("directory of the disk tier; unset disables it", None)
    capacity_bytes: int = _doc("byte budget of the disk tier", 16 * GiB)
    fsync: bool = _doc("fsync each chunk file before it becomes visible", True)
    eviction_policy: str = _doc("eviction order: prefix-aware or lru", "prefix-aware")
    codec: str = _doc("codec of chunks on disk: raw, lossless, int8, fp8, cachegen, ...", "raw")
    file_mode: str = _doc("permissions of chunk files, octal (0640: readable by the group)", "0600")
    dir_mode: str = _doc("permissions of directories the tier creates, octal (e.g. 0750)", "0700")
    read_threads: int = _doc("chunk files read at once when a prompt is promoted from disk", 4)
    required: bool = _doc(
        "kvdepot serve refuses to start when the disk tier is unusable (false: it runs from RAM "
        "and reports the disk DISABLED; an engine's embedded store always runs on)",
        True,
    )

    def validate(self) -> DiskConfig:
        """Raise ConfigError naming the first invalid field; return self when valid."""
        if self.read_threads < 1:
            raise ConfigError(f"disk.read_threads must be at least 1, got {self.read_threads}")
        file_mode = parse_mode("disk.file_mode", self.file_mode)
        dir_mode = parse_mode("disk.dir_mode", self.dir_mode)
        if file_mode & 0o111 or file_mode & 0o600 != 0o600:
            raise ConfigError(
                f"disk.file_mode {self.file_mode!r}: chunk files need owner read and write "
                "and no execute bits (e.g. 0600 or 0640)"
            )
        if dir_mode & 0o700 != 0o700:
            raise ConfigError(
                f"disk.dir_mode {self.dir_mode!r}: the owner needs rwx (e.g. 0700 or 0750)"
            )
        return self

    def file_mode_bits(self) -> int:
        """`file_mode` as an int (validated config)."""
        return int(self.file_mode, 8)

    def dir_mode_bits(self) -> int:
        """`dir_mode` as an int (validated config)."""
        return int(self.dir_mode, 8)


def parse_mode(path: str, text: str) -> int:
    """Permission bits from an octal string such as '0600'; ConfigError if not octal, above
    0777 or writable by others (chunks and directories others could rewrite or swap)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"{path} {text!r} is not an octal mode; write e.g. 0600") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{path} {text!r}: only permission bits (0000-0777) are allowed")
    if mode & 0o002:
        raise ConfigError(f"{path} {text!r}: must not be writable by others (clear the o+w bit)")
    return mode


@dataclass(slots=True)
class DaemonConfig:
    """The cache daemon (`kvdepot serve`) and how clients reach it."""

    socket_path: str = _doc("Unix socket of the daemon (mode 0600)", DEFAULT_SOCKET_PATH)
    tcp_host: str = _doc("TCP address to also listen on; empty: no TCP (needs a token)", "")
    tcp_port: int = _doc("TCP port of the daemon (with tcp_host)", 0)
    token: str = _doc("shared secret for TCP clients and POST /clear; empty: generated", "")
    token_file: str | None = _doc(
        "file holding the daemon token (mode 0600); overrides daemon.token", None
    )
    http_host: str = _doc("address of the HTTP admin endpoint", "127.0.0.1")
    http_port: int = _doc("port of /healthz /metrics /stats /clear; 0: off", 9375)
    shm_dir: str = _doc("directory of the shared-memory RAM tier file", "/dev/shm")
    lease_ttl_s: float = _doc(
        "a read lease held longer is reported overdue (it stays pinned until released or "
        "the client disconnects: memory under a live reader is never reused)",
        30.0,
    )
    reservation_ttl_s: float = _doc(
        "a reserved slot not committed in time loses its key (others may store it); its "
        "memory returns when its writer commits, aborts or disconnects",
        30.0,
    )
    max_clients: int = _doc("connections served at once; more are closed at accept", 128)
    handshake_timeout_s: float = _doc("a new connection must send its hello within this", 5.0)
    max_client_bytes: int = _doc(
        "arena bytes one client may hold reserved or leased; 0: half the RAM tier", 0
    )
    connect_timeout_s: float = _doc("client: timeout of a connection attempt", 1.0)
    request_timeout_s: float = _doc("client: timeout of one request", 10.0)
    reconnect_interval_s: float = _doc("client: seconds between reconnection attempts", 1.0)


@dataclass(slots=True)
class BlendConfig:
    """CacheBlend: reuse of documents' KV wherever they appear in a prompt."""

    enabled: bool = _doc(
        "vLLM connector: blend the requests that carry segments (kvdepot.blend.blend_request)",
        False,
    )
    recompute_ratio: float = _doc("fraction of reused tokens recomputed (highest deviation)", 0.15)
    check_layer: int = _doc("layer whose KV deviation selects the tokens to recompute", 2)
    separator: str = _doc("string that splits a prompt text into segments", "<|kvdepot-segment|>")
    selection: str = _doc(
        "how tokens to recompute are ranked: query (deviation x the question's attention) "
        "or deviation (CacheBlend's own ranking)",
        "query",
    )

    def validate(self) -> BlendConfig:
        """Raise ConfigError naming the first invalid field; return self when valid."""
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ConfigError("blend.recompute_ratio must be within 0..1")
        if self.selection not in BLEND_SELECTIONS:
            raise ConfigError(
                f"blend.selection {self.selection!r}: choose one of {list(BLEND_SELECTIONS)}"
            )
        if self.check_layer < 0 or not self.separator:
            raise ConfigError("blend.check_layer must be >= 0 and blend.separator non-empty")
        return self


@dataclass(slots=True)
class EventsConfig:
    """KV events for cache-aware routers (`kvdepot.events`): vLLM's format over ZeroMQ."""

    enabled: bool = _doc("publish KV events (needs pyzmq: pip install kvdepot[events])", False)
    endpoint: str = _doc("ZeroMQ PUB address the events are published on", "tcp://127.0.0.1:5557")
    replay_endpoint: str = _doc("ZeroMQ ROUTER address for replays; empty: none", "")
    topic: str = _doc("topic of each message ({instance}, {model} filled in)",
                      "kv@{instance}@{model}")  # fmt: skip
    instance: str = _doc("this instance's name in topics; empty: the host name", "")
    media: str = _doc(
        "medium each tier is published as (tier=MEDIUM, comma-separated); unlisted tiers: "
        "their name in capitals",
        "memory=CPU,disk=DISK,valkey=VALKEY,s3=S3",
    )
    batch_interval_s: float = _doc("events are batched for this long", 0.01)
    max_queue_events: int = _doc("events waiting to be sent; more are dropped and counted",
                                 100_000)  # fmt: skip
    replay_batches: int = _doc("batches kept for replay", 10_000)
    lineage_bytes: int = _doc("memory for chunks' tokens and parents (what events carry)",
                              32 * MiB)  # fmt: skip

    def media_map(self) -> dict[str, str]:
        """`media` as {tier: medium}; ConfigError for a malformed entry."""
        parsed: dict[str, str] = {}
        for pair in (p.strip() for p in self.media.split(",")):
            if not pair:
                continue
            tier, sep, name = pair.partition("=")
            if not sep or not tier.strip() or not name.strip():
                raise ConfigError(f"events.media: {pair!r} is not tier=MEDIUM")
            parsed[tier.strip()] = name.strip()
        return parsed

    def validate(self) -> EventsConfig:
        """Raise ConfigError naming the first invalid field; return self when valid."""
        self.media_map()
        if not self.endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"events.endpoint must be a ZeroMQ address, got {self.endpoint!r}")
        if self.batch_interval_s <= 0 or self.max_queue_events < 1 or self.replay_batches < 0:
            raise ConfigError("events: batch_interval_s, max_queue_events must be positive")
        return self


@dataclass(slots=True)
class KVDepotConfig:
    """Everything kvdepot can be told."""

    mode: str = _doc("where the cache lives: embedded (this process) or daemon", "embedded")
    chunk_size_tokens: int = _doc("tokens per chunk (unit of storage and reuse)", 256)
    hash_algorithm: str = _doc(
        "chunk hash: blake2b-128 (multi-tenant safe) or xxh3-128 (trusted, faster)", "blake2b-128"
    )
    partial_match: bool = _doc(
        "reuse the leading tokens of a stored chunk that follows the same prefix", True
    )
    partial_match_min_tokens: int = _doc("shorter partial matches are ignored", 16)
    store_generated: bool = _doc(
        "engine connectors also store the KV of generated tokens, once a request finishes", True
    )
    write_back_queue_chunks: int = _doc("chunks waiting for write-back before drops", 64)
    continuation_index_bytes: int = _doc(
        "byte budget of the continuation index (partial matching); least recent go first",
        64 * MiB,
    )
    codec_plugins: str = _doc("extra codecs: comma-separated 'package.module:Factory'", "")
    metrics_port: int = _doc(
        "embedded store: serve its Prometheus /metrics on this port (0: off; the daemon has "
        "daemon.http_port; vLLM's TP ranks use port + rank)",
        0,
    )
    metrics_host: str = _doc("address the embedded /metrics server binds", "127.0.0.1")
    request_log: str = _doc(
        "one JSON line per request on the kvdepot.requests logger at this level: off, debug, "
        "info or warning",
        "off",
    )
    memory: MemoryConfig = field(default_factory=MemoryConfig, metadata={"doc": "RAM tier"})
    disk: DiskConfig = field(default_factory=DiskConfig, metadata={"doc": "disk tier"})
    daemon: DaemonConfig = field(default_factory=DaemonConfig, metadata={"doc": "daemon"})
    valkey: ValkeyConfig = field(default_factory=ValkeyConfig, metadata={"doc": "Valkey tier"})
    s3: S3Config = field(default_factory=S3Config, metadata={"doc": "S3 tier"})
    blend: BlendConfig = field(default_factory=BlendConfig, metadata={"doc": "CacheBlend"})
    events: EventsConfig = field(default_factory=EventsConfig, metadata={"doc": "KV events"})

    def validate(self) -> KVDepotConfig:
        """Raise ConfigError naming the first invalid field; return self when valid."""
        if not 0 < self.chunk_size_tokens <= MAX_CHUNK_TOKENS:
            raise ConfigError(
                f"chunk_size_tokens must be within 1..{MAX_CHUNK_TOKENS}, "
                f"got {self.chunk_size_tokens}"
            )
        algorithms = [a.value for a in HashAlgorithm]
        if self.hash_algorithm not in algorithms:
            raise ConfigError(f"hash_algorithm {self.hash_algorithm!r}: choose one of {algorithms}")
        if self.request_log not in ("off", "debug", "info", "warning"):
            raise ConfigError(
                f"request_log {self.request_log!r}: choose one of off, debug, info, warning"
            )
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}: choose one of {list(MODES)}")
        d = self.daemon
        if min(d.lease_ttl_s, d.request_timeout_s, d.reservation_ttl_s, d.handshake_timeout_s) <= 0:
            raise ConfigError(
                "daemon.lease_ttl_s, request_timeout_s, reservation_ttl_s and "
                "handshake_timeout_s must be > 0"
            )
        if d.max_clients < 1 or d.max_client_bytes < 0 or self.continuation_index_bytes < 0:
            raise ConfigError(
                "daemon.max_clients must be >= 1; daemon.max_client_bytes and "
                "continuation_index_bytes >= 0"
            )
        if self.partial_match_min_tokens < 1:
            raise ConfigError("partial_match_min_tokens must be >= 1")
        if self.write_back_queue_chunks < 0:
            raise ConfigError("write_back_queue_chunks must be >= 0")
        for section in ("memory", "disk"):
            sub = getattr(self, section)
            if sub.capacity_bytes < 0:
                raise ConfigError(f"{section}.capacity_bytes must be >= 0")
            if sub.eviction_policy not in EVICTION_POLICIES:
                raise ConfigError(
                    f"{section}.eviction_policy {sub.eviction_policy!r}: "
                    f"choose one of {list(EVICTION_POLICIES)}"
                )
        self.disk.validate()
        self.blend.validate()
        if self.events.enabled:
            self.events.validate()
        self.valkey.validate()
        self.s3.validate()
        self._validate_codecs()
        return self

    def _validate_codecs(self) -> None:
        """Each tier's codec must be a known one: built in, installed or in `codec_plugins`."""
        names = {"disk": self.disk.codec, "valkey": self.valkey.codec, "s3": self.s3.codec}
        if all(name == "raw" for name in names.values()):
            return  # nothing to look up (and no plug-in to import)
        from kvdepot.codec.plugins import load_registry

        plugins = [p.strip() for p in self.codec_plugins.split(",") if p.strip()]
        known = load_registry(plugins).names()
        for section, name in names.items():
            if name not in known:
                raise ConfigError(
                    f"{section}.codec {name!r} is not a known codec: choose one of "
                    f"{sorted(known)} (or add a plug-in: codec_plugins)"
                )


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One leaf of the config tree, as the CLI and env loader see it."""

    path: str  # dotted, e.g. "memory.capacity_bytes"
    type: object
    default: object
    doc: str

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.path.replace(".", "_").upper()

    @property
    def flag(self) -> str:
        return "--" + self.path.replace(".", "-").replace("_", "-")


def iter_fields(cls: type = KVDepotConfig, prefix: str = "") -> Iterator[FieldSpec]:
    """Every leaf field of the tree, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from iter_fields(typing.cast(type, kind), f"{prefix}{f.name}.")
        else:
            yield FieldSpec(f"{prefix}{f.name}", kind, f.default, f.metadata.get("doc", ""))


FIELDS = {spec.path: spec for spec in iter_fields()}
_SECTIONS = {path.rsplit(".", 1)[0] for path in FIELDS if "." in path}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from '4096', '512MiB', '1.5GB'."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a size; write e.g. 4096, 512MiB or 2GiB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def _coerce(spec: FieldSpec, value: Any) -> Any:
    """Convert a YAML/env/CLI value to the field's type, with an actionable error."""
    optional = spec.type == str | None
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none")):
        if optional:
            return None
        raise ConfigError(f"{spec.path} cannot be empty")
    try:
        if spec.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if spec.type is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError("expected a whole number")
                return int(value)
            return parse_size(str(value)) if spec.path.endswith("_bytes") else int(str(value))
        if spec.type is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(str(value))
        return str(value)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{spec.path}={value!r}: {exc}") from None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{path}."))
        elif value is None and path in _SECTIONS:
            continue  # a section whose keys are all commented out
        else:
            flat[path] = value
    return flat


def _spec(path: str, source: str) -> FieldSpec:
    if path in FIELDS:
        return FIELDS[path]
    hint = difflib.get_close_matches(path, FIELDS, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(f"unknown setting {path!r} in {source}{suggestion}")


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> KVDepotConfig:
    """Build the config: defaults < YAML file < `KVDEPOT_*` variables in `env` < `overrides`.

    Args:
        path: YAML file with the same nesting as `KVDepotConfig`.
        env: environment mapping; this process's environment by default (`{}` ignores it).
            Unknown KVDEPOT_* names fail.
        overrides: dotted paths to values, e.g. {"disk.path": "/var/cache/kvdepot"}.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as file:  # YAML errors then name the file
                tree = yaml.safe_load(file) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_error(exc)}") from None
        if not isinstance(tree, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        for key, value in _flatten(tree).items():
            values[_spec(key, str(path)).path] = value
    by_env = {spec.env_name: spec for spec in FIELDS.values()}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            if name not in by_env:
                hint = difflib.get_close_matches(name, by_env, n=1)
                suggestion = f"; did you mean {hint[0]}?" if hint else ""
                raise ConfigError(f"unknown environment variable {name}{suggestion}")
            values[by_env[name].path] = value
    for key, value in (overrides or {}).items():
        values[_spec(key.replace("-", "_"), "overrides").path] = value
    config = KVDepotConfig()
    for dotted, value in values.items():
        spec = FIELDS[dotted]
        *parents, leaf = dotted.split(".")
        target: Any = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, _coerce(spec, value))
    _read_secret_files(config)
    return config.validate()


def _yaml_error(exc: yaml.YAMLError) -> str:
    """`exc` as "line L, column C: problem" (1-based), without PyYAML's stream name."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _read_secret_files(config: KVDepotConfig) -> None:
    """Fill `daemon.token` and `valkey.password` from their `*_file` fields, when set."""
    if config.daemon.token_file is not None:
        config.daemon.token = _secret("daemon.token_file", config.daemon.token_file)
    if config.valkey.password_file is not None:
        config.valkey.password = _secret("valkey.password_file", config.valkey.password_file)


def _secret(field_path: str, file_path: str) -> str:
    try:
        return read_secret_file(file_path)
    except ConfigError as exc:
        raise ConfigError(f"{field_path}: {exc}") from None


def redacted(config: KVDepotConfig) -> dict[str, Any]:
    """The config as a JSON-ready tree, each set secret (`SECRET_FIELDS`) shown as '***'."""
    tree = dataclasses.asdict(config)
    for dotted in SECRET_FIELDS:
        *parents, leaf = dotted.split(".")
        section = tree
        for parent in parents:
            section = section[parent]
        if section[leaf]:
            section[leaf] = REDACTED
    return tree
