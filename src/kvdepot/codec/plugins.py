"""Where codecs come from: the built-ins, installed plug-ins and configured import paths.

Runs in every process that builds a registry (once, at start-up). A plug-in is a zero-argument
callable (a class or a factory function) that returns a `Codec`. It is found either

- through the entry-point group `kvdepot.codecs` of an installed distribution, e.g. in its
  `pyproject.toml`: `[project.entry-points."kvdepot.codecs"] fp16 = "mypkg.codec:Fp16Codec"`;
- or through an import path string "package.module:Factory" (e.g. from the config).

Invariants: a plug-in that fails to import, construct or type-check is logged as an error and
skipped, so a broken third-party package never takes the cache down (chunks it wrote then read
as `UnknownCodec`, i.e. misses); a plug-in whose id or name collides with a codec already
registered is a `ConfigError`, because two codecs sharing an id would decode each other's
chunks into garbage.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points as installed_entry_points

from kvdepot.codec.base import Codec, CodecRegistry
from kvdepot.codec.cachegen import CacheGenCodec
from kvdepot.codec.fp8 import Fp8Codec
from kvdepot.codec.int8 import Int8Codec
from kvdepot.codec.lossless import LosslessCodec
from kvdepot.codec.raw import RawCodec
from kvdepot.errors import ConfigError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvdepot.codecs"


def builtin_codecs() -> list[Codec]:
    """New instances of the codecs that ship with kvdepot, with their default settings."""
    return [RawCodec(), LosslessCodec(), Int8Codec(), Fp8Codec(), CacheGenCodec()]


def default_registry() -> CodecRegistry:
    """A new registry holding the built-in codecs (no plug-ins)."""
    return CodecRegistry(builtin_codecs())


def resolve_import_path(path: str) -> object:
    """The object named by "package.module:Attribute" (dots allowed after the colon)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"codec import path {path!r} must look like 'package.module:Factory'")
    target: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def make_codec(factory: object, source: str) -> Codec:
    """Call a plug-in's factory and check that the result is a usable codec."""
    if not callable(factory):
        raise ConfigError(f"codec plug-in {source} names a {type(factory).__name__}, not a factory")
    codec = factory()
    if not isinstance(codec, Codec):
        raise ConfigError(f"codec plug-in {source} returned {type(codec).__name__}, not a Codec")
    if not isinstance(codec.name, str) or not codec.name:
        raise ConfigError(f"codec plug-in {source}: name must be a non-empty str")
    if not isinstance(codec.codec_id, int) or isinstance(codec.codec_id, bool):
        raise ConfigError(f"codec plug-in {source}: codec_id must be an int")
    return codec


def load_registry(import_paths: Sequence[str] = (), entry_points: bool = True) -> CodecRegistry:
    """The built-in codecs plus plug-ins from installed entry points and `import_paths`.

    Args:
        import_paths: "package.module:Factory" strings, registered after the entry points.
        entry_points: also load every plug-in of the `kvdepot.codecs` entry-point group.

    Raises:
        ConfigError: a plug-in's codec id or name is already registered.
    """
    registry = default_registry()
    factories: list[tuple[str, Callable[[], object]]] = []
    if entry_points:
        found = sorted(installed_entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        factories += [(f"entry point {e.name!r} ({e.value})", e.load) for e in found]
    factories += [
        (f"import path {p!r}", functools.partial(resolve_import_path, p)) for p in import_paths
    ]
    loaded: list[object] = []
    for source, load in factories:
        try:
            factory = load()
            if any(factory is f for f in loaded):
                continue  # the same plug-in named twice (installed and configured)
            codec = make_codec(factory, source)
        except Exception as exc:  # a broken plug-in must not break the cache
            logger.error(
                "codec plug-in %s failed to load and is skipped: %s: %s",
                source, type(exc).__name__, exc,
            )  # fmt: skip
            continue
        loaded.append(factory)
        registry.register(codec)
        logger.info("codec plug-in %s registered %r (id %d)", source, codec.name, codec.codec_id)
    return registry
