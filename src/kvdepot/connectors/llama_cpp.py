"""llama.cpp (`llama-cpp-python`) with kvdepot: a prompt's prefix KV reused across processes,
restarts and machines.

Runs in the engine process (the one holding `llama_cpp.Llama`), over any `ChunkStore` (the
embedded store, or the daemon's client: `open_cache`). `KVDepotLlama` wraps a `Llama`:
- Before a completion, the prompt's longest cached prefix (whole chunks, and a partial chunk
  by partial matching) beyond what the context already holds is read, rebuilt into a llama.cpp
  sequence state (`kvdepot.connectors.llama_state`) and restored into sequence 0 with
  `llama_state_seq_set_data`. `Llama` is then told it holds those tokens but the last, so its
  own prefix matching evaluates the prompt from the last restored token on: logits are not
  part of a state, so that token is evaluated again.
- After it, the sequence's state is read (`llama_state_seq_get_data`), parsed into rows per
  token and stored as chunks (`[layers, 2, tokens, 1, row_bytes]` of raw bytes), so prompts
  that share a prefix share its chunks; generated tokens are stored too (a chat's next turn
  starts with the answer).
- Keys carry the model file's sha256, llama.cpp's version (state blobs are not compatible
  across versions), the state format (KV types, V layout, layers, row size: probed from a real
  blob of this context when the wrapper is made) and the context settings that change KV
  values (RoPE base and scale, YaRN). Any difference is another namespace: a miss.

Failure policy: the cache never costs the answer. A store that fails is logged and skipped;
a state llama.cpp refuses to restore is a miss (the sequence is cleared and the whole prompt
evaluated); a probe blob that does not parse turns the cache off for this `Llama`, once,
with a warning that says why.

Intel CPUs with AMX: llama.cpp's AMX matmul crashes on the first decode on some of these
machines (llama-cpp-python 0.3.36); `load_llama` turns llama.cpp's extra buffer types off,
which `Llama()` does not expose.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvdepot.config import KVDepotConfig, load_config
from kvdepot.connectors.llama_state import StateFormat, StateFormatError, build, parse
from kvdepot.deployment import open_cache
from kvdepot.engine import CacheEngine, LoadInfo
from kvdepot.keys import HashAlgorithm
from kvdepot.layout import DType, KVLayout
from kvdepot.logutil import RateLimitedLog
from kvdepot.records import RequestLog, RequestRecord
from kvdepot.store import ChunkStore

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)
SEQ = 0
"""The sequence `Llama` uses."""


@contextmanager
def _no_extra_buffer_types() -> Iterator[None]:
    """While loading: llama.cpp's extra buffer types off (its AMX matmul among them)."""
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def params() -> Any:
        p = original()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def load_llama(model_path: str | os.PathLike[str], **kwargs: Any) -> Llama:
    """`llama_cpp.Llama(model_path, **kwargs)` without llama.cpp's extra buffer types (the
    AMX path that crashes on some Intel CPUs); quiet unless `verbose=True` is given."""
    from llama_cpp import Llama

    kwargs.setdefault("verbose", False)
    with _no_extra_buffer_types():
        return Llama(model_path=str(model_path), **kwargs)


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a model file (remembered per path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


class KVDepotLlama:
    """A `llama_cpp.Llama` whose prompt prefixes come from (and go to) kvdepot."""

    def __init__(
        self,
        llama: Llama,
        store: ChunkStore,
        *,
        chunk_size_tokens: int = 256,
        hash_algorithm: HashAlgorithm = HashAlgorithm.BLAKE2B_128,
        store_generated: bool = True,
        request_log: str = "off",
        names: Sequence[str] = (),
    ) -> None:
        """Probe this context's state format (one token evaluated, then cleared) and make
        the cache engine keyed by model file, llama.cpp version, format and KV settings."""
        self.llama = llama
        self.store_generated = store_generated
        self._log = RateLimitedLog(logger)
        self.format = self._probe()
        self.engine: CacheEngine | None = None
        if self.format is not None:
            layout = KVLayout(self.format.n_layer, 1, self.format.row_bytes, DType.UINT8)
            self.engine = CacheEngine(
                store, layout, self.fingerprint(), chunk_size_tokens=chunk_size_tokens,
                hash_algorithm=hash_algorithm, names=names,
            )  # fmt: skip
            self.engine.announce(names or [Path(str(llama.model_path)).name])
        self.requests = RequestLog(store.metrics, request_log)

    @classmethod
    def open(
        cls,
        model_path: str | os.PathLike[str],
        config: KVDepotConfig | None = None,
        *,
        store: ChunkStore | None = None,
        **llama_kwargs: Any,
    ) -> KVDepotLlama:
        """Load `model_path` (`load_llama`) over the store `config` names (`open_cache`)."""
        config = config if config is not None else load_config()
        llama = load_llama(model_path, **llama_kwargs)
        return cls(
            llama, store if store is not None else open_cache(config),
            chunk_size_tokens=config.chunk_size_tokens,
            hash_algorithm=HashAlgorithm(config.hash_algorithm),
            store_generated=config.store_generated, request_log=config.request_log,
        )  # fmt: skip

    # ---- keys ----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Model file, llama.cpp version, state format, KV-changing context settings."""
        import llama_cpp

        assert self.format is not None
        p = self.llama.context_params
        rope = (f"rope{p.rope_freq_base:g}x{p.rope_freq_scale:g}-yarn{p.yarn_ext_factor:g}"
                f",{p.yarn_attn_factor:g},{p.yarn_beta_fast:g},{p.yarn_beta_slow:g}"
                f",{p.yarn_orig_ctx}")  # fmt: skip
        model = file_sha256(self.llama.model_path)
        return f"llama.cpp-{llama_cpp.__version__}:{model}:{self.format.key}:{rope}"

    # ---- llama.cpp's sequence state ------------------------------------------------------

    @property
    def _ctx(self) -> Any:
        """The raw `llama_context *` (llama-cpp-python keeps it on its `_ctx` wrapper)."""
        return self.llama._ctx.ctx  # noqa: SLF001

    def _state(self) -> memoryview:
        """The sequence's state blob (a view of the buffer llama.cpp wrote it into)."""
        import llama_cpp.llama_cpp as low

        size = low.llama_state_seq_get_size(self._ctx, SEQ)
        buffer = (ctypes.c_uint8 * size)()
        written = low.llama_state_seq_get_data(self._ctx, buffer, size, SEQ)
        return memoryview(buffer).cast("B")[:written]

    def _restore(self, blob: np.ndarray) -> bool:
        """Restore a state blob (uint8 array, handed over without a copy)."""
        import llama_cpp.llama_cpp as low

        src = (ctypes.c_uint8 * blob.size).from_buffer(blob.data)
        return int(low.llama_state_seq_set_data(self._ctx, src, blob.size, SEQ)) == blob.size

    def _forget(self, start: int = 0) -> None:
        """Drop the sequence's cells from position `start` on; `Llama` holds `start` tokens."""
        import llama_cpp.llama_cpp as low

        low.llama_memory_seq_rm(low.llama_get_memory(self._ctx), SEQ, start, -1)
        self.llama.n_tokens = min(self.llama.n_tokens, start)

    def _probe(self) -> StateFormat | None:
        """This context's state format, from a real blob of one evaluated token."""
        llama = self.llama
        try:
            llama.reset()
            self._forget()
            llama.eval([llama.token_bos() if llama.token_bos() >= 0 else 0])
            fmt, _ = parse(self._state())
        except StateFormatError as exc:
            logger.warning("kvdepot: llama.cpp's state format is not one kvdepot knows (%s): "
                           "no caching for this model", exc)  # fmt: skip
            return None
        finally:
            self._forget()
            llama.reset()
        return fmt

    # ---- the two halves ------------------------------------------------------------------

    def held_tokens(self, tokens: Sequence[int]) -> int:
        """Leading tokens of `tokens` the context already holds (evaluated)."""
        held = self.llama.input_ids[: self.llama.n_tokens]
        n = 0
        for a, b in zip(held, tokens, strict=False):
            if a != b:
                break
            n += 1
        return n

    def prepare(self, tokens: Sequence[int], info: LoadInfo | None = None) -> int:
        """Restore the longest cached prefix of `tokens` longer than what the context holds;
        returns the tokens restored (0: none). `Llama` then evaluates the rest (from the last
        restored token, whose logits a state does not carry)."""
        if self.engine is None or len(tokens) < 2:
            return 0
        held = self.held_tokens(tokens)
        assert self.format is not None
        try:
            num_cached = self.engine.lookup(tokens)
            if num_cached <= held + 1:
                return 0
            # The chunks straight from the store's memory into the blob: one copy.
            with self.engine.retrieve_views(tokens[:num_cached], info=info) as pieces:
                num = sum(int(piece.shape[2]) for piece in pieces)
                if num <= held + 1:
                    return 0
                flat = [p.numpy().reshape(p.shape[0], 2, p.shape[2], -1) for p in pieces]
                blob = build(self.format, flat)
        except Exception as exc:  # the cache never costs the answer
            self._log.warning("load", "kvdepot: lookup or read failed, a miss: %s", exc)
            return 0
        self._forget()
        if not self._restore(blob):
            self._log.warning("restore", "kvdepot: llama.cpp refused a restored state: a miss")
            self._forget()
            self.llama.reset()
            return 0
        self.llama.input_ids[:num] = np.asarray(tokens[:num])
        self.llama.n_tokens = num - 1  # the last one is evaluated again, for its logits
        return num

    def save(self, max_tokens: int | None = None) -> int:
        """Store the sequence's KV (the tokens the context holds, at most `max_tokens`);
        returns the tokens newly stored."""
        if self.engine is None or self.llama.n_tokens == 0:
            return 0
        held = self.llama.n_tokens
        n = held if max_tokens is None else min(held, max_tokens)
        tokens = self.llama.input_ids[:n].tolist()
        try:
            # A prompt stored before (a repeat, a restored context) needs no state read: the
            # whole state is copied out and parsed otherwise (~0.1 s per 2K tokens).
            keys = self.engine.chunk_keys(tokens, include_partial=True)
            if all(self.engine.backend.contains(keys)):
                return 0
            fmt, kv = parse(self._state())
            if fmt != self.format or kv.shape[2] != held:
                raise StateFormatError(f"a state of {kv.shape[2]} tokens in {fmt.key}")
            kv = kv[:, :, :n]
            layered = torch.from_numpy(np.ascontiguousarray(kv)).reshape(kv.shape[0], 2, n, 1, -1)
            return self.engine.store(tokens, layered, store_partial=True)
        except Exception as exc:  # the cache never costs the answer
            self._log.warning("save", "kvdepot: storing the state failed, skipped: %s", exc)
            return 0

    # ---- completions ---------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.llama.tokenize(prompt.encode(), add_bos=True, special=True))
        return list(prompt)

    def create_completion(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """`Llama.create_completion` with kvdepot before and after (not streamed)."""
        if kwargs.get("stream"):
            raise ValueError("KVDepotLlama.create_completion does not stream")
        tokens = self.tokenize(prompt)
        start = time.perf_counter()
        info = LoadInfo()
        restored = self.prepare(tokens, info)
        load_s = time.perf_counter() - start
        out = self.llama.create_completion(tokens, **kwargs)
        self._finish(tokens, restored, load_s, info)
        return out

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 32) -> list[int]:
        """Greedy token ids after `prompt` (at most `max_tokens`, ending at end of text)."""
        tokens = self.tokenize(prompt)
        start = time.perf_counter()
        info = LoadInfo()
        restored = self.prepare(tokens, info)
        load_s = time.perf_counter() - start
        out: list[int] = []
        # reset=True (the default) lets Llama match its context's prefix: the restored one
        for token in self.llama.generate(tokens, top_k=1, top_p=1.0, temp=0.0,
                                         repeat_penalty=1.0):  # fmt: skip
            if self.llama.token_eos() == token:
                break
            out.append(int(token))
            if len(out) >= max_tokens:
                break
        self._finish(tokens, restored, load_s, info)
        return out

    def _finish(self, tokens: list[int], restored: int, load_s: float, info: LoadInfo) -> None:
        start = time.perf_counter()
        stored = self.save(None if self.store_generated else len(tokens))
        save_s = time.perf_counter() - start
        cached = max(restored - 1, 0)  # the last restored token is evaluated again
        bytes_per_token = self.engine.layout.bytes_per_token if self.engine else 0
        self.requests.report(RequestRecord(
            "llama.cpp", f"llama-{id(self)}-{time.monotonic_ns()}", len(tokens), cached,
            len(tokens) - cached, stored, 0.0, load_s, save_s, restored * bytes_per_token,
            stored * bytes_per_token, 0.0, cached_by_tier=info.by_tier(0, restored),
        ))  # fmt: skip
