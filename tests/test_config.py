"""Config tree: defaults, YAML < env < overrides precedence, value parsing, actionable errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kvdepot import config
from kvdepot.config import FIELDS, KVDepotConfig, load_config
from kvdepot.errors import ConfigError
from kvdepot.keys import HashAlgorithm
from kvdepot.tiers.policy import POLICIES

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def yaml_file(tmp_path: Path) -> Any:
    """Writes its argument to a fresh YAML file and returns the path."""

    def write(text: str) -> Path:
        path = tmp_path / "kvdepot.yaml"
        path.write_text(text)
        return path

    return write


def value_at(cfg: KVDepotConfig, dotted: str) -> Any:
    target: Any = cfg
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


def test_defaults_validate() -> None:
    cfg = KVDepotConfig()
    assert cfg.validate() is cfg
    assert load_config() == cfg
    assert load_config(env={}, overrides={}) == cfg
    assert cfg.disk.path is None
    for spec in FIELDS.values():
        assert value_at(cfg, spec.path) == spec.default


def test_yaml_then_env_then_overrides(yaml_file: Any) -> None:
    path = yaml_file(
        "chunk_size_tokens: 128\n"
        "memory:\n  capacity_bytes: 1GiB\n  prefault: false\n"
        "disk:\n  capacity_bytes: 3GiB\n  path: /from/yaml\n"
    )
    env = {
        "KVDEPOT_CHUNK_SIZE_TOKENS": "64",
        "KVDEPOT_MEMORY_CAPACITY_BYTES": "2GiB",
        "KVDEPOT_DISK_PATH": "/from/env",
        "PATH": "/usr/bin",  # not ours: ignored
        "KVDEPOTX": "1",  # no underscore after the prefix: not ours either
    }
    overrides = {"chunk_size_tokens": 32, "disk.path": "/from/overrides"}
    cfg = load_config(path, env=env, overrides=overrides)
    assert cfg.chunk_size_tokens == 32  # overrides beat env and file
    assert cfg.disk.path == "/from/overrides"
    assert cfg.memory.capacity_bytes == 2 * GiB  # env beats file
    assert cfg.disk.capacity_bytes == 3 * GiB  # file alone
    assert cfg.memory.prefault is False
    assert cfg.disk.fsync is True  # untouched default
    assert cfg.write_back_queue_chunks == FIELDS["write_back_queue_chunks"].default

    assert load_config(path, env=env).chunk_size_tokens == 64
    assert load_config(path).chunk_size_tokens == 128


def test_yaml_accepts_dashed_keys_and_empty_file(yaml_file: Any) -> None:
    cfg = load_config(yaml_file("chunk-size-tokens: 16\nmemory:\n  capacity-bytes: 1MiB\n"))
    assert cfg.chunk_size_tokens == 16
    assert cfg.memory.capacity_bytes == MiB
    assert load_config(yaml_file("")) == KVDepotConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MiB),
        ("2GiB", 2 * GiB),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 * GiB // 2),
        ("64KiB", 64 * 1024),
        ("1TB", 10**12),
        (" 2 gib ", 2 * GiB),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(yaml_file: Any, text: str | int, expected: int) -> None:
    assert load_config(overrides={"memory.capacity_bytes": text}).memory.capacity_bytes == expected
    env = {"KVDEPOT_DISK_CAPACITY_BYTES": str(text)}
    assert load_config(env=env).disk.capacity_bytes == expected
    path = yaml_file(f"memory:\n  capacity_bytes: {text}\n")
    cfg = load_config(path)
    assert cfg.memory.capacity_bytes == expected
    assert type(cfg.memory.capacity_bytes) is int


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        (" off ", False),
    ],
)
def test_bools_from_strings(text: str, expected: bool) -> None:
    cfg = load_config(env={"KVDEPOT_MEMORY_PREFAULT": text}, overrides={"disk.fsync": text})
    assert cfg.memory.prefault is expected
    assert cfg.disk.fsync is expected


@pytest.mark.parametrize("text", ["none", "None", "NONE", ""])
def test_disk_path_none_disables(yaml_file: Any, text: str) -> None:
    assert load_config(overrides={"disk.path": "/var/cache"}).disk.path == "/var/cache"
    assert load_config(env={"KVDEPOT_DISK_PATH": text}).disk.path is None
    env = {"KVDEPOT_DISK_PATH": "/var/cache"}
    assert load_config(env=env, overrides={"disk.path": text}).disk.path is None
    assert load_config(yaml_file(f"disk:\n  path: '{text}'\n")).disk.path is None
    assert load_config(yaml_file("disk:\n  path: null\n")).disk.path is None


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("memory:\n  capacity_byte: 1GiB\n", "memory.capacity_bytes"),
        ("chunk_size_token: 64\n", "chunk_size_tokens"),
        ("disk:\n  fsyn: true\n", "disk.fsync"),
    ],
)
def test_unknown_yaml_key_suggests_the_near_miss(yaml_file: Any, text: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean '{re.escape(hint)}'"):
        load_config(yaml_file(text))


def test_unknown_override_suggests_the_near_miss() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'disk\.path'"):
        load_config(overrides={"disk.pth": "/x"})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(overrides={"completely.unrelated": 1})


def test_unknown_env_variable_is_rejected() -> None:
    with pytest.raises(ConfigError, match="KVDEPOT_COMPLETELY_UNRELATED"):
        load_config(env={"KVDEPOT_COMPLETELY_UNRELATED": "1"})
    with pytest.raises(ConfigError):
        load_config(env={"KVDEPOT_MEMORY_CAPACITY_BYTE": "1GiB"})


def test_unknown_env_variable_suggests_the_near_miss() -> None:
    with pytest.raises(ConfigError, match=r"did you mean .*KVDEPOT_MEMORY_CAPACITY_BYTES"):
        load_config(env={"KVDEPOT_MEMORY_CAPACITY_BYTE": "1GiB"})


def test_empty_yaml_section_is_accepted(yaml_file: Any) -> None:
    assert load_config(yaml_file("memory:\n  # capacity_bytes: 1GiB\n")) == KVDepotConfig()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"memory.capacity_bytes": -1}, "memory.capacity_bytes"),
        ({"disk.capacity_bytes": "-1"}, "disk.capacity_bytes"),
        ({"memory.eviction_policy": "fifo"}, "memory.eviction_policy"),
        ({"disk.eviction_policy": "LRU"}, "disk.eviction_policy"),
        ({"hash_algorithm": "md5"}, "hash_algorithm"),
        ({"chunk_size_tokens": 0}, "chunk_size_tokens"),
        ({"chunk_size_tokens": "ten"}, "chunk_size_tokens"),
        ({"chunk_size_tokens": True}, "chunk_size_tokens"),
        ({"write_back_queue_chunks": -1}, "write_back_queue_chunks"),
        ({"memory.capacity_bytes": "abc"}, "memory.capacity_bytes"),
        ({"memory.capacity_bytes": "12 parsecs"}, "memory.capacity_bytes"),
        ({"memory.capacity_bytes": None}, "memory.capacity_bytes"),
        ({"memory.prefault": "maybe"}, "memory.prefault"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_invalid_values_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(overrides=overrides)


def test_invalid_values_from_env_and_yaml_name_the_field(yaml_file: Any) -> None:
    with pytest.raises(ConfigError, match=r"memory\.capacity_bytes"):
        load_config(env={"KVDEPOT_MEMORY_CAPACITY_BYTES": "abc"})
    with pytest.raises(ConfigError, match=r"disk\.eviction_policy"):
        load_config(yaml_file("disk:\n  eviction_policy: random\n"))


@pytest.mark.parametrize(
    "text", ["- chunk_size_tokens: 64\n", "just a string\n", "42\n", "key: [unclosed\n"]
)
def test_yaml_that_is_not_a_mapping_is_rejected(yaml_file: Any, text: str) -> None:
    path = yaml_file(text)
    with pytest.raises(ConfigError, match=r"kvdepot\.yaml"):
        load_config(path)


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        load_config(tmp_path / "absent.yaml")


def test_every_field_is_documented_and_addressable() -> None:
    specs = list(FIELDS.values())
    assert len(specs) >= 10
    assert all(spec.doc.strip() for spec in specs)
    env_names = [spec.env_name for spec in specs]
    flags = [spec.flag for spec in specs]
    assert len(set(env_names)) == len(specs)
    assert len(set(flags)) == len(specs)
    assert all(name.startswith("KVDEPOT_") and name.isupper() for name in env_names)
    assert all(flag.startswith("--") and "_" not in flag and "." not in flag for flag in flags)
    assert FIELDS["memory.capacity_bytes"].env_name == "KVDEPOT_MEMORY_CAPACITY_BYTES"
    assert FIELDS["memory.capacity_bytes"].flag == "--memory-capacity-bytes"


@pytest.mark.parametrize("path", list(FIELDS))
def test_every_field_round_trips_its_default_through_env(path: str) -> None:
    spec = FIELDS[path]
    text = "none" if spec.default is None else str(spec.default)
    assert value_at(load_config(env={spec.env_name: text}), path) == spec.default


def test_eviction_policies_match_the_policy_registry() -> None:
    assert sorted(config.EVICTION_POLICIES) == sorted(POLICIES)
    assert len(set(config.EVICTION_POLICIES)) == len(config.EVICTION_POLICIES)
    for name in POLICIES:
        overrides = {"memory.eviction_policy": name, "disk.eviction_policy": name}
        assert load_config(overrides=overrides).disk.eviction_policy == name


def test_every_hash_algorithm_is_accepted() -> None:
    for algorithm in HashAlgorithm:
        cfg = load_config(overrides={"hash_algorithm": algorithm.value})
        assert HashAlgorithm(cfg.hash_algorithm) is algorithm
