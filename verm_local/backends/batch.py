"""Many judgements at once in one llama.cpp context: shared-prefix reuse and batched decoding.

GRPO judges 8-16 rollouts against one ground truth. Every prompt starts with the same
chat preamble and ground-truth image, so that prefix is evaluated once into a cache
sequence and copied into each request's sequence (each sequence has its own KV stream;
`llama_memory_seq_cp` across streams copies the stream, far cheaper than evaluating the
image again). Each request then evaluates only its prediction image and prompt, and all
requests decode together, one token per sequence per `llama_decode` call, so the weights
are read once per step for the batch.

Prefixes stay in the cache (LRU over `prefix_slots` sequences), so a later batch with
the same ground truth reuses it too. Trimming a sequence back and evaluating from the
cached prefix gives the logits of a full evaluation (DESIGN.md §3)."""

from __future__ import annotations

import ctypes
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import VermError
from ..images import PreparedImage
from .base import Generation, Sampling
from .llamacpp import TokenSampler, text_tokens


@dataclass
class BatchRequest:
    """One generation: images in order, chat messages (image parts as
    `{"type": "image"}`, in the order of `images`), sampling, optional JSON schema."""

    images: list[PreparedImage]
    messages: list[dict[str, Any]]
    sampling: Sampling = field(default_factory=Sampling)
    schema: dict[str, Any] | None = None


@dataclass
class _Seq:
    seq: int
    request: BatchRequest
    n_past: int = 0
    prompt_tokens: int = 0
    image_tokens: int = 0
    vision_s: float = 0.0
    logits: np.ndarray | None = None
    out: list[int] = field(default_factory=list)
    max_tokens: int = 0
    finish: str = ""
    sampler: TokenSampler | None = None
    error: Exception | None = None
    prefill_s: float = 0.0


class PrefixCache:
    """Which ground-truth prefixes sit in which cache sequence, least recently used first."""

    def __init__(self, seqs: list[int]):
        self.free = list(seqs)
        self.entries: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (seq, n_past)
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[int, int] | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def slot(self, evict) -> int:
        """A free cache sequence, evicting the least recently used prefix if needed."""
        if not self.free:
            _, (seq, _) = self.entries.popitem(last=False)
            evict(seq)
            self.free.append(seq)
        return self.free.pop()

    def put(self, key: str, seq: int, n_past: int) -> None:
        self.entries[key] = (seq, n_past)

    def clear(self) -> None:
        self.free.extend(seq for seq, _ in self.entries.values())
        self.entries.clear()


class BatchEngine:
    """Runs lists of `BatchRequest`s on a `LlamaCppBackend` loaded with `n_seq` sequences."""

    def __init__(self, backend: Any, parallel: int, prefix_slots: int):
        self.b = backend
        self.parallel = parallel
        self.cache = PrefixCache(list(range(parallel, parallel + prefix_slots)))
        lc = backend._llama_cpp
        self.lc = lc
        self.ctx = backend.llama._ctx.ctx
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_batch = backend.llama.n_batch
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.pick = backend.picker
        self.vocab, self.n_vocab = self.pick.vocab, self.pick.n_vocab
        # The last run(): tokens generated (failed answers included) and seconds spent in
        # the decode loops, everything before them being the prompts' evaluation.
        self.last_tokens = 0
        self.last_decode_s = 0.0

    def close(self) -> None:
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None

    # -- low-level decoding ------------------------------------------------------------

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, want logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, logits
        b.n_tokens = len(rows)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise VermError(f"llama.cpp could not decode a batch (code {rc}); the context may "
                            "be full: lower --parallel or the image token budget")

    def _logits(self, i: int, copy: bool = True) -> np.ndarray:
        """Row i of the last decode's logits; a view is valid until the next decode."""
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return row.copy() if copy else row

    def _eval_text(self, tokens: list[int], n_past: int, seq: int, last_logits: bool
                   ) -> np.ndarray | None:
        logits = None
        for i in range(0, len(tokens), self.n_batch):
            part = tokens[i : i + self.n_batch]
            final = last_logits and i + len(part) == len(tokens)
            self._decode([(t, n_past + i + j, seq, final and j == len(part) - 1)
                          for j, t in enumerate(part)])
            if final:
                logits = self._logits(len(part) - 1)
        return logits

    def _eval_image(self, chunk, image: PreparedImage | None, n_past: int, seq: int
                    ) -> tuple[int, float]:
        mtmd, lc = self.b._mtmd, self.lc
        embd, dt, _keep = self.b._encode_image(chunk, image)
        new_pos = lc.llama_pos(0)
        with self.b._quiet(disable=self.b.verbose):
            rc = mtmd.mtmd_helper_decode_image_chunk(
                self.b._mctx, self.ctx, chunk, embd, lc.llama_pos(n_past), lc.llama_seq_id(seq),
                self.n_batch, ctypes.byref(new_pos), mtmd.mtmd_helper_post_decode_callback(),
                None)
        if rc != 0:
            raise VermError(f"llama.cpp failed to decode image embeddings (code {rc})")
        return new_pos.value, dt

    def _eval_chunks(self, s: _Seq, chunks: list, images: list, n_past: int
                     ) -> tuple[int, np.ndarray | None]:
        """Evaluate chunks for sequence `s.seq` from n_past; logits after the last one."""
        mtmd = self.b._mtmd
        logits = None
        for k, (chunk, image) in enumerate(zip(chunks, images)):
            last = k == len(chunks) - 1
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                toks = text_tokens(mtmd, chunk)
                logits = self._eval_text(toks, n_past, s.seq, last)
                n_past += len(toks)
            else:
                s.image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                n_past, dt = self._eval_image(chunk, image, n_past, s.seq)
                s.vision_s += dt
        return n_past, logits

    # -- sampling -----------------------------------------------------------------------

    def _sample_all(self, active: list[_Seq]) -> list[int | None]:
        """The next token of every active sequence; None for a sequence whose sampling
        failed (its error is set). Serial: with the shortlists and byte-prefix candidates
        this is 0.5-1 ms per token, and a thread pool measured no faster."""
        out: list[int | None] = []
        for s in active:
            try:
                out.append(s.sampler(s.logits))
            except VermError as exc:
                s.error = exc
                out.append(None)
        return out

    # -- the batch ----------------------------------------------------------------------

    def _evict(self, seq: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def reset(self) -> None:
        """Forget every cached prefix (the single-request path clears the KV cache)."""
        for seq, _ in self.cache.entries.values():
            self._evict(seq)
        self.cache.clear()

    def _prefix(self, s: _Seq, chunks: list, images: list) -> tuple[int, int]:
        """Index of the first chunk after the shared prefix, and that prefix's n_past in
        sequence s.seq (copied there from the cache, evaluating it first on a miss)."""
        mtmd, lc = self.b._mtmd, self.lc
        first_image = next((k for k, c in enumerate(chunks)
                            if mtmd.mtmd_input_chunk_get_type(c) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT),
                           None)
        if first_image is None or not self.cache.free and not self.cache.entries:
            return 0, 0
        h = hashlib.sha256()
        for c in chunks[:first_image]:
            h.update(np.asarray(text_tokens(mtmd, c), dtype=np.int32).tobytes())
        img = images[first_image]
        h.update(repr(img.size).encode())
        h.update(img.rgb_bytes())
        key = h.hexdigest()
        hit = self.cache.get(key)
        if hit is None:
            self.cache.misses += 1
            slot = self.cache.slot(self._evict)
            self._evict(slot)
            probe = _Seq(seq=slot, request=s.request)
            n_past, _ = self._eval_chunks(probe, chunks[: first_image + 1],
                                          images[: first_image + 1], 0)
            self.cache.put(key, slot, n_past)
            s.vision_s += probe.vision_s
            hit = (slot, n_past)
        else:
            self.cache.hits += 1
        slot, n_past = hit
        s.image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunks[first_image])
        lc.llama_memory_seq_cp(self.mem, slot, s.seq, -1, -1)
        return first_image + 1, n_past

    def run(self, requests: list[BatchRequest]) -> list[Generation | Exception]:
        """Generate for every request (at most `parallel` at once); exceptions per request."""
        results: list[Generation | Exception] = []
        self.last_tokens, self.last_decode_s = 0, 0.0
        for i in range(0, len(requests), self.parallel):
            results.extend(self._run(requests[i : i + self.parallel]))
        return results

    def _run(self, requests: list[BatchRequest]) -> list[Generation | Exception]:
        mtmd = self.b._mtmd
        # Requests sharing a ground truth run next to each other, so the prefix is
        # evaluated by the first of them and stays cached for the rest.
        seqs = [_Seq(seq=i, request=r) for i, r in enumerate(requests)]
        for s in seqs:
            t1 = time.perf_counter()
            chunks = None
            try:
                self._evict(s.seq)
                text = self.b.render_messages(s.request.messages)
                chunks = self.b._tokenize(text, s.request.images)
                parts = [mtmd.mtmd_input_chunks_get(chunks, k)
                         for k in range(mtmd.mtmd_input_chunks_size(chunks))]
                images = _images_per_chunk(mtmd, parts, s.request.images)
                s.prompt_tokens = sum(mtmd.mtmd_input_chunk_get_n_tokens(c) for c in parts)
                room = self.b.n_ctx - s.prompt_tokens - 1
                if room < 1:
                    raise VermError(f"prompt needs {s.prompt_tokens} tokens but a sequence "
                                    f"holds {self.b.n_ctx}; lower the image token budget")
                start, n_past = self._prefix(s, parts, images)
                s.n_past, s.logits = self._eval_chunks(s, parts[start:], images[start:], n_past)
                if s.logits is None:
                    raise VermError("a prompt must end with text after its images")
                s.max_tokens = max(1, min(s.request.sampling.max_tokens, room))
                s.sampler = TokenSampler(self.pick, s.request.sampling,
                                         self.b.grammar(s.request.schema), s.max_tokens)
            except VermError as exc:
                s.error = exc
            finally:
                if chunks is not None:
                    mtmd.mtmd_input_chunks_free(chunks)
            s.prefill_s = time.perf_counter() - t1
        t_decode = time.perf_counter()
        active = [s for s in seqs if s.error is None]
        while active:
            rows = []
            for s, tok in zip(active, self._sample_all(active)):
                if tok is None:
                    continue
                if self.lc.llama_vocab_is_eog(self.vocab, tok):
                    s.finish = "stop"
                    continue
                s.out.append(tok)
                if len(s.out) >= s.max_tokens:
                    s.finish = "length"
                    continue
                rows.append((s, tok))
            active = [s for s, _ in rows]
            if not active:
                break
            try:
                self._decode([(tok, s.n_past, s.seq, True) for s, tok in rows])
            except VermError as exc:
                for s in active:
                    s.error = exc
                break
            for i, s in enumerate(active):
                s.n_past += 1
                s.logits = self._logits(i, copy=False)
        decode_s = time.perf_counter() - t_decode
        self.last_tokens += sum(len(s.out) for s in seqs)
        self.last_decode_s += decode_s
        out: list[Generation | Exception] = []
        for s in seqs:
            if s.sampler is not None:
                s.sampler.close()
            self._evict(s.seq)
            if s.error is not None:
                out.append(s.error)
                continue
            text = self.b.llama.detokenize(s.out).decode("utf-8", errors="replace")
            out.append(Generation(text=text, finish_reason=s.finish, prompt_tokens=s.prompt_tokens,
                                  image_tokens=s.image_tokens, completion_tokens=len(s.out),
                                  vision_s=s.vision_s, prefill_s=s.prefill_s, decode_s=decode_s))
        return out


def _images_per_chunk(mtmd, parts: list, images: list[PreparedImage]) -> list:
    """The PreparedImage behind each chunk (None for text chunks), in order."""
    out, it = [], iter(images)
    for c in parts:
        out.append(None if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT
                   else next(it, None))
    return out
