"""Many judgements at once in one llama.cpp context: shared-prefix reuse and batched decoding.

GRPO judges 8-16 rollouts against one ground truth. Every prompt starts with the same
chat preamble and ground-truth image, so that prefix is evaluated once into a cache
sequence and copied into each request's sequence (each sequence has its own KV stream;
`llama_memory_seq_cp` across streams copies the stream, far cheaper than evaluating the
image again). Each request then evaluates only its prediction image and prompt, and all
requests decode together, one token per sequence per `llama_decode` call, so the weights
are read once per step for the batch. One request alone is a batch of one.

Prefixes stay in the cache (LRU over `prefix_cache` sequences), so a later batch with
the same ground truth reuses it too. Trimming a sequence back and evaluating from the
cached prefix gives the logits of a full evaluation (tests/test_serve.py checks the
answers match the single path's)."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import VermError
from ..events import stage
from . import native
from .base import Generation, Request
from .sampling import TokenSampler


@dataclass
class _Seq:
    seq: int
    request: Request
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

    def slot(self, evict: Callable[[int], None]) -> int:
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
    """Runs lists of `Request`s on a `LlamaCppBackend`: a context of `parallel` request
    sequences and `prefix_cache` cache sequences, each its own KV stream of `n_ctx` cells."""

    def __init__(
        self,
        backend: Any,
        *,
        n_ctx: int,
        parallel: int = 1,
        prefix_cache: int = 0,
        threads: int = 1,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
    ):
        self.b = backend
        self.parallel = parallel
        self.n_ctx = n_ctx
        self.ctx = native.Context(
            backend.model,
            n_ctx=n_ctx,
            n_batch=2048,
            n_ubatch=512,
            threads=threads,
            n_seq=parallel + prefix_cache,
            flash_attn=flash_attn,
            kv_type=kv_type,
        )
        self.cache = PrefixCache(list(range(parallel, parallel + prefix_cache)))
        # The last run(): tokens generated (failed answers included) and seconds spent in
        # the decode loops, everything before them being the prompts' evaluation.
        self.last_tokens = 0
        self.last_decode_s = 0.0

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None

    def reset(self) -> None:
        """Forget every cached prefix."""
        for seq, _ in self.cache.entries.values():
            self.ctx.seq_rm(seq)
        self.cache.clear()

    # -- evaluation ------------------------------------------------------------------------

    def _eval_chunks(
        self, s: _Seq, chunks: list, n_past: int, label: str = ""
    ) -> tuple[int, np.ndarray | None]:
        """Evaluate chunks for sequence `s.seq` from n_past; logits after the last one."""
        logits = None
        n_images = sum(not c.is_text for c in chunks)
        done = 0
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            if chunk.is_text:
                logits = self.ctx.eval_tokens(
                    chunk.tokens, n_past, s.seq, "last" if last else "none"
                )
                n_past += len(chunk.tokens)
            else:
                done += 1
                stage("encode image", image=label, done=done, total=n_images, tokens=chunk.n_tokens)
                embd, dt, _keep = self.b.encode_image(chunk)
                s.vision_s += dt
                s.image_tokens += chunk.n_tokens
                stage("prefill image", tokens=chunk.n_tokens)
                n_past = self.b.decode_image(self.ctx, chunk, embd, n_past, s.seq)
        return n_past, logits

    def _prefix(self, s: _Seq, chunks: list) -> tuple[int, int]:
        """Index of the first chunk after the shared prefix (the text before the first image
        and that image), and that prefix's n_past in sequence s.seq (copied there from the
        cache, evaluated into it first on a miss)."""
        first_image = next((k for k, c in enumerate(chunks) if not c.is_text), None)
        if (
            first_image is None
            or not s.request.reuse_prefix
            or not self.cache.free
            and not self.cache.entries
        ):
            return 0, 0
        h = hashlib.sha256()
        for c in chunks[:first_image]:
            h.update(np.asarray(c.tokens, dtype=np.int32).tobytes())
        img = chunks[first_image].image
        if img is None:
            return 0, 0
        h.update(repr(img.size).encode())
        h.update(img.rgb_bytes())
        key = h.hexdigest()
        hit = self.cache.get(key)
        if hit is None:
            self.cache.misses += 1
            slot = self.cache.slot(self.ctx.seq_rm)
            self.ctx.seq_rm(slot)
            probe = _Seq(seq=slot, request=s.request)
            n_past, _ = self._eval_chunks(probe, chunks[: first_image + 1], 0, "ground truth")
            self.cache.put(key, slot, n_past)
            s.vision_s += probe.vision_s
            hit = (slot, n_past)
        else:
            self.cache.hits += 1
        slot, n_past = hit
        s.image_tokens += chunks[first_image].n_tokens
        self.ctx.seq_cp(slot, s.seq)
        return first_image + 1, n_past

    def _prompt(self, s: _Seq) -> None:
        """Evaluate a request's prompt into its sequence; set its sampler."""
        self.ctx.seq_rm(s.seq)
        req = s.request
        text = self.b.render(req.messages)
        with self.b.tokenize(text, req.images) as chunks:
            parts = list(chunks)
            s.prompt_tokens = chunks.n_tokens
            room = self.n_ctx - s.prompt_tokens - 1
            if room < 1:
                raise VermError(
                    f"prompt needs {s.prompt_tokens} tokens but a sequence "
                    f"holds {self.n_ctx}; lower the image size or the token cap"
                )
            start, n_past = self._prefix(s, parts)
            s.n_past, s.logits = self._eval_chunks(
                s, parts[start:], n_past, "prediction" if start else ""
            )
            if s.logits is None:
                raise VermError("a prompt must end with text after its images")
            s.max_tokens = max(1, min(req.sampling.max_tokens, room))
            s.sampler = TokenSampler(
                self.b.picker,
                req.sampling,
                req.grammar,
                s.max_tokens,
                prompt_tokens=chunks.text_tokens,
            )
            if self.b.picker.exhaustive:
                s.sampler.shortlist = False

    def score(self, request: Request, answer: list[int]) -> np.ndarray:
        """Raw logits [len(answer), vocab] at each position of a forced answer."""
        s = _Seq(seq=0, request=request)
        self.ctx.seq_rm(0)
        with self.b.tokenize(self.b.render(request.messages), request.images) as chunks:
            n_prompt = chunks.n_tokens
            if n_prompt + len(answer) + 1 > self.n_ctx:
                raise VermError("prompt and answer do not fit the context")
            s.n_past, first = self._eval_chunks(s, list(chunks), 0)
        rest = self.ctx.eval_tokens(list(answer[:-1]), s.n_past, 0, "all")
        self.ctx.seq_rm(0)
        return np.concatenate([first[None, :], rest]) if len(answer) > 1 else first[None, :]

    # -- the batch ----------------------------------------------------------------------

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

    def run(self, requests: list[Request]) -> list[Generation | VermError]:
        """Generate for every request (at most `parallel` at once); errors per request."""
        results: list[Generation | VermError] = []
        self.last_tokens, self.last_decode_s = 0, 0.0
        for i in range(0, len(requests), self.parallel):
            results.extend(self._run(requests[i : i + self.parallel]))
        return results

    def _run(self, requests: list[Request]) -> list[Generation | VermError]:
        # Requests sharing a ground truth run next to each other, so the prefix is
        # evaluated by the first of them and stays cached for the rest.
        seqs = [_Seq(seq=i, request=r) for i, r in enumerate(requests)]
        for s in seqs:
            t1 = time.perf_counter()
            try:
                self._prompt(s)
            except VermError as exc:
                s.error = exc
            s.prefill_s = time.perf_counter() - t1
        t_decode = time.perf_counter()
        active = [s for s in seqs if s.error is None]
        total = sum(s.max_tokens for s in active)
        step = 0
        while active:
            if step % 32 == 0:
                stage("decode", done=sum(len(s.out) for s in seqs), total=total)
            step += 1
            rows = []
            for s, tok in zip(active, self._sample_all(active)):
                if tok is None:
                    continue
                if self.b.is_eog(tok):
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
                self.ctx.decode([(tok, s.n_past, s.seq, True) for s, tok in rows])
            except VermError as exc:
                for s in active:
                    s.error = exc
                break
            for i, s in enumerate(active):
                s.n_past += 1
                s.logits = self.ctx.logits(i, copy=False)
        decode_s = time.perf_counter() - t_decode
        self.last_tokens += sum(len(s.out) for s in seqs)
        self.last_decode_s += decode_s
        out: list[Generation | VermError] = []
        for s in seqs:
            if s.sampler is not None:
                s.sampler.close()
            self.ctx.seq_rm(s.seq)
            if s.error is not None:
                out.append(s.error if isinstance(s.error, VermError) else VermError(str(s.error)))
                continue
            out.append(
                Generation(
                    text=self.b.detokenize(s.out),
                    finish_reason=s.finish,
                    prompt_tokens=s.prompt_tokens,
                    image_tokens=s.image_tokens,
                    completion_tokens=len(s.out),
                    vision_s=s.vision_s,
                    prefill_s=s.prefill_s,
                    decode_s=decode_s,
                )
            )
        return out
