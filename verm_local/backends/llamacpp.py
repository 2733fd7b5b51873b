"""llama.cpp backend (GGUF text model + mmproj, or an ONNX vision tower) through
llama-cpp-python's public low-level bindings (`native.py`, `llama_cpp.mtmd_cpp`).

The multimodal prompt is driven through mtmd's chunk API, so image encoding, prompt
prefill and decoding are timed apart and image tokens are counted (llama-cpp-python's own
usage figure leaves them out). Requests run in the batch engine (`batch.py`): one request
alone is a batch of one."""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..constants import SPECIAL_TOKENS
from ..decoding import Sampling
from ..errors import ModelError, VermError
from ..events import stage
from ..hardware import default_threads
from ..images import PreparedImage
from ..memory import release_heap
from ..modelref import ResolvedModel
from ..schema import ModelInfo
from ..select import Determinism
from . import native
from .base import Generation, ImageEmbedding, Request, user_turn
from .grammar import grammar_for
from .sampling import GrammarArgmax


@dataclass
class Chunk:
    """One mtmd chunk of a tokenized prompt: text (its tokens) or an image."""

    handle: Any
    is_text: bool
    n_tokens: int
    tokens: list[int]
    image: PreparedImage | None = None


class Chunks:
    """A tokenized prompt's chunks; frees mtmd's memory on close (a context manager)."""

    def __init__(self, mtmd: Any, handle: Any, images: list[PreparedImage]):
        self.mtmd, self.handle = mtmd, handle
        it = iter(images)
        self.items: list[Chunk] = []
        for i in range(mtmd.mtmd_input_chunks_size(handle)):
            c = mtmd.mtmd_input_chunks_get(handle, i)
            is_text = mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT
            tokens = _text_tokens(mtmd, c) if is_text else []
            self.items.append(
                Chunk(
                    c,
                    is_text,
                    int(mtmd.mtmd_input_chunk_get_n_tokens(c)),
                    tokens,
                    None if is_text else next(it, None),
                )
            )

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def n_tokens(self) -> int:
        return sum(c.n_tokens for c in self.items)

    @property
    def text_tokens(self) -> list[int]:
        return [t for c in self.items if c.is_text for t in c.tokens]

    def close(self) -> None:
        if self.handle is not None:
            self.mtmd.mtmd_input_chunks_free(self.handle)
            self.handle = None

    def __enter__(self) -> "Chunks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _text_tokens(mtmd: Any, chunk: Any) -> list[int]:
    n = ctypes.c_size_t()
    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [ptr[j] for j in range(n.value)]


def path_choice(
    repack: bool | None,
    quant: str | None = None,
    deterministic: bool | None = None,
    gpu_layers: int = 0,
) -> tuple[Determinism, bool, str]:
    """Deterministic decoding and weight repacking for a model of `quant` here, and why:
    the llama.cpp build's batch-invariant kernels, the CPU's record and the overrides
    (flags, else VERM_LOCAL_DETERMINISTIC / VERM_LOCAL_REPACK): `select.decode_path`."""
    from ..hardware import probe_batch_invariant, probe_cpu
    from ..select import decode_path
    from ..settings import settings

    _, flags, _ = probe_cpu()
    s = settings()
    return decode_path(
        probe_batch_invariant(),
        flags,
        device="cpu" if gpu_layers == 0 else "gpu",
        gpu_layers=gpu_layers,
        quant=quant,
        repack=repack if repack is not None else s.repack,
        deterministic=deterministic if deterministic is not None else s.deterministic,
    )


def repack_choice(repack: bool | None, quant: str | None = None) -> tuple[bool, str]:
    """Whether to load a model of `quant` with llama.cpp's extra buffer types, and why
    (`path_choice`: plain where decoding is deterministic)."""
    _, use, why = path_choice(repack, quant)
    return use, why


class LlamaCppBackend:
    """A loaded GGUF model and its vision projector; reusable across judgements.

    `parallel` requests run at once; `prefix_cache` ground-truth prefixes stay evaluated
    for reuse (`batch.BatchEngine`). `repack` None: decided from the CPU (no extra buffer
    types on AMX CPUs, where llama.cpp 0.3.36 crashes) and VERM_LOCAL_REPACK. `n_ctx`
    None: the context is sized for each batch (prompt + answer cap). `one_shot`: the vision
    model is let go once the images are encoded, before the text model's buffers exist
    (one judgement per load: less peak memory; a later call loads it again)."""

    # Greedy decoding checks the grammar on the best tokens first and runs sampler chains
    # on a shortlist; False: every token of the vocabulary goes through both each step.
    fast_grammar = True

    def __init__(
        self,
        model: ResolvedModel,
        *,
        n_ctx: int | None = 4096,
        threads: int | None = None,
        gpu_layers: int = 0,
        image_tokens: int | None = None,
        vision: Any = None,
        verbose: bool = False,
        parallel: int = 1,
        prefix_cache: int = 0,
        repack: bool | None = None,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
        n_ubatch: int = 512,
        one_shot: bool = False,
        speculate: bool | None = None,
        deterministic: bool | None = None,
    ):
        from .batch import BatchEngine

        lc, mtmd = native.init()
        self.lc, self.mtmd, self.verbose = lc, mtmd, verbose
        self.vision = vision  # an external encoder (vision_onnx.OnnxVision) or None: mmproj
        self.determinism, self.repack, self.repack_reason = path_choice(
            repack, model.quant, deterministic, gpu_layers
        )
        # Drafting is exact only where a row's logits do not depend on the rows beside it:
        # on by default there, off elsewhere unless asked for.
        speculate = self.determinism.on if speculate is None else speculate
        self.n_ctx = n_ctx
        self.parallel = parallel
        self.one_shot = one_shot
        self._grammars: dict[str, str | None] = {}
        self._template = None
        mm = model.mmproj.name if model.mmproj else ""
        mm_type = (
            mm.removeprefix("mmproj-").removesuffix(".gguf") if mm.startswith("mmproj-") else mm
        )
        vision_name = (
            f"onnx-{vision.path.stem.removeprefix('vision-')}"
            if vision is not None
            else f"mmproj-{mm_type}"
        )
        self.info = ModelInfo(
            path=str(model.path),
            quant=model.quant,
            sha256=model.sha256,
            vision=vision_name,
            repack=self.repack,
        )
        self._files = [model.path, vision.path if vision is not None else model.mmproj]
        threads = threads or default_threads()
        self.threads = threads
        t0 = time.perf_counter()
        self._model_args = (model.path, gpu_layers, self.repack, model.quant)
        # One-shot: the vocabulary alone first (the vision phase needs no weights); the
        # weights load once the images are encoded and the projector is gone.
        self.model = self._load_model(vocab_only=one_shot)
        self.mctx = None
        self._picker: GrammarArgmax | None = None
        # How to load the vision projector again after `one_shot` let it go.
        self._mtmd_args = (str(model.mmproj), threads, gpu_layers != 0, image_tokens)
        try:
            self._ensure_vision()
            self.batch = BatchEngine(
                self,
                n_ctx=n_ctx,
                parallel=parallel,
                prefix_cache=prefix_cache,
                threads=threads,
                flash_attn=flash_attn,
                kv_type=kv_type,
                n_ubatch=n_ubatch,
                speculate=speculate,
                batch_invariant=self.determinism.on,
            )
        except BaseException:
            self.close()
            raise
        self.load_s = time.perf_counter() - t0

    @property
    def deterministic(self) -> Determinism:
        """Whether this backend's greedy logits are the same on every path, and why: the
        plan's decision, checked against the context llama.cpp made (a GPU build puts a
        non-CPU backend in it, and no promise holds there)."""
        ctx = self.batch.ctx if self.batch is not None else None
        if self.determinism.on and ctx is not None and not ctx.batch_invariant:
            return Determinism(
                False,
                "off: the llama.cpp context has a backend other than the CPU's (a GPU or "
                "BLAS build), which makes no batch-invariance promise",
            )
        return self.determinism

    def _load_model(self, vocab_only: bool = False) -> native.Model:
        path, gpu_layers, repack, quant = self._model_args
        stage(
            "load text model" if not vocab_only else "load vocabulary",
            model=path.name,
            quant=quant,
            repack=("repack" if repack else "no repack") if not vocab_only else "",
        )
        return native.Model(path, gpu_layers=gpu_layers, repack=repack, vocab_only=vocab_only)

    def ensure_weights(self) -> None:
        """The text model's weights, loaded now if only its vocabulary is (one-shot)."""
        if self.model.vocab_only:
            if self.mctx is not None:  # the projector holds the vocabulary model
                self.mtmd.mtmd_free(self.mctx)
                self.mctx = None
            self.model.close()
            self.model = self._load_model()
            self._picker = None

    @property
    def picker(self) -> GrammarArgmax:
        """The grammar picker over the loaded model's vocabulary (the weights' model)."""
        self.ensure_weights()
        if self._picker is None:
            self._picker = GrammarArgmax(
                self.lc, self.model.vocab, self.model.n_vocab, self.model.source
            )
        return self._picker

    def _ensure_vision(self) -> None:
        if self.mctx is None:
            stage("load vision projector", model=Path(self._mtmd_args[0]).name)
            self.mctx = self._init_mtmd(*self._mtmd_args)

    def after_encoding(self) -> None:
        """The engine has every image of a batch encoded: in one-shot judging the vision
        projector (and an ONNX tower) goes now, before the text model's buffers are
        allocated, so the two never sit in memory together."""
        if not self.one_shot:
            return
        if self.mctx is not None:
            self.mtmd.mtmd_free(self.mctx)
            self.mctx = None
        if self.vision is not None and hasattr(self.vision, "release"):
            self.vision.release()
        release_heap()
        self.ensure_weights()

    def _init_mtmd(self, mmproj: str, threads: int, use_gpu: bool, max_tokens: int | None):
        mtmd = self.mtmd
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = self.verbose
        params.n_threads = threads
        params.warmup = False
        if max_tokens:
            params.image_max_tokens = max_tokens
        ctx = mtmd.mtmd_init_from_file(mmproj.encode(), self.model.ptr, params)
        if ctx is None:
            raise ModelError(f"{mmproj}: llama.cpp could not load the vision projector")
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise ModelError(f"{mmproj}: this projector has no vision encoder")
        return ctx

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.batch.close()
            self.batch = None
        if getattr(self, "mctx", None) is not None:
            self.mtmd.mtmd_free(self.mctx)
            self.mctx = None
        if getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit anything may be gone
            pass

    # -- the public surface the engine and callers use --------------------------------

    def grammar(self, constraint: str | dict[str, Any] | None) -> str | None:
        """GBNF of a constraint (grammar text, or a JSON schema converted once)."""
        if constraint is None or isinstance(constraint, str):
            return constraint
        import json

        key = json.dumps(constraint, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = grammar_for(constraint)
        return self._grammars[key]

    def render(self, messages: list[dict[str, Any]]) -> str:
        """Chat messages through the GGUF's own template; `{"type": "image"}` parts become
        mtmd's media marker."""
        import jinja2.sandbox

        marker = self.mtmd.mtmd_default_marker().decode("utf-8")
        if self._template is None:  # compiled once, not per request
            template = self.model.chat_template()
            if not template:
                raise ModelError(f"{self.info.path}: GGUF has no chat template")
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(template)
        rendered = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [
                    {"type": "text", "text": marker} if p.get("type") == "image" else p
                    for p in content
                ]
            rendered.append({**m, "content": content})
        return self._template.render(
            messages=rendered, add_generation_prompt=True, bos_token="", eos_token="<|im_end|>"
        )

    def render_prompt(self, n_images: int, prompt: str) -> str:
        """One user turn of [image]*n + text through the chat template."""
        return self.render(user_turn([None] * n_images, prompt))  # type: ignore[list-item]

    def tokenize(self, text: str, images: list[PreparedImage]) -> Chunks:
        """A rendered prompt and its images as mtmd chunks (close them after use)."""
        self._ensure_vision()
        mtmd = self.mtmd
        bitmaps = []
        try:
            for img in images:
                w, h = img.size
                raw = img.rgb_bytes()
                buf = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
                bm = mtmd.mtmd_bitmap_init(w, h, buf)
                if bm is None:
                    raise VermError(f"{img.source}: llama.cpp could not take the image")
                bitmaps.append(bm)
            handle = mtmd.mtmd_input_chunks_init()
            inp = mtmd.mtmd_input_text()
            data = text.encode("utf-8")
            inp.text, inp.text_len = data, len(data)
            inp.add_special, inp.parse_special = True, True
            arr = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self.mctx, handle, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                mtmd.mtmd_input_chunks_free(handle)
                raise VermError(
                    f"llama.cpp could not tokenize the prompt (code {rc}); the "
                    "number of image parts must match the images"
                )
            return Chunks(mtmd, handle, images)
        finally:
            for bm in bitmaps:
                mtmd.mtmd_bitmap_free(bm)

    def encode_image(self, chunk: Chunk) -> tuple[Any, float, Any]:
        """Embeddings of an image chunk ([tokens * n_embd_inp] floats, a pointer), the
        seconds it took, and the array to keep alive while the pointer is used: from the
        mmproj, or from the external vision encoder when one is set."""
        mtmd = self.mtmd
        if self.vision is None or chunk.image is None:
            t0 = time.perf_counter()
            rc = mtmd.mtmd_encode_chunk(self.mctx, chunk.handle)
            dt = time.perf_counter() - t0
            if rc != 0:
                raise VermError(f"llama.cpp failed to encode an image (code {rc})")
            return mtmd.mtmd_get_output_embd(self.mctx), dt, None
        emb, dt = self.vision.encode(chunk.image)
        width = self.model.n_embd_inp
        if emb.shape != (chunk.n_tokens, width):
            raise VermError(
                f"vision encoder gave {emb.shape} for an image llama.cpp lays out as "
                f"({chunk.n_tokens}, {width}); the ONNX tower and GGUF do not match"
            )
        keep = np.ascontiguousarray(emb, dtype=np.float32)
        return keep.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), dt, keep

    def image_embedding(self, chunk: Chunk, n_past: int) -> ImageEmbedding:
        """An image chunk encoded (mmproj or the external encoder) into embeddings the text
        model takes later, with the decoder positions it gets from `n_past` on; the vision
        weights are not needed after this."""
        mtmd = self.mtmd
        ptr, dt, keep = self.encode_image(chunk)
        n, width = chunk.n_tokens, self.model.n_embd_inp
        if keep is None:  # mtmd's output buffer: copied, the next encode reuses it
            keep = np.ctypeslib.as_array(ptr, shape=(n * width,)).reshape(n, width).copy()
        if mtmd.mtmd_decode_use_mrope(self.mctx):
            tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk.handle)
            raw = (mtmd.mtmd_decoder_pos * n)()
            mtmd.mtmd_helper_image_get_decoder_pos(tokens, n_past, raw)
            arr = (
                np.ctypeslib.as_array(raw)
                .view(
                    np.dtype(
                        [("t", np.uint32), ("x", np.uint32), ("y", np.uint32), ("z", np.uint32)]
                    )
                )
                .reshape(n)
            )
            # llama.cpp's M-RoPE sections: time, then y, then x, then the spare one.
            pos = np.stack([arr["t"], arr["y"], arr["x"], arr["z"]]).astype(np.int32)
        else:
            pos = np.arange(n_past, n_past + n, dtype=np.int32)
        return ImageEmbedding(
            embd=keep,
            pos=pos,
            seconds=dt,
            n_pos=int(mtmd.mtmd_input_chunk_get_n_pos(chunk.handle)),
            causal=not mtmd.mtmd_decode_use_non_causal(self.mctx, chunk.handle),
        )

    def weight_files(self) -> list:
        return [f for f in self._files if f is not None]

    def stats(self) -> dict[str, int]:
        b = self.batch
        return {
            "prefix_hits": b.cache.hits,
            "prefix_misses": b.cache.misses,
            "context_tokens": b.n_ctx,
            "context_grows": b.grown,
            "forward_passes": b.forward_passes,
            "drafted": b.drafted,
            "accepted": b.accepted,
        }

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def piece(self, token: int) -> bytes:
        """A token's bytes as generated text."""
        return self.model.piece(token)

    def draft_tokens(self, text: bytes) -> list[int]:
        """The tokens a text tokenizes to on its own (the answers' usual tokenization of
        grammar-dictated text: a draft)."""
        return self.model.tokenize(text.decode("utf-8", errors="replace"))

    # -- generation -------------------------------------------------------------------

    def generate_all(self, requests: list[Request]) -> list[Generation | VermError]:
        """Generations for requests, `parallel` at a time (shared prefixes reused)."""
        if self.batch is None:
            raise VermError("model is closed")
        return self.batch.run(requests)

    def generate(
        self,
        images: list[PreparedImage],
        prompt: str | list[dict[str, Any]],
        sampling: Sampling,
        grammar: str | dict[str, Any] | None = None,
    ) -> Generation:
        """One request evaluated whole (no cached prefix): the reference the batch engine's
        shared-prefix path is checked against."""
        request = Request(
            images, user_turn(images, prompt), sampling, self.grammar(grammar), reuse_prefix=False
        )
        out = self.generate_all([request])[0]
        if isinstance(out, Exception):
            raise out
        self.full_grammar_passes = self.picker.full_passes
        return out

    # -- scoring and inspection ----------------------------------------------------------

    def answer_logprobs(
        self, images: list[PreparedImage], prompt: str | list[dict[str, Any]], answer: list[int]
    ) -> np.ndarray:
        """Log-probabilities (float32, [len(answer), vocab]) at each answer position when
        the answer is forced after the prompt (same positions the HF model is scored at)."""
        logits = self.batch.score(Request(images, user_turn(images, prompt)), answer)
        x = logits.astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        return x.astype(np.float32)

    def answer_tokens(self, text: str) -> list[int]:
        return self.model.tokenize(text) + [SPECIAL_TOKENS["<|im_end|>"]]

    def prompt_text_tokens(
        self, images: list[PreparedImage], prompt: str | list[dict[str, Any]]
    ) -> list[int]:
        with self.tokenize(self.render(user_turn(images, prompt)), images) as chunks:
            return chunks.text_tokens

    def image_embeddings(self, image: PreparedImage) -> np.ndarray:
        """[tokens, n_embd_inp] embeddings of one image as the GGUF path feeds them to the
        text model (mmproj, or the external encoder when set)."""
        return self.encode_image_timed(image)[0]

    def encode_image_timed(self, image: PreparedImage) -> tuple[np.ndarray, float]:
        """(embeddings [tokens, n_embd_inp], seconds spent in the vision encoder)."""
        with self.tokenize(self.render_prompt(1, "."), [image]) as chunks:
            for chunk in chunks:
                if not chunk.is_text:
                    ptr, dt, _keep = self.encode_image(chunk)
                    width = self.model.n_embd_inp
                    emb = np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens * width,))
                    return emb.reshape(chunk.n_tokens, width).copy(), dt
        raise VermError("no image chunk in the prompt")
