"""Many judgements at once in one llama.cpp context: shared-prefix reuse and batched decoding.

GRPO judges 8-16 rollouts against one ground truth. Every prompt starts with the same
chat preamble and ground-truth image, so that prefix is evaluated once into a cache
sequence and copied into each request's sequence (each sequence has its own KV stream;
`llama_memory_seq_cp` across streams copies the stream, far cheaper than evaluating the
image again). Each request then evaluates only its prediction image and prompt, packed
with the other requests' (the prediction images of all requests in shared decode calls,
then their prompt texts: fuller batches read the weights fewer times, as llama-server
does across its slots), and all requests decode together, one token per sequence per
`llama_decode` call, so the weights are read once per step for the batch. One request
alone is a batch of one.

A context sized by the engine holds the prompts and `answer_reserve` tokens of answer
(the trained caps, 4096 and 8192, are far above a usual answer); a sequence that reaches
the end of it moves, with every other sequence's cells, into a context of the whole cap
(prompt + cap) and carries on: the same answer, and the KV cache of the full cap is paid
for only by the answers that need it.

Much of an answer is text the grammar dictates (keys, quotes, the rest of a category
name once its first letters are out). With `speculate`, each step drafts that text's
tokens after a sequence's new token (`GrammarArgmax.forced`) and decodes them in the same
call; each drafted token is then kept only while the sequence's own sampler, run on the
logits before it, picks it (greedy or seeded draws alike: the sampler runs once per
answer token either way, so the answer follows the model's distribution as decoding
without drafts does); the first token it picks instead is the next step's token, and the cells
of the drafts after it are removed. A decode of a few more rows costs about one step
where decoding is bound by reading the weights; on a CPU of few cores a row costs more
(see MIN_KEPT), so a sequence whose drafts are mostly refused pauses drafting.

With the batch-invariant kernels (`select.determinism_decision`: verm-local's llama.cpp
patch, the context's CPU backend set batch-invariant, weights plain) a row's logits are
the same bits whatever rows share its decode call, whatever chunks its prompt came in and
whatever prefix came from the cache, so drafts, batching and the prefix cache change no
answer (tests/test_determinism.py compares the logits bitwise). Without them llama.cpp's
CPU kernels round a decode of several rows a little differently from a decode of one (up
to 0.2 on the logits of the 8B shape with random weights), so a near-tie can go the other
way: drafting is then off unless asked for. `speculate=False` decodes one row per
sequence per step.

Prefixes stay in the cache (LRU over `prefix_cache` sequences), so a later batch with
the same ground truth reuses it too."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import VermError
from ..events import stage
from ..memory import ANSWER_RESERVE, release_heap
from . import native
from .base import Generation, ImageEmbedding, Request
from .sampling import ForcedSampler, TokenSampler


@dataclass
class _Item:
    """Part of a prompt left to evaluate in sequence `s.seq`: text tokens from position
    `start`, or an encoded image."""

    s: _Seq
    tokens: list[int] | None = None
    start: int = 0
    image: ImageEmbedding | None = None
    last: bool = False  # the sequence's last item: its last token's logits are kept


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
    prompt_text: list[int] = field(default_factory=list)
    error: Exception | None = None
    prefill_s: float = 0.0
    pending: int | None = None  # sampled on a draft's logits, not yet decoded
    drafts: list[int] = field(default_factory=list)  # decoded after this step's token
    passes: int = 0  # decode calls this sequence's answer took part in
    drafted: int = 0
    accepted: int = 0
    kept_share: float = 1.0  # moving average of the share of a draft kept
    idle: int = 0  # tokens since drafting paused (kept_share too low)
    trace: list[np.ndarray] | None = None  # Request.trace: the logits of each sampler call

    def sample(self, logits: np.ndarray) -> int:
        """The sampler's next token on `logits` (kept in the trace when one is asked for)."""
        if self.trace is not None:
            self.trace.append(np.array(logits, dtype=np.float32, copy=True))
        return self.sampler(logits)


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
        n_ctx: int | None,
        parallel: int = 1,
        prefix_cache: int = 0,
        threads: int = 1,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
        n_ubatch: int = 512,
        speculate: bool = True,
        batch_invariant: bool = False,
    ):
        self.b = backend
        self.parallel = parallel
        self.speculate = speculate
        # Totals since the engine started (reports, /metrics): decode calls of answers,
        # tokens drafted, drafted tokens kept.
        self.forward_passes = self.drafted = self.accepted = 0
        self._draft_tokens: OrderedDict[bytes, list[int]] = OrderedDict()
        self.prefix_cache = prefix_cache
        # None: each batch gets a context of what its requests need (prompt + answer cap),
        # allocated after their images are encoded; it grows when a later batch needs more.
        self.fixed_ctx = n_ctx
        self.n_ctx = n_ctx or 0
        self.ctx: native.Context | None = None
        self._ctx_args = dict(
            threads=threads,
            flash_attn=flash_attn,
            kv_type=kv_type,
            n_ubatch=n_ubatch,
            batch_invariant=batch_invariant,
        )
        self.cache = PrefixCache(list(range(parallel, parallel + prefix_cache)))
        # Answer tokens a context sized here holds before it grows (see the module notes).
        self.answer_reserve = ANSWER_RESERVE
        self.grown = 0  # how many times a context grew during a decode (for reports)
        # The last run(): tokens generated (failed answers included) and seconds spent in
        # the decode loops, everything before them being the prompts' evaluation.
        self.last_tokens = 0
        self.last_decode_s = 0.0
        if n_ctx:
            self._ensure_ctx(n_ctx)

    @property
    def settings(self) -> dict[str, Any]:
        """The context settings in use: n_ubatch, flash attention, KV cache type."""
        a = self._ctx_args
        return {
            "n_ubatch": a["n_ubatch"],
            "flash_attn": bool(a["flash_attn"]),
            "kv_type": a["kv_type"] or "f16",
            "batch_invariant": bool(a["batch_invariant"]),
        }

    def _ensure_ctx(self, needed: int) -> None:
        """A context whose streams hold `needed` tokens (256-aligned when sized here)."""
        if self.ctx is not None and self.n_ctx >= needed:
            return
        if self.fixed_ctx and self.ctx is not None:
            return  # a fixed context: requests that do not fit fail on their own
        n_ctx = self.fixed_ctx or (needed + 255) // 256 * 256
        self.b.ensure_weights()
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
            self.cache.clear()  # its streams went with the old context
        stage("allocate context", tokens=n_ctx, sequences=self.parallel + self.prefix_cache)
        self.ctx = native.Context(
            self.b.model,
            n_ctx=n_ctx,
            n_batch=2048,
            n_seq=self.parallel + self.prefix_cache,
            **self._ctx_args,
        )
        self.n_ctx = n_ctx

    def _grow(self, needed: int) -> None:
        """Move every sequence's cells into a context of `needed` tokens per stream (the
        old one is freed first, so the two never sit in memory together)."""
        n_ctx = (needed + 255) // 256 * 256
        stage("grow context", tokens=n_ctx, was=f"from {self.n_ctx}")
        n_seq = self.parallel + self.prefix_cache
        states = [self.ctx.seq_state(seq) for seq in range(n_seq)]
        self.ctx.close()
        self.ctx = None
        self.ctx = native.Context(
            self.b.model, n_ctx=n_ctx, n_batch=2048, n_seq=n_seq, **self._ctx_args
        )
        self.n_ctx = n_ctx
        for seq, data in enumerate(states):
            if data:
                self.ctx.set_seq_state(seq, data)
        self.grown += 1

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None

    def reset(self) -> None:
        """Forget every cached prefix."""
        if self.ctx is not None:
            for seq, _ in self.cache.entries.values():
                self.ctx.seq_rm(seq)
        self.cache.clear()

    # -- evaluation ------------------------------------------------------------------------

    def _items(self, s: _Seq, chunks: list, n_past: int, label: str = "") -> tuple[list, int]:
        """The work of evaluating `chunks` in sequence `s.seq` from `n_past`: text items
        (tokens) and image items (encoded now: embeddings and positions), and the position
        after them."""
        items: list[_Item] = []
        n_images = sum(not c.is_text for c in chunks)
        done = 0
        for chunk in chunks:
            if chunk.is_text:
                items.append(_Item(s, tokens=chunk.tokens, start=n_past))
                n_past += len(chunk.tokens)
                continue
            done += 1
            stage("encode image", image=label, done=done, total=n_images, tokens=chunk.n_tokens)
            image = self.b.image_embedding(chunk, n_past)
            s.vision_s += image.seconds
            s.image_tokens += chunk.n_tokens
            items.append(_Item(s, image=image))
            n_past += image.n_pos
        return items, n_past

    def _evaluate(self, work: list[list[_Item]]) -> None:
        """Evaluate every sequence's items in order, the sequences' items packed together:
        the next item of every sequence goes in one wave, a wave's images share decode
        calls and so do its texts (up to n_batch rows a call). The last text item of a
        sequence leaves its logits in `_Seq.logits`."""
        queues = [list(items) for items in work if items]
        for q in queues:
            q[-1].last = True
        while queues:
            wave = [q.pop(0) for q in queues]
            queues = [q for q in queues if q]
            images = [it for it in wave if it.image is not None]
            if images:
                stage("prefill image", tokens=sum(len(it.image.embd) for it in images))
                self._decode_images(images)
                for it in images:  # in the KV cache now: the embeddings can go
                    it.image = None
                release_heap(collect=False)  # arrays, freed as their references go
            texts = [it for it in wave if it.tokens is not None]
            if texts:
                stage("prefill", tokens=sum(len(it.tokens) for it in texts))
                self._decode_texts(texts)

    def _decode_images(self, items: list[_Item]) -> None:
        """Images whole, several per call while they fit n_batch rows; an image over
        n_batch (or one that attends both ways) alone, in slices, as mtmd's helper does.
        One image alone goes in slices of n_ubatch rows: llama.cpp computes one ubatch at
        a time anyway, and its copies of a call's embeddings stay one ubatch large."""
        nb = self.ctx.n_batch if len(items) > 1 else self.ctx.n_ubatch
        group: list[_Item] = []

        def flush() -> None:
            if len(group) == 1:  # no copy of a lone image's embeddings
                it = group[0]
                self.ctx.decode_embd(
                    it.image.embd, it.image.pos, np.full(len(it.image.embd), it.s.seq)
                )
            elif group:
                self.ctx.decode_embd(
                    np.concatenate([it.image.embd for it in group]),
                    np.concatenate([it.image.pos for it in group], axis=-1),
                    np.concatenate([np.full(len(it.image.embd), it.s.seq) for it in group]),
                )
            group.clear()

        for it in items:
            img, n = it.image, len(it.image.embd)
            if not img.causal or n > nb:
                flush()
                for i in range(0, n, nb):
                    sl = slice(i, i + nb)
                    self.ctx.decode_embd(
                        img.embd[sl],
                        img.pos[..., sl],
                        np.full(len(img.embd[sl]), it.s.seq),
                        causal=img.causal,
                    )
                continue
            if sum(len(g.image.embd) for g in group) + n > nb:
                flush()
            group.append(it)
        flush()

    def _decode_texts(self, items: list[_Item]) -> None:
        rows = [
            (tok, it.start + j, it.s.seq, it.last and j == len(it.tokens) - 1, it)
            for it in items
            for j, tok in enumerate(it.tokens)
        ]
        for i in range(0, len(rows), self.ctx.n_batch):
            part = rows[i : i + self.ctx.n_batch]
            self.ctx.decode([(tok, pos, seq, want) for tok, pos, seq, want, _ in part])
            for k, (_, _, _, want, it) in enumerate(part):
                if want:
                    it.s.logits = self.ctx.logits(k)

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
            items, n_past = self._items(probe, chunks[: first_image + 1], 0, "ground truth")
            self._evaluate([items])
            self.cache.put(key, slot, n_past)
            s.vision_s += probe.vision_s
            hit = (slot, n_past)
        else:
            self.cache.hits += 1
        slot, n_past = hit
        s.image_tokens += chunks[first_image].n_tokens
        self.ctx.seq_cp(slot, s.seq)
        return first_image + 1, n_past

    def _tokenize(self, s: _Seq) -> Any:
        """A request's chunks (the caller closes them); its prompt size checked."""
        req = s.request
        chunks = self.b.tokenize(self.b.render(req.messages), req.images)
        s.prompt_tokens = chunks.n_tokens
        if not len(chunks) or not list(chunks)[-1].is_text:
            chunks.close()
            raise VermError("a prompt must end with text after its images")
        return chunks

    def _prepare(self, s: _Seq, chunks: Any, with_prefix: bool, capacity: int) -> list[_Item]:
        """Reuse (or fill) a request's cached prefix, encode its remaining images; the items
        left to evaluate. Sets its sampler."""
        parts = list(chunks)
        room = capacity - s.prompt_tokens - 1
        if room < 1:
            raise VermError(
                f"prompt needs {s.prompt_tokens} tokens but a sequence holds "
                f"{self.n_ctx}; lower the image size or the token cap"
            )
        start, n_past = self._prefix(s, parts) if with_prefix else (0, 0)
        items, s.n_past = self._items(s, parts[start:], n_past, "prediction" if start else "")
        s.max_tokens = max(1, min(s.request.sampling.max_tokens, room))
        s.prompt_text = chunks.text_tokens
        return items

    def _sampler(self, s: _Seq) -> None:
        """The sequence's sampler, over the loaded model's vocabulary."""
        picker = self.b.picker
        picker.exhaustive = not self.b.fast_grammar
        if s.request.forced is not None:
            s.sampler = ForcedSampler(
                picker, s.request.forced, s.request.grammar, max_tokens=s.max_tokens
            )
            return
        s.sampler = TokenSampler(
            picker, s.request.sampling, s.request.grammar, s.max_tokens, prompt_tokens=s.prompt_text
        )
        if picker.exhaustive:
            s.sampler.shortlist = False

    def _prompts(self, seqs: list[_Seq]) -> list[list[_Item]]:
        """Every request's items, its images encoded. With a prefix cache the context comes
        first (a cached prefix lives in it); without one the images are encoded first, the
        vision model is let go when the backend asks for that (one-shot judging), and only
        then is the context (KV cache, compute buffers) allocated."""
        open_chunks: list[tuple[_Seq, Any]] = []
        for s in seqs:
            try:
                open_chunks.append((s, self._tokenize(s)))
            except VermError as exc:
                s.error = exc
        need = max(
            (s.prompt_tokens + s.request.sampling.max_tokens + 1 for s, _ in open_chunks), default=1
        )
        # What the sequences may grow to, and what is allocated now: the prompts and the
        # answer reserve (the context grows during decoding when an answer needs more).
        capacity = self.fixed_ctx or max(self.n_ctx, (need + 255) // 256 * 256)
        need = min(
            need,
            max(
                (
                    s.prompt_tokens + min(s.request.sampling.max_tokens, self.answer_reserve) + 1
                    for s, _ in open_chunks
                ),
                default=1,
            ),
        )
        work: list[list[_Item]] = []
        try:
            use_cache = bool(self.cache.free or self.cache.entries)
            if use_cache:
                self._ensure_ctx(need)
            for s, chunks in open_chunks:
                try:
                    if self.ctx is not None:
                        self.ctx.seq_rm(s.seq)
                    work.append(self._prepare(s, chunks, use_cache, capacity))
                except VermError as exc:
                    s.error = exc
        finally:
            for _, chunks in open_chunks:
                chunks.close()
        if not use_cache:
            self.b.after_encoding()
            self._ensure_ctx(need)
            for s, _ in open_chunks:
                self.ctx.seq_rm(s.seq)
        for s in seqs:
            if s.error is None:
                try:
                    self._sampler(s)
                except VermError as exc:
                    s.error = exc
        return work

    def score(self, request: Request, answer: list[int]) -> np.ndarray:
        """Raw logits [len(answer), vocab] at each position of a forced answer."""
        s = _Seq(seq=0, request=request)
        with self.b.tokenize(self.b.render(request.messages), request.images) as chunks:
            n_prompt = chunks.n_tokens
            self._ensure_ctx(n_prompt + len(answer) + 1)
            if n_prompt + len(answer) + 1 > self.n_ctx:
                raise VermError("prompt and answer do not fit the context")
            self.ctx.seq_rm(0)
            items, s.n_past = self._items(s, list(chunks), 0)
        self._evaluate([items])
        first = s.logits
        rest = self.ctx.eval_tokens(list(answer[:-1]), s.n_past, 0, "all")
        self.ctx.seq_rm(0)
        return np.concatenate([first[None, :], rest]) if len(answer) > 1 else first[None, :]

    # -- the batch ----------------------------------------------------------------------

    def _sample_all(self, active: list[_Seq]) -> list[int | None]:
        """The next token of every active sequence (one sampled on a draft's logits and
        not yet decoded, else sampled now); None for a sequence whose sampling failed (its
        error is set). Serial: with the shortlists and byte-prefix candidates this is
        0.5-1 ms per token, and a thread pool measured no faster."""
        out: list[int | None] = []
        for s in active:
            if s.pending is not None:
                out.append(s.pending)
                s.pending = None
                continue
            try:
                out.append(s.sample(s.logits))
            except VermError as exc:
                s.error = exc
                out.append(None)
        return out

    # The longest draft, in tokens: the longest fixed runs of the answers (a key with its
    # quotes, the rest of a category name) are under 10 tokens.
    MAX_DRAFT = 16
    # A row of a decode is not free on a CPU (on the 8B shape, 2 cores, each extra row
    # cost ~70% of a one-row step), so a sequence whose drafts are mostly refused (a
    # model that tokenizes the dictated text its own way) stops drafting while the moving
    # average of the share kept is under MIN_KEPT, and tries again every RETRY tokens.
    MIN_KEPT = 0.5
    RETRY = 16

    def _draft(self, s: _Seq, tok: int) -> list[int]:
        """The tokens of the text the grammar dictates after `tok` (none without a grammar
        or with speculation off), at most what the answer's cap leaves."""
        room = min(self.MAX_DRAFT, s.max_tokens - len(s.out))
        if not self.speculate or s.sampler.grammar is None or room <= 0:
            return []
        if s.kept_share < self.MIN_KEPT:
            s.idle += 1
            if s.idle < self.RETRY:
                return []
            s.idle = 0
        text = self.b.picker.forced(s.sampler.grammar, self.b.piece(tok))
        if not text:
            return []
        tokens = self._draft_tokens.get(text)
        if tokens is None:
            tokens = self._draft_tokens[text] = self.b.draft_tokens(text)
            if len(self._draft_tokens) > 4096:
                self._draft_tokens.popitem(last=False)
        return tokens[:room]

    def _verify(self, s: _Seq, base: int) -> None:
        """After a decode of a sequence's token (row `base`) and its drafts (the rows after
        it): keep each draft its sampler picks on the logits before it; the first pick
        that differs waits as the next step's token and the cells of the drafts from there
        on are removed. Leaves `s.logits` at the last kept row."""
        s.n_past += 1
        logits = self.ctx.logits(base, copy=False)
        if not s.drafts:
            s.logits = logits
            return
        before = s.accepted
        self._check_drafts(s, base, logits)
        s.kept_share = (s.kept_share + (s.accepted - before) / len(s.drafts)) / 2

    def _check_drafts(self, s: _Seq, base: int, logits: np.ndarray) -> None:
        for j, d in enumerate(s.drafts):
            try:
                t = s.sample(logits)
            except VermError as exc:
                s.error = exc
                return
            if t != d:
                s.pending = t
                self.ctx.seq_rm(s.seq, s.n_past, -1)
                return
            s.accepted += 1
            s.out.append(t)
            s.n_past += 1
            logits = self.ctx.logits(base + 1 + j, copy=False)
            if len(s.out) >= s.max_tokens:
                s.finish = "length"
                return
        s.logits = logits

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
        seqs = [
            _Seq(seq=i, request=r, trace=[] if r.trace else None) for i, r in enumerate(requests)
        ]
        t0 = time.perf_counter()
        work = self._prompts(seqs)
        try:
            self._evaluate(work)
        except VermError as exc:  # a failed decode call fails the requests it held
            for s in seqs:
                s.error = s.error or exc
        for s in seqs:
            s.prefill_s = time.perf_counter() - t0
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
                s.drafts = self._draft(s, tok)
                rows.append((s, tok))
            active = [s for s, _ in rows]
            if not active:
                break
            # KV cells, not positions (an image takes fewer positions than cells).
            if (
                not self.fixed_ctx
                and max(s.prompt_tokens + len(s.out) + len(s.drafts) for s in active) > self.n_ctx
            ):
                self._grow(max(s.prompt_tokens + s.max_tokens + 1 for s in active))
            batch, bases = [], []
            for s, tok in rows:
                bases.append(len(batch))
                batch.append((tok, s.n_past, s.seq, True))
                batch.extend((d, s.n_past + 1 + j, s.seq, True) for j, d in enumerate(s.drafts))
                s.passes += 1
                s.drafted += len(s.drafts)
            try:
                self.ctx.decode(batch)
            except VermError as exc:
                for s in active:
                    s.error = exc
                break
            for s, base in zip(active, bases):
                self._verify(s, base)
            active = [s for s in active if s.error is None and not s.finish]
        decode_s = time.perf_counter() - t_decode
        self.last_tokens += sum(len(s.out) for s in seqs)
        self.last_decode_s += decode_s
        self.forward_passes += sum(s.passes for s in seqs)
        self.drafted += sum(s.drafted for s in seqs)
        self.accepted += sum(s.accepted for s in seqs)
        deterministic = self.b.deterministic.on
        out: list[Generation | VermError] = []
        for s in seqs:
            if s.sampler is not None:
                s.sampler.close()
            if self.ctx is not None:
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
                    forward_passes=s.passes,
                    drafted=s.drafted,
                    accepted=s.accepted,
                    deterministic=deterministic,
                    trace=np.stack(s.trace) if s.trace else None,
                )
            )
        return out
