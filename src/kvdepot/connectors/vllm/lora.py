"""LoRA adapters' identity, for the keys of LoRA requests' KV.

Runs in vLLM's scheduler process (EngineCore). A LoRA request's KV depends on its adapter's
weights, so its keys carry a fingerprint of those weights (`adapter_fingerprint`): the files
that hold them (and the config that scales them), never the adapter's name or integer id,
which a deployment may reuse for other weights (vLLM's `load_inplace`). Two adapters with the
same files share KV wherever they live; an adapter whose files changed gets new keys.

Invariants:
- Base-model KV is never served to a LoRA request, nor LoRA KV to a base request or to
  another adapter: the fingerprint enters the request's salt (`metadata.tenant_salt`).
- An adapter whose files cannot be read from this process (no local folder, unreadable) has
  no fingerprint: its requests are served by vLLM alone, never cached under a guessed key.
- Fingerprints are remembered per folder while the files' names, sizes and modification times
  stay the same: a request costs a few `stat` calls, a new or changed adapter one read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import xxhash

ADAPTER_FILES = ("adapter_config.json",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def adapter_files(folder: Path) -> list[Path]:
    """The files an adapter's KV depends on: its config and weights, sorted by name."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and (path.name in ADAPTER_FILES or path.suffix in WEIGHT_SUFFIXES)
    )


def adapter_fingerprint(folder: Path) -> str:
    """xxh3-128 of the adapter's config and weight files (names and bytes)."""
    files = adapter_files(folder)
    if not any(path.suffix in WEIGHT_SUFFIXES for path in files):
        raise FileNotFoundError(f"no adapter weights in {folder}")
    digest = xxhash.xxh3_128()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


class AdapterFingerprints:
    """Fingerprints of the adapters LoRA requests name, remembered per folder."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[tuple[str, int, int], ...], str]] = {}

    def of(self, lora_request: Any) -> str | None:
        """The fingerprint of a vLLM `LoRARequest`'s adapter; None if its files are not here."""
        path = getattr(lora_request, "lora_path", "") or ""
        folder = Path(path)
        if not path or not folder.is_dir():
            return None
        try:
            stats = tuple(
                (p.name, (s := p.stat()).st_size, s.st_mtime_ns) for p in adapter_files(folder)
            )
            known = self._known.get(folder)
            if known is not None and known[0] == stats:
                return known[1]
            fingerprint = adapter_fingerprint(folder)
        except OSError:
            return None
        self._known[folder] = (stats, fingerprint)
        return fingerprint
