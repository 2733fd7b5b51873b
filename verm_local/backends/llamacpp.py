"""llama.cpp backend (GGUF text model + mmproj) through llama-cpp-python.

The multimodal prompt is driven through the mtmd chunk API directly rather than
`MTMDChatHandler`, so that image encoding, prompt prefill and decoding are timed apart and
the image tokens are counted (llama-cpp-python's usage leaves them out)."""

from __future__ import annotations

import ctypes
import json
import os
import time
from typing import Any

import numpy as np

from ..constants import SPECIAL_TOKENS
from ..errors import ModelError, VermError
from ..images import PreparedImage
from ..modelref import ResolvedModel
from ..schema import ModelInfo
from .base import Generation, Sampling


class LlamaCppBackend:
    """A loaded GGUF model and its vision projector; reusable across judgements."""

    # Decoding checks the grammar on the best tokens first and runs sampler chains on a
    # shortlist (see _decode_loop); False: llama-cpp-python's full-vocabulary passes.
    fast_grammar = True

    def __init__(
        self,
        model: ResolvedModel,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        n_gpu_layers: int = 0,
        image_max_tokens: int | None = None,
        vision: Any = None,
        verbose: bool = False,
        parallel: int = 1,
        prefix_slots: int = 0,
    ):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._utils import suppress_stdout_stderr

        self._llama_cpp, self._mtmd, self._quiet = llama_cpp, mtmd, suppress_stdout_stderr
        self.verbose = verbose
        self._grammars: dict[str, Any] = {}  # answer grammars by schema
        # An external vision encoder (verm_local.vision_onnx.OnnxVision) or None: mmproj.
        self.vision = vision
        mm = model.mmproj.name if model.mmproj else ""
        mm_type = mm.removeprefix("mmproj-").removesuffix(".gguf") if mm.startswith("mmproj-") else mm
        vision_name = (f"onnx-{vision.path.stem.removeprefix('vision-')}" if vision is not None
                       else f"mmproj-{mm_type}")
        self.info = ModelInfo(path=str(model.path), quant=model.quant, sha256=model.sha256,
                              vision=vision_name)
        threads = threads or os.cpu_count() or 1
        t0 = time.perf_counter()
        try:
            with suppress_stdout_stderr(disable=verbose):
                self.llama = llama_cpp.Llama(
                    model_path=str(model.path),
                    n_ctx=n_ctx,
                    n_batch=min(n_ctx, 2048),
                    n_ubatch=512,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=n_gpu_layers,
                    logits_all=False,
                    verbose=verbose,
                )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{model.path}: llama.cpp could not load the model ({exc})") from None
        self.n_ctx = n_ctx
        self.batch = None
        batched = parallel > 1 or prefix_slots > 0
        if batched:
            self._parallel_context(parallel, prefix_slots)
        self._mctx = self._init_mtmd(str(model.mmproj), threads, n_gpu_layers > 0, image_max_tokens)
        if batched:
            from .batch import BatchEngine

            self.batch = BatchEngine(self, parallel, prefix_slots)
        self.load_s = time.perf_counter() - t0

    def _parallel_context(self, parallel: int, prefix_slots: int) -> None:
        """Swap the context for one with `parallel` request sequences and `prefix_slots`
        cache sequences (llama-cpp-python's Llama takes no n_seq_max), each in its own KV
        stream of n_ctx cells. Separate streams, not one unified cache: a token attends only
        its own sequence's cells (a unified cache makes every token of the batch attend
        every sequence's cells, masked), and a sequence's arithmetic is that of the single
        path, so batched answers equal single ones. A cached prefix is copied into a
        request's stream (`llama_memory_seq_cp` across streams copies the stream)."""
        from llama_cpp._internals import LlamaContext

        params = self.llama.context_params
        params.n_seq_max = parallel + prefix_slots
        params.kv_unified = False
        params.n_ctx = self.n_ctx * (parallel + prefix_slots)
        try:
            with self._quiet(disable=self.verbose):
                ctx = LlamaContext(model=self.llama._model, params=params, verbose=self.verbose)
        except ValueError:
            raise ModelError(f"llama.cpp could not make a context of {params.n_ctx} tokens for "
                             f"{parallel} parallel sequences; lower --parallel") from None
        old, self.llama._ctx = self.llama._ctx, ctx
        old.close()

    @property
    def picker(self) -> GrammarArgmax:
        """The model's grammar picker (a vocabulary-sized token buffer and its byte-prefix
        index), shared by the single path and the batch engine."""
        if getattr(self, "_pick", None) is None:
            lc = self._llama_cpp
            self._pick = GrammarArgmax(lc, lc.llama_model_get_vocab(self.llama.model),
                                       self.llama.n_vocab())
        return self._pick

    def grammar(self, schema: dict[str, Any] | None) -> Any:
        """The answer grammar of a JSON schema (`answer_grammar`), compiled once per schema
        and shared by the single path and the batch engine; None without a schema."""
        if schema is None:
            return None
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            with self._quiet(disable=self.verbose):
                self._grammars[key] = answer_grammar(schema, verbose=self.verbose)
        return self._grammars[key]

    def _init_mtmd(self, mmproj: str, threads: int, use_gpu: bool, max_tokens: int | None):
        mtmd = self._mtmd
        with self._quiet(disable=self.verbose):
            params = mtmd.mtmd_context_params_default()
            params.use_gpu = use_gpu
            params.print_timings = self.verbose
            params.n_threads = threads
            params.warmup = False
            if max_tokens:
                params.image_max_tokens = max_tokens
            ctx = mtmd.mtmd_init_from_file(mmproj.encode(), self.llama.model, params)
        if ctx is None:
            self.llama.close()
            raise ModelError(f"{mmproj}: llama.cpp could not load the vision projector")
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            self.llama.close()
            raise ModelError(f"{mmproj}: this projector has no vision encoder")
        return ctx

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.batch.close()
            self.batch = None
        if getattr(self, "_mctx", None) is not None:
            self._mtmd.mtmd_free(self._mctx)
            self._mctx = None
        if getattr(self, "llama", None) is not None:
            self.llama.close()
            self.llama = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- prompt -----------------------------------------------------------------------

    def render_prompt(self, n_images: int, prompt: str) -> str:
        """The GGUF's own chat template, one user turn of [image]*n + text, with mtmd's
        media marker where each image goes."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return self.render_messages([{"role": "user", "content": content}])

    def render_messages(self, messages: list[dict[str, Any]]) -> str:
        """Chat messages through the GGUF's own template; `{"type": "image"}` parts become
        mtmd's media marker."""
        import jinja2.sandbox

        marker = self._mtmd.mtmd_default_marker().decode("utf-8")
        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{self.info.path}: GGUF has no chat template")
        rendered = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [{"type": "text", "text": marker} if p.get("type") == "image" else p
                           for p in content]
            rendered.append({**m, "content": content})
        if getattr(self, "_template", None) is None:  # compiled once, not per request
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(template)
        return self._template.render(
            messages=rendered,
            add_generation_prompt=True,
            bos_token="",
            eos_token="<|im_end|>",
        )

    def _tokenize(self, text: str, images: list[PreparedImage]):
        mtmd = self._mtmd
        bitmaps = []
        for img in images:
            w, h = img.size
            raw = img.rgb_bytes()
            buf = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
            bm = mtmd.mtmd_bitmap_init(w, h, buf)
            if bm is None:
                raise VermError(f"{img.source}: llama.cpp could not take the image")
            bitmaps.append(bm)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            inp = mtmd.mtmd_input_text()
            data = text.encode("utf-8")
            inp.text, inp.text_len = data, len(data)
            inp.add_special, inp.parse_special = True, True
            arr = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            with self._quiet(disable=self.verbose):
                rc = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise VermError(f"llama.cpp could not tokenize the prompt (code {rc})")
            return chunks
        finally:
            for bm in bitmaps:
                mtmd.mtmd_bitmap_free(bm)

    def _encode_image(self, chunk, image: PreparedImage | None):
        """Embeddings of one image chunk, [tokens * n_embd_inp] floats, and the seconds it
        took: from the mmproj, or from the external vision encoder when one is set."""
        mtmd = self._mtmd
        if self.vision is None or image is None:
            t0 = time.perf_counter()
            with self._quiet(disable=self.verbose):
                rc = mtmd.mtmd_encode_chunk(self._mctx, chunk)
            dt = time.perf_counter() - t0
            if rc != 0:
                raise VermError(f"llama.cpp failed to encode an image (code {rc})")
            return mtmd.mtmd_get_output_embd(self._mctx), dt, None
        emb, dt = self.vision.encode(image)
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        width = self._llama_cpp.llama_model_n_embd_inp(self.llama.model)
        if emb.shape != (n_tokens, width):
            raise VermError(f"vision encoder gave {emb.shape} for an image llama.cpp lays out as "
                            f"({n_tokens}, {width}); the ONNX tower and GGUF do not match")
        keep = np.ascontiguousarray(emb, dtype=np.float32)
        return keep.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), dt, keep

    def image_embeddings(self, image: PreparedImage):
        """[tokens, n_embd_inp] embeddings of one image as the GGUF path feeds them to the
        text model (mmproj, or the external encoder when set)."""
        return self.encode_image_timed(image)[0]

    def encode_image_timed(self, image: PreparedImage):
        """(embeddings [tokens, n_embd_inp], seconds spent in the vision encoder)."""
        mtmd = self._mtmd
        chunks = self._tokenize(self.render_prompt(1, "."), [image])
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    ptr, dt, _keep = self._encode_image(chunk, image)
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    width = self._llama_cpp.llama_model_n_embd_inp(self.llama.model)
                    emb = np.ctypeslib.as_array(ptr, shape=(n * width,)).reshape(n, width)
                    return emb.copy(), dt
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        raise VermError("no image chunk in the prompt")

    def _eval_chunks(self, chunks, images: list[PreparedImage] | None = None
                     ) -> tuple[int, int, float]:
        """Evaluate every chunk from position 0. Returns (tokens, image tokens, vision s)."""
        mtmd, lc, llama = self._mtmd, self._llama_cpp, self.llama
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        sizes = [mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))
                 for i in range(n_chunks)]
        total = sum(sizes)
        if total + 1 > self.n_ctx:
            raise VermError(f"prompt needs {total} tokens but the context holds {self.n_ctx}; "
                            "lower the image token budget or raise the context size")
        llama.reset()
        llama._ctx.kv_cache_clear()
        if self.batch is not None:
            self.batch.cache.clear()  # the clear above dropped the cached prefixes
        image_tokens, vision_s, n_image = 0, 0.0, 0
        for i in range(n_chunks):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                llama.eval(text_tokens(mtmd, chunk))
                continue
            image_tokens += sizes[i]
            image = images[n_image] if images and n_image < len(images) else None
            n_image += 1
            embd, dt, _keep = self._encode_image(chunk, image)
            vision_s += dt
            new_pos = lc.llama_pos(0)
            with self._quiet(disable=self.verbose):
                rc = mtmd.mtmd_helper_decode_image_chunk(
                    self._mctx, llama._ctx.ctx, chunk, embd, lc.llama_pos(llama.n_tokens),
                    lc.llama_seq_id(0), llama.n_batch, ctypes.byref(new_pos),
                    mtmd.mtmd_helper_post_decode_callback(), None)
            if rc != 0:
                raise VermError(f"llama.cpp failed to decode image embeddings (code {rc})")
            # Qwen3-VL advances the position by the image's n_pos, not its token count.
            llama.n_tokens = new_pos.value
        return total, image_tokens, vision_s

    # -- teacher forcing ---------------------------------------------------------------

    def answer_logprobs(self, images: list[PreparedImage], prompt: str, answer: list[int]):
        """Log-probabilities (float32, [len(answer), vocab]) at each answer position when the
        answer is forced after the prompt (same positions the HF model is scored at)."""
        lc, llama = self._llama_cpp, self.llama
        chunks = self._tokenize(self.render_prompt(len(images), prompt), images)
        try:
            n_prompt, _, _ = self._eval_chunks(chunks, images)
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)
        if n_prompt + len(answer) + 1 > self.n_ctx:
            raise VermError("prompt and answer do not fit the context")
        n_vocab = llama.n_vocab()
        rows = [np.ctypeslib.as_array(lc.llama_get_logits_ith(llama._ctx.ctx, -1),
                                      shape=(n_vocab,)).copy()]
        forced = list(answer[:-1])
        for i in range(0, len(forced), llama.n_batch):
            part = forced[i : i + llama.n_batch]
            llama._batch.set_batch(batch=part, n_past=llama.n_tokens, logits_all=True)
            llama._ctx.decode(llama._batch)
            logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(len(part) * n_vocab,))
            rows.extend(logits.reshape(len(part), n_vocab).copy())
            llama.n_tokens += len(part)
        x = np.stack(rows).astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        return x.astype(np.float32)

    def answer_tokens(self, text: str) -> list[int]:
        """An answer's token ids as the model would emit them, ending with <|im_end|>."""
        ids = self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return list(ids) + [SPECIAL_TOKENS["<|im_end|>"]]

    def prompt_text_tokens(self, images: list[PreparedImage], prompt: str) -> list[int]:
        """The prompt's text token ids, image chunks left out (to compare tokenizers)."""
        mtmd = self._mtmd
        chunks = self._tokenize(self.render_prompt(len(images), prompt), images)
        out: list[int] = []
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    out.extend(text_tokens(mtmd, chunk))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return out

    # -- generation ---------------------------------------------------------------------

    def _decode_loop(self, sampling: Sampling, grammar: Any, max_tokens: int
                     ) -> tuple[str, str, int]:
        """Decode one token at a time with a `TokenSampler`: greedy under a grammar checks
        the best tokens first (`GrammarArgmax`), a sampler chain runs on a shortlist; the
        same tokens as passing all 151,936 candidates through grammar and chain each step,
        at a fraction of the cost."""
        lc, llama = self._llama_cpp, self.llama
        pick = self.picker
        vocab, n_vocab = pick.vocab, pick.n_vocab
        pick.full_passes = 0
        sampler = TokenSampler(pick, sampling, grammar, max_tokens)
        out: list[int] = []
        reason = "length"
        try:
            for _ in range(max_tokens):
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(llama._ctx.ctx, -1),
                                               shape=(n_vocab,))
                tok = sampler(logits)
                if lc.llama_vocab_is_eog(vocab, tok):
                    reason = "stop"
                    break
                out.append(tok)
                llama.eval([tok])
        finally:
            sampler.close()
            self.full_grammar_passes = pick.full_passes
        text = llama.detokenize(out).decode("utf-8", errors="replace")
        return text, reason, len(out)

    def generate(
        self,
        images: list[PreparedImage],
        prompt: str,
        sampling: Sampling,
        schema: dict[str, Any] | None = None,
    ) -> Generation:
        if self.llama is None:
            raise VermError("model is closed")
        text = self.render_prompt(len(images), prompt)
        t0 = time.perf_counter()
        chunks = self._tokenize(text, images)
        try:
            n_prompt, n_image, vision_s = self._eval_chunks(chunks, images)
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)
        prefill_s = time.perf_counter() - t0

        grammar = self.grammar(schema)
        room = self.n_ctx - n_prompt - 1
        max_tokens = max(1, min(sampling.max_tokens, room))
        t1 = time.perf_counter()
        if self.fast_grammar:
            text, reason, n_out = self._decode_loop(sampling, grammar, max_tokens)
            return Generation(text=text, finish_reason=reason, prompt_tokens=n_prompt,
                              image_tokens=n_image, completion_tokens=n_out, vision_s=vision_s,
                              prefill_s=prefill_s, decode_s=time.perf_counter() - t1)
        with self._quiet(disable=self.verbose):
            out = self.llama.create_completion(
                prompt=self.llama.input_ids[: self.llama.n_tokens].tolist(),
                max_tokens=max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=0.0,
                presence_penalty=sampling.presence_penalty,
                repeat_penalty=sampling.repeat_penalty,
                seed=sampling.seed,
                grammar=grammar,
            )
        decode_s = time.perf_counter() - t1
        choice = out["choices"][0]
        return Generation(
            text=choice["text"],
            finish_reason=choice.get("finish_reason") or "",
            prompt_tokens=n_prompt,
            image_tokens=n_image,
            completion_tokens=int(out["usage"]["completion_tokens"]),
            vision_s=vision_s,
            prefill_s=prefill_s,
            decode_s=decode_s,
        )


def text_tokens(mtmd: Any, chunk: Any) -> list[int]:
    """The tokens of an mtmd text chunk."""
    n = ctypes.c_size_t()
    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [ptr[j] for j in range(n.value)]


class GrammarArgmax:
    """The argmax over the tokens a grammar allows, without passing the whole vocabulary
    through the grammar each step.

    The plain argmax is checked first, then the 64 highest logits: if any of them is
    allowed, the best allowed token overall is among them, so the answer is exactly the
    full pass's. Otherwise the grammar is asked which single bytes, then which two-byte
    pieces, may come next (through the tokens that are exactly those bytes) and only tokens
    starting with such bytes, plus the end-of-generation tokens, go through it: a token the
    grammar accepts has an accepted first byte and first two bytes (acceptance is
    prefix-closed), so this too is exact. After a space, say, that leaves the few hundred
    tokens of a space and a digit instead of the 53,000 that start with a space. A trained
    judge's argmax is almost always allowed; a random test model's often is not. llama.cpp's
    own server checks the sampled token first too."""

    TOP = 64

    def __init__(self, lc: Any, vocab: Any, n_vocab: int):
        self.lc, self.vocab, self.n_vocab = lc, vocab, n_vocab
        self.data = (lc.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.data).view(
            np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        self.full_passes = 0
        self._index: _TokenPrefixes | None = None

    @property
    def index(self) -> _TokenPrefixes:
        if self._index is None:
            self._index = _TokenPrefixes(self.lc, self.vocab, self.n_vocab)
        return self._index

    def _apply(self, sampler: Any, ids: np.ndarray, logits: np.ndarray) -> Any:
        """Run `sampler` over the candidates `ids` with their logits, in the shared buffer."""
        k = len(ids)
        v = self.view[:k]
        v["id"], v["logit"], v["p"] = ids, logits, 0.0
        arr = self.lc.llama_token_data_array(data=self.data, size=k, selected=-1, sorted=False)
        self.lc.llama_sampler_apply(sampler, ctypes.byref(arr))
        return arr

    def allowed(self, grammar: Any, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Which of `ids` (given their logits) the grammar allows now."""
        arr = self._apply(grammar, ids, logits)
        # The grammar sets refused logits to -inf in place (it keeps the array's order).
        out = self.view[: arr.size]
        return out["id"][np.isfinite(out["logit"])].copy()

    def allows(self, grammar: Any, tok: int, logits: np.ndarray) -> bool:
        """Whether the grammar allows token `tok` now."""
        return bool(len(self.allowed(grammar, np.array([tok], dtype=np.int32), logits[[tok]])))

    def select(self, chain: Any, logits: np.ndarray, ids: np.ndarray | None = None) -> int:
        """The token a sampler chain selects from `ids` (default: the whole vocabulary)."""
        if ids is None:
            ids = np.arange(self.n_vocab, dtype=np.int32)
        arr = self._apply(chain, ids, logits[ids])
        if arr.selected < 0:
            raise VermError("the sampler selected no token")
        return int(self.data[arr.selected].id)

    def candidates(self, grammar: Any) -> np.ndarray:
        """Every token that could be allowed now: those whose first byte, and first two
        bytes, the grammar takes. The grammar is asked about each single byte and then each
        two-byte piece with an allowed first byte, through the tokens that are exactly those
        bytes; a prefix no token stands for stays a candidate."""
        ix = self.index
        ok1 = self.allowed(grammar, ix.single, np.zeros(len(ix.single), np.float32))
        b1 = ix.always.copy()
        b1[ix.first[ok1]] = True
        reps = ix.pair_tokens[b1[ix.pair_first]]
        ok2 = self.allowed(grammar, reps, np.zeros(len(reps), np.float32))
        groups = np.concatenate([ix.pair[ok2], ix.PAIRS + np.flatnonzero(b1[:256])])
        return np.concatenate([ix.order[ix.start[g]:ix.start[g + 1]] for g in groups.tolist()]
                              + [ix.eog])

    def __call__(self, grammar: Any, logits: np.ndarray) -> int:
        best = int(np.argmax(logits))
        if self.allows(grammar, best, logits):
            return best
        top = np.argpartition(logits, -self.TOP)[-self.TOP:].astype(np.int32)
        ok = self.allowed(grammar, top, logits[top])
        if not len(ok):
            self.full_passes += 1
            ids = self.candidates(grammar)
            ok = self.allowed(grammar, ids, logits[ids])
            if not len(ok):
                raise VermError("the answer grammar allows no token here")
        return int(ok[np.argmax(logits[ok])])


_LOOSE_CHARS = '[^"\\\\]'  # GBNF: any character but a quote or a backslash
_JSON_CHARS = '[^"\\\\\\x7F\\x00-\\x1F]'  # ... nor a control character


def answer_grammar(schema: dict[str, Any], verbose: bool = False) -> Any:
    """llama.cpp's grammar for answers that follow a JSON schema, with JSON's own string
    characters. llama-cpp-python's converter lets raw control characters (a newline, a tab)
    into strings with a length limit, and no strict JSON reader takes such an answer (a
    random test model wrote one); llama.cpp's own converter leaves them out, as here."""
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    lines = json_schema_to_gbnf(json.dumps(schema)).splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"char ::= {_LOOSE_CHARS} |"):
            lines[i] = line.replace(_LOOSE_CHARS, _JSON_CHARS, 1)
    return LlamaGrammar.from_string("\n".join(lines), verbose=verbose)


class TokenSampler:
    """One sequence's next token: greedy (under the answer grammar: `GrammarArgmax`), or a
    llama.cpp sampler chain (penalties over every generated token, vLLM's presence and
    repetition semantics; then top-k, top-p, temperature and a seeded draw), under the
    grammar when there is one. The single path and each sequence of a batch use one."""

    shortlist = True  # chains run on a shortlist (see _chain); False: on everything

    def __init__(self, pick: GrammarArgmax, sampling: Sampling, grammar: Any = None,
                 max_tokens: int = 0):
        lc, vocab, n_vocab = pick.lc, pick.vocab, pick.n_vocab
        self.pick, self.lc, self.n_vocab, self.sampling = pick, lc, n_vocab, sampling
        self.grammar = self.chain = None
        self.out: list[int] = []
        sp = sampling
        if grammar is not None:
            self.grammar = lc.llama_sampler_init_grammar(vocab, grammar._grammar.encode(),
                                                         grammar._root.encode())
            if not self.grammar:
                raise VermError("llama.cpp could not compile the answer grammar")
        if sp.temperature > 0 or sp.repeat_penalty != 1.0 or sp.presence_penalty != 0.0:
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
                n_vocab, max(max_tokens, 1), sp.repeat_penalty, 0.0, sp.presence_penalty))
            if sp.temperature > 0:
                if sp.top_k > 0:
                    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(sp.top_k))
                if sp.top_p < 1.0:
                    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(sp.top_p, 1))
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(sp.temperature))
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(sp.seed & 0xFFFFFFFF))
            else:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            self.chain = chain

    def close(self) -> None:
        for smpl in (self.grammar, self.chain):
            if smpl:
                self.lc.llama_sampler_free(smpl)
        self.grammar = self.chain = None

    def __call__(self, logits: np.ndarray) -> int:
        """The next token (accepted by grammar and chain)."""
        if self.chain is not None:
            tok = self._chain(logits)
        elif self.grammar is not None:
            tok = self.pick(self.grammar, logits)
        else:
            tok = int(np.argmax(logits))
        if self.grammar is not None:
            self.lc.llama_sampler_accept(self.grammar, tok)
        if self.chain is not None:
            self.lc.llama_sampler_accept(self.chain, tok)
        self.out.append(tok)
        return tok

    def _chain(self, logits: np.ndarray) -> int:
        """The chain picks; only if the grammar refuses that token does it pick again among
        the allowed tokens (sampling with the refused ones masked to -inf, which would get
        probability 0; llama.cpp's common sampler does the same).

        With a top-k step (greedy: k = 1) the chain runs on a shortlist, not on 151,936
        tokens (~3 ms a pass): the k best tokens not yet generated, plus the generated ones.
        Penalties only lower generated tokens' logits, so the chain's top k lies in that
        set and the chain picks from it what it picks from the whole vocabulary, the same
        seeded draw included. Under the grammar, the k best allowed tokens come from the
        TOP best when that many of those are allowed, else from the grammar's candidates."""
        sp, g, pick = self.sampling, self.grammar, self.pick
        k = sp.top_k if sp.temperature > 0 else 1
        if not self.shortlist or k <= 0:  # no top-k: the whole vocabulary
            tok = pick.select(self.chain, logits)
            if g is not None and not pick.allows(g, tok, logits):
                ids = pick.candidates(g)
                tok = pick.select(self.chain, logits, pick.allowed(g, ids, logits[ids]))
            return tok
        seen = np.unique(np.asarray(self.out, dtype=np.int32))
        scores = logits.copy()
        scores[seen] = -np.inf
        n = min(max(GrammarArgmax.TOP, 4 * k), self.n_vocab - len(seen))
        top = np.argpartition(scores, -n)[-n:]
        top = top[np.argsort(-scores[top])].astype(np.int32)  # best first, none generated
        tok = pick.select(self.chain, logits, np.union1d(top[:k], seen).astype(np.int32))
        if g is None or pick.allows(g, tok, logits):
            return tok
        ok_top = pick.allowed(g, top, logits[top])  # keeps the order: best first
        if len(ok_top) < k:
            ids = pick.candidates(g)
            ok = pick.allowed(g, ids, logits[ids])
            ok_top = ok[np.argsort(-scores[ok])][:k]
            ok_top = ok_top[np.isfinite(scores[ok_top])]
        ok_seen = pick.allowed(g, seen, logits[seen]) if len(seen) else seen
        return pick.select(self.chain, logits, np.union1d(ok_top[:k], ok_seen).astype(np.int32))


class _TokenPrefixes:
    """A vocabulary's tokens grouped by how the grammar can be asked about them: by their
    first two bytes where a token is exactly those two bytes (group = the two-byte code),
    else by their first byte (group = PAIRS + the byte); the tokens that are exactly one
    byte and exactly two bytes, one per value; the byte values no one-byte token stands for
    (always candidates: the grammar cannot be asked about them); the end-of-generation
    tokens (no group: always candidates). Pieces as the grammar sees them, special pieces
    included. Built by a picker on its first fallback (~0.3 s over the vocabulary)."""

    PAIRS = 1 << 16

    def __init__(self, lc: Any, vocab: Any, n_vocab: int):
        first = np.full(n_vocab, -1, dtype=np.int16)
        code = np.full(n_vocab, -1, dtype=np.int32)
        single: dict[int, int] = {}
        double: dict[int, int] = {}
        buf = ctypes.create_string_buffer(512)
        for t in range(n_vocab):
            k = lc.llama_token_to_piece(vocab, t, buf, 512, 0, True)
            if k > 0:
                first[t] = buf.raw[0]
                if k == 1:
                    single.setdefault(buf.raw[0], t)
                else:
                    code[t] = buf.raw[0] << 8 | buf.raw[1]
                    if k == 2:
                        double.setdefault(int(code[t]), t)
        self.first = first
        self.single = np.array(sorted(single.values()), dtype=np.int32)
        self.always = np.zeros(257, dtype=bool)  # by byte value; [256] is "no piece"
        self.always[[b for b in range(256) if b not in single]] = True
        self.pair = code  # group of a pair token's two bytes
        self.pair_tokens = np.array(list(double.values()), dtype=np.int32)
        self.pair_first = np.array([c >> 8 for c in double], dtype=np.int16)
        self.eog = np.array([t for t in range(n_vocab) if lc.llama_vocab_is_eog(vocab, t)],
                            dtype=np.int32)
        has_pair = np.zeros(self.PAIRS, dtype=bool)
        has_pair[list(double)] = True
        group = np.where((code >= 0) & has_pair[np.maximum(code, 0)], code,
                         self.PAIRS + first.astype(np.int32))
        group[first < 0] = -1
        group[self.eog] = -1
        keep = np.flatnonzero(group >= 0)
        self.order = keep[np.argsort(group[keep], kind="stable")].astype(np.int32)
        self.start = np.searchsorted(group[self.order], np.arange(self.PAIRS + 257))
