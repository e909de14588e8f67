"""Codec plug-ins: entry points and import paths, collisions, broken plug-ins skipped."""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvdepot.codec import (
    ENTRY_POINT_GROUP,
    HEADER_NBYTES,
    Codec,
    CodecRegistry,
    LosslessCodec,
    decode_chunk,
    default_registry,
    encode_chunk,
    load_registry,
)
from kvdepot.errors import ConfigError, UnknownCodec
from kvdepot.layout import DType

EXAMPLE = Path(__file__).parent / "plugin_example"
EXAMPLE_MODULE = "kvdepot_fp16_codec"
EXAMPLE_FACTORY = f"{EXAMPLE_MODULE}:Fp16DowncastCodec"
BUILTIN_NAMES = {"raw", "lossless", "int8", "fp8", "cachegen"}


def to_blob(array: np.ndarray, dtype: DType, codec: Codec) -> bytes:
    chunk = encode_chunk(array, dtype, codec).sealed()
    buf = bytearray(chunk.nbytes)
    chunk.write_into(memoryview(buf))
    return bytes(buf)


class SitePath:
    """A temporary folder on sys.path where fake installed distributions are written."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def install(self, dist: str, entry_points: dict[str, str], module: str = "") -> None:
        """A distribution `dist` declaring `entry_points` (name -> value) of our group."""
        info = self.root / f"{dist}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        if module:
            (self.root / f"{dist}_mod.py").write_text(module)
        importlib.invalidate_caches()

    def install_example(self) -> None:
        """The example package of docs/codecs.md, laid out as pip would install it."""
        shutil.copytree(EXAMPLE / EXAMPLE_MODULE, self.root / EXAMPLE_MODULE, dirs_exist_ok=True)
        self.install("kvdepot_fp16_codec", {"fp16-downcast": EXAMPLE_FACTORY})


def _forget_modules(prefixes: tuple[str, ...]) -> None:
    for name in [m for m in sys.modules if m.startswith(prefixes)]:
        del sys.modules[name]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SitePath]:
    root = tmp_path / "site"
    root.mkdir()
    sys.path.insert(0, str(root))
    try:
        yield SitePath(root)
    finally:
        sys.path.remove(str(root))
        _forget_modules((EXAMPLE_MODULE, "broken_", "bad_", "twin_", "other_"))


def assert_example_round_trips(registry: CodecRegistry) -> None:
    codec = registry.by_name("fp16-downcast")
    assert codec.codec_id == 1000
    assert not codec.is_lossless
    kv = np.random.default_rng(0).standard_normal((2, 2, 16, 2, 8)).astype(np.float32)
    dtype, got = decode_chunk(to_blob(kv, DType.FLOAT32, codec), registry)
    assert dtype is DType.FLOAT32
    assert got.shape == kv.shape
    np.testing.assert_allclose(got, kv, rtol=1e-3, atol=1e-4)
    assert len(to_blob(kv, DType.FLOAT32, codec)) < 0.6 * (HEADER_NBYTES + kv.nbytes)


def test_example_plugin_loads_through_its_entry_point(site: SitePath) -> None:
    site.install_example()
    registry = load_registry()
    assert set(registry.names()) == BUILTIN_NAMES | {"fp16-downcast"}
    assert_example_round_trips(registry)
    # A reader without the plug-in sees an unknown codec (a miss), not garbage.
    blob = to_blob(np.ones((2, 2, 4, 1, 4), np.float32), DType.FLOAT32, registry.by_id(1000))
    with pytest.raises(UnknownCodec):
        decode_chunk(blob, default_registry())


def test_entry_points_can_be_turned_off(site: SitePath) -> None:
    site.install_example()
    assert set(load_registry(entry_points=False).names()) == BUILTIN_NAMES


def test_example_plugin_loads_through_an_import_path(site: SitePath) -> None:
    shutil.copytree(EXAMPLE / EXAMPLE_MODULE, site.root / EXAMPLE_MODULE)
    assert_example_round_trips(load_registry([EXAMPLE_FACTORY]))


def test_the_same_plugin_installed_and_configured_registers_once(site: SitePath) -> None:
    site.install_example()
    registry = load_registry([EXAMPLE_FACTORY])
    assert registry.names().count("fp16-downcast") == 1


@pytest.mark.slow
def test_example_package_installs_with_pip(tmp_path: Path) -> None:
    target, source = tmp_path / "target", tmp_path / "source"
    shutil.copytree(EXAMPLE, source)  # a build writes into the source folder; not into ours
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    sys.path.insert(0, str(target))
    try:
        assert_example_round_trips(load_registry())
    finally:
        sys.path.remove(str(target))
        _forget_modules((EXAMPLE_MODULE,))


BROKEN_MODULE = """
class Raises:
    def __init__(self):
        raise RuntimeError("plug-in exploded")

class NotACodec:
    name = "nope"

not_callable = 42
"""


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("broken_missing_module:Codec", "ModuleNotFoundError"),
        ("broken_mod:NoSuchFactory", "AttributeError"),
        ("broken_mod:Raises", "plug-in exploded"),
        ("broken_mod:NotACodec", "not a Codec"),
        ("broken_mod:not_callable", "names a int"),
    ],
    ids=["no-module", "no-attribute", "factory-raises", "not-a-codec", "not-callable"],
)
def test_broken_entry_point_is_logged_and_skipped(
    site: SitePath, caplog: pytest.LogCaptureFixture, value: str, message: str
) -> None:
    site.install("broken", {"bad": value}, module=BROKEN_MODULE)
    site.install_example()
    with caplog.at_level(logging.ERROR, logger="kvdepot.codec.plugins"):
        registry = load_registry()
    assert set(registry.names()) == BUILTIN_NAMES | {"fp16-downcast"}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "'bad'" in errors[0]
    assert "skipped" in errors[0]
    assert message in errors[0]


@pytest.mark.parametrize(
    "path", ["no_colon_here", ":Factory", "module:", "broken_missing_module:Codec"]
)
def test_broken_import_path_is_logged_and_skipped(
    caplog: pytest.LogCaptureFixture, path: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="kvdepot.codec.plugins"):
        registry = load_registry([path], entry_points=False)
    assert set(registry.names()) == BUILTIN_NAMES
    assert any(path in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


COLLIDING_MODULE = """
from kvdepot_fp16_codec import Fp16DowncastCodec

class SameIdAsLossless(Fp16DowncastCodec):
    name = "other-name"
    codec_id = 2

class SameNameAsInt8(Fp16DowncastCodec):
    name = "int8"
    codec_id = 2000

class TwinOfExample(Fp16DowncastCodec):
    name = "fp16-twin"
"""


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("twin_mod:SameIdAsLossless", "other-name"),
        ("twin_mod:SameNameAsInt8", "'int8'"),
        ("twin_mod:TwinOfExample", "id 1000"),
    ],
    ids=["id-of-a-builtin", "name-of-a-builtin", "id-of-another-plugin"],
)
def test_colliding_plugin_is_a_config_error(site: SitePath, factory: str, match: str) -> None:
    site.install_example()
    site.install("twin", {}, module=COLLIDING_MODULE)
    with pytest.raises(ConfigError, match=match):
        load_registry([factory])
    site.install("other", {"twin": factory})
    with pytest.raises(ConfigError, match=match):
        load_registry()


def test_default_registry_holds_every_builtin_with_its_stable_id() -> None:
    registry = default_registry()
    ids = {name: registry.by_name(name).codec_id for name in registry.names()}
    assert ids == {"raw": 1, "lossless": 2, "int8": 3, "fp8": 4, "cachegen": 5}
    assert isinstance(registry.by_id(2), LosslessCodec)
    assert all(isinstance(registry.by_name(n), Codec) for n in registry.names())
