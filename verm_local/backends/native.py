"""llama.cpp through llama-cpp-python's public low-level bindings: a loaded model, a
context with its KV streams and batch, and llama.cpp's logs routed into `logging`.

The high-level `llama_cpp.Llama` is not used: it cannot load weights without llama.cpp's
extra buffer types (the AMX and repacked layouts, `use_extra_bufts`), has no way to give a
context several KV streams, and its internals are private. Everything here is a thin,
typed wrapper over `llama_cpp.llama_*` and `llama_cpp.mtmd_cpp`."""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..crash import ABORT_PREFIX, native_line, note_state
from ..errors import ModelError, VermError
from ..hardware import llama_library

log = logging.getLogger("verm_local.llama_cpp")

# ggml_log_level (ggml.h: NONE, DEBUG, INFO, WARN, ERROR; CONT continues the previous
# line at its level) -> logging level.
_LEVELS = {
    0: logging.CRITICAL,
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_state: dict[str, Any] = {"init": False, "last": logging.DEBUG, "callback": None, "errors": []}


def _bindings() -> tuple[Any, Any]:
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    return llama_cpp, mtmd


def init() -> tuple[Any, Any]:
    """Initialise llama.cpp once per process: backends loaded, its logs (and mtmd's) sent
    to the `verm_local.llama_cpp` logger at DEBUG (INFO and below) or their own level.
    Returns the bindings (llama_cpp, mtmd_cpp)."""
    lc, mtmd = _bindings()
    if _state["init"]:
        return lc, mtmd

    @lc.llama_log_callback
    def _forward(level: int, text: bytes, _user: Any) -> None:
        lvl = _state["last"] if level == 5 else _LEVELS.get(level, logging.DEBUG)
        _state["last"] = lvl
        msg = text.decode("utf-8", errors="replace").rstrip("\n")
        if msg:
            native_line(msg)  # into a crash log, should the process die next
        if lvl >= logging.ERROR and msg:
            _state["errors"] = (_state["errors"] + [msg])[-4:]  # for the one-line error
        # llama.cpp's INFO chatter (tensor lists, timings) is debugging detail here.
        lvl = logging.DEBUG if lvl <= logging.INFO else lvl
        if msg and log.isEnabledFor(lvl):
            log.log(lvl, "%s", msg)

    _state["callback"] = _forward  # keep the C callback alive
    lc.llama_log_set(_forward, ctypes.c_void_p(0))
    setter = _mtmd_log_set(lc)
    if setter is not None:
        setter(_forward, ctypes.c_void_p(0))
    _set_abort_callback(lc)
    lc.llama_backend_init()
    _state["init"] = True
    return lc, mtmd


def last_error(since: int = 0) -> str:
    """llama.cpp's last error message logged after `error_mark()` returned `since`."""
    errors = _state["errors"][since:] if since <= len(_state["errors"]) else _state["errors"]
    return errors[-1].split(": ", 1)[-1].strip() if errors else ""


def error_mark() -> int:
    return len(_state["errors"])


_ABORT = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _set_abort_callback(lc: Any) -> None:
    """ggml's abort message (a failed GGML_ASSERT: file, line, condition) into the crash
    log before the abort, so the one-line report quotes it (on stderr, as ggml prints it,
    where no crash log is written). ggml_set_abort_callback is in libggml-base, not in
    the bindings."""
    lib = llama_library("ggml-base")
    fn = getattr(lib, "ggml_set_abort_callback", None) if lib is not None else None
    if fn is None:
        return
    fn.argtypes = [_ABORT]
    fn.restype = _ABORT

    @_ABORT
    def _aborting(message: bytes) -> None:
        text = (message or b"").decode("utf-8", errors="replace").strip()
        if not native_line(text, ABORT_PREFIX):  # no crash log to quote it from
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    _state["abort_callback"] = _aborting  # keep the C callback alive
    fn(_aborting)


def _mtmd_log_set(lc: Any) -> Any:
    """mtmd's `mtmd_helper_log_set` (in the library, not in the Python bindings)."""
    lib = llama_library("mtmd")
    fn = getattr(lib, "mtmd_helper_log_set", None) if lib is not None else None
    if fn is None:
        return None
    fn.argtypes = [lc.llama_log_callback, ctypes.c_void_p]
    fn.restype = None
    return fn


class Model:
    """A GGUF text model loaded by llama.cpp.

    `repack=False` keeps the weights in plain CPU buffers (no extra buffer types: no AMX
    tiles, no repacked Q4_0/Q4_K layouts): llama-server's `--no-repack`. `vocab_only`:
    the vocabulary and hyperparameters without the weights (enough to tokenize and to set
    up the vision projector). The token embedding table is read on demand (llama.cpp's lazy
    mode): a judgement touches a few hundred of its 151,936 rows."""

    def __init__(
        self,
        path: str | Path,
        *,
        gpu_layers: int = 0,
        repack: bool = True,
        vocab_only: bool = False,
    ):
        lc, _ = init()
        self.lc = lc
        self.path = Path(path)
        self.repack = repack
        self.vocab_only = vocab_only
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if gpu_layers < 0 else gpu_layers
        params.use_extra_bufts = repack
        params.vocab_only = vocab_only
        params.lazy_mode = LAZY_MODE_ON
        if not vocab_only:  # the advice after a crash depends on it
            note_state("repack", "on" if repack else "off")
        _state["errors"] = []
        # The file as loaded, by what identifies its content without reading it: what is
        # derived from the vocabulary alone is kept per process by it (`sampling`).
        self.source: tuple | None = None
        if self.path.is_file():
            st = self.path.stat()
            self.source = (str(self.path.resolve()), st.st_dev, st.st_ino, st.st_size,
                           st.st_mtime_ns)  # fmt: skip
        self.ptr = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            why = last_error() or "corrupt, truncated or not a llama.cpp model"
            raise ModelError(f"{self.path}: llama.cpp could not load the model ({why})")
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_embd_inp = int(lc.llama_model_n_embd_inp(self.ptr)) or self._n_embd_inp_meta()
        self.n_layer = int(lc.llama_model_n_layer(self.ptr))
        self._piece = ctypes.create_string_buffer(256)

    def _n_embd_inp_meta(self) -> int:
        """The width image embeddings have for this model, from its metadata (a vocab-only
        load reports 0): the embedding width times 1 + the deepstack layers (Qwen3-VL)."""
        arch = self.meta("general.architecture") or ""
        width = int(self.meta(f"{arch}.embedding_length") or 0)
        deep = int(self.meta(f"{arch}.n_deepstack_layers") or 0)
        return width * (1 + deep)

    def meta(self, key: str) -> str | None:
        """A metadata value as a string (None when the key is absent)."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        raw = self.lc.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text` (no BOS); `special` parses special-token text."""
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            raise VermError("llama.cpp could not tokenize the text")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        n = self.lc.llama_token_to_piece(
            self.vocab, token, self._piece, len(self._piece), 0, special
        )
        return self._piece.raw[: max(n, 0)]

    def detokenize(self, tokens: list[int]) -> str:
        """Text of generated tokens (special tokens left out), invalid UTF-8 replaced."""
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.lc.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """A llama.cpp context over a `Model`: `n_seq` sequences, each with its own KV stream
    of `n_ctx` cells (not one unified cache: a token attends only its own sequence's cells,
    so a batched sequence computes what it would alone), and one batch of `n_batch` rows."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        threads: int = 1,
        n_seq: int = 1,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
        batch_invariant: bool = False,
    ):
        lc = model.lc
        self.lc, self.model = lc, model
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.n_batch = min(n_batch, n_ctx)
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = self.n_batch
        self.n_ubatch = cp.n_ubatch = min(n_ubatch, self.n_batch)
        cp.n_seq_max = n_seq
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = max(1, threads)
        cp.no_perf = True
        # Off unless asked for (llama.cpp's default, auto, turns it on for CPUs): with it a
        # batched row and a lone one can round apart; it is a measured lever, not a default.
        cp.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if kv_type is not None:
            cp.type_k = cp.type_v = KV_TYPES[kv_type]
        self.ptr = lc.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise ModelError(
                f"llama.cpp could not make a context of {n_ctx} tokens x {n_seq} "
                "sequences (out of memory?); lower --parallel or the token cap"
            )
        self.mem = lc.llama_get_memory(self.ptr)
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = model.n_vocab
        # Whether a row's logits here do not depend on the rows beside it (the CPU
        # backend's batch-invariant kernels took the setting, and no GPU backend is in).
        self.batch_invariant = batch_invariant and self._set_batch_invariant()

    def _set_batch_invariant(self) -> bool:
        lib = llama_library("llama")
        fn = getattr(lib, "llama_set_batch_invariant", None) if lib is not None else None
        if fn is None:
            return False
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_bool], ctypes.c_bool
        return bool(fn(self.ptr, True))

    # -- decoding ----------------------------------------------------------------------

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of rows (token, position, sequence, want logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, logits
        b.n_tokens = len(rows)
        rc = self.lc.llama_decode(self.ptr, b)
        if rc != 0:
            raise VermError(
                f"llama.cpp could not decode a batch (code {rc}); the context may "
                "be full: lower --parallel or the image size"
            )

    def decode_embd(
        self, embd: np.ndarray, pos: np.ndarray, seqs: np.ndarray, causal: bool = True
    ) -> None:
        """One llama_decode of embedding rows (image embeddings): `embd` [n, n_embd_inp]
        float32, `pos` [n] (1-D) or [k, n] (M-RoPE: sections t, y, x, z, laid out section
        by section as llama.cpp reads them), `seqs` [n] sequence ids. Rows of several
        sequences may share one call; `causal=False` for images that attend both ways."""
        lc = self.lc
        n = int(embd.shape[0])
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        flat_pos = np.ascontiguousarray(np.asarray(pos, dtype=np.int32).reshape(-1))
        seq_ids = np.ascontiguousarray(np.asarray(seqs, dtype=np.int32))
        n_seq = np.ones(n, dtype=np.int32)
        seq_ptrs = (ctypes.POINTER(lc.llama_seq_id) * n)(
            *[
                ctypes.cast(seq_ids.ctypes.data + 4 * i, ctypes.POINTER(lc.llama_seq_id))
                for i in range(n)
            ]
        )
        no_logits = np.zeros(n, dtype=np.int8)
        batch = lc.llama_batch(
            n_tokens=n,
            token=None,
            embd=embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            pos=flat_pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos)),
            n_seq_id=n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=seq_ptrs,
            logits=no_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        if not causal:
            lc.llama_set_causal_attn(self.ptr, False)
        try:
            rc = lc.llama_decode(self.ptr, batch)
        finally:
            if not causal:
                lc.llama_set_causal_attn(self.ptr, True)
        if rc != 0:
            raise VermError(
                f"llama.cpp could not decode image embeddings (code {rc}); the context may be full"
            )

    def eval_tokens(
        self, tokens: list[int], pos: int, seq: int = 0, logits: str = "last"
    ) -> np.ndarray | None:
        """Evaluate `tokens` from position `pos` in sequence `seq`. logits: "last" (a copy
        of the last row's), "all" ([len(tokens), n_vocab] copies) or "none"."""
        out = []
        for i in range(0, len(tokens), self.n_batch):
            part = tokens[i : i + self.n_batch]
            final = i + len(part) == len(tokens)
            want = [
                logits == "all" or (logits == "last" and final and j == len(part) - 1)
                for j in range(len(part))
            ]
            self.decode([(t, pos + i + j, seq, w) for j, (t, w) in enumerate(zip(part, want))])
            if logits == "all":
                out.extend(self.logits(j) for j in range(len(part)))
            elif want[-1]:
                out.append(self.logits(len(part) - 1))
        if logits == "all":
            return np.stack(out) if out else np.zeros((0, self.n_vocab), np.float32)
        return out[-1] if out else None

    def logits(self, i: int, copy: bool = True) -> np.ndarray:
        """Row i of the last decode's logits; a view is valid until the next decode."""
        ptr = self.lc.llama_get_logits_ith(self.ptr, i)
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return row.copy() if copy else row

    # -- KV cache ----------------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self.lc.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int) -> None:
        self.lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.mem, True)

    def seq_state(self, seq: int) -> bytes:
        """Sequence `seq`'s KV cells (positions and values), to restore into another
        context with `set_seq_state`."""
        size = self.lc.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_ubyte * size)()
        n = self.lc.llama_state_seq_get_data(self.ptr, buf, size, seq)
        return bytes(buf[:n])

    def set_seq_state(self, seq: int, data: bytes) -> None:
        buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
        if self.lc.llama_state_seq_set_data(self.ptr, buf, len(data), seq) == 0:
            raise VermError(f"llama.cpp could not restore sequence {seq} into a larger context")

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ptr", None):
            self.lc.llama_free(self.ptr)
            self.ptr = None


# llama.h: read the tensors the architecture marks (the token embeddings) on demand.
LAZY_MODE_ON = 2
# ggml_type ids of the KV cache types a context may use (ggml.h).
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2, "f32": 0, "bf16": 30}


def check_runs(path: str | Path, repack: bool, threads: int = 1) -> None:
    """Load a GGUF text model and evaluate a few tokens: a model that loads but cannot run
    on this CPU (an AMX kernel, a wheel built for another CPU) fails here, in a check,
    not in the first judgement. ModelError when its logits are not finite."""
    from ..events import stage

    stage("check model runs", model=Path(path).name, repack="repack" if repack else "no repack")
    model = Model(path, repack=repack)
    try:
        ctx = Context(model, n_ctx=64, n_batch=64, threads=threads)
        try:
            tokens = model.tokenize("The chart shows four bars.") or [0]
            logits = ctx.eval_tokens(tokens, 0)
        finally:
            ctx.close()
    finally:
        model.close()
    if logits is None or not np.isfinite(logits).all():
        raise ModelError(f"{path}: the model's logits are not finite on this machine")
