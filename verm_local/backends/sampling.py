"""Choosing the next token: samplers and grammar steps, shared by the single and the
batched paths (one `TokenSampler` per sequence), built once per request from `Sampling`.

Semantics follow vLLM, which served Visual-ERM in the authors' pipeline: the repetition
penalty looks at the prompt and the generated tokens, the presence penalty at the
generated tokens only; temperature applies before top-k and top-p. The answer grammar is
llama.cpp's (GBNF text, the same text xgrammar compiles for the transformers backend)."""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numpy as np

from ..errors import VermError
from .base import Sampling


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
    exhaustive = False  # True: every step runs the whole vocabulary through the grammar

    def __init__(self, lc: Any, vocab: Any, n_vocab: int, source: Hashable | None = None):
        """`source`: what identifies the vocabulary's file (`native.Model.source`), so a
        process that loads the same file again reuses its token index."""
        self.lc, self.vocab, self.n_vocab, self.source = lc, vocab, n_vocab, source
        self.data = (lc.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.data).view(
            np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        )
        self.full_passes = 0
        self._index: _TokenPrefixes | None = None

    @property
    def index(self) -> _TokenPrefixes:
        if self._index is None:
            self._index = token_index(self.lc, self.vocab, self.n_vocab, self.source)
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
        return np.concatenate(
            [ix.order[ix.start[g] : ix.start[g + 1]] for g in groups.tolist()] + [ix.eog]
        )

    def forced(self, grammar: Any, after: bytes = b"", limit: int = 64) -> bytes:
        """The text the grammar dictates next, for drafting (`batch.BatchEngine`
        speculates on it): one byte at a time while exactly one byte may come next and the
        answer may not end, asked of a copy of the grammar through the one-byte tokens
        (`after`: the text just generated, whose last byte the layout rule looks at).
        Where the grammar leaves only whitespace open (JSON's optional spaces), the draft
        follows the trained answers' layout (`json.dumps` separators: a space after `:` and
        `,`, none elsewhere). A draft is a guess: every drafted token is kept only if the
        sequence's own sampler picks it, so a wrong one costs a row of a batch, never an
        answer. ASCII only (a multi-byte character ends the draft)."""
        ix = self.index
        probe, zeros = ix.probe
        out = bytearray()
        copy = None
        g = grammar
        try:
            while len(out) < limit:
                ok = self.allowed(g, probe, zeros)
                if len(ok) == 0 or ok[-1] in ix.eog_set:  # the answer may end here
                    break
                pick = self._canonical(ix.first[ok], bytes(out[-1:]) or after[-1:])
                if pick is None:
                    break
                if copy is None:
                    copy = g = self.lc.llama_sampler_clone(grammar)
                self.lc.llama_sampler_accept(g, int(ok[pick]))
                out.append(int(ix.first[ok[pick]]))
        finally:
            if copy is not None:
                self.lc.llama_sampler_free(copy)
        return bytes(out)

    @staticmethod
    def _canonical(allowed: np.ndarray, before: bytes) -> int | None:
        """Which of the allowed next bytes a draft takes: the only one, or where the rest
        is optional whitespace, the trained layout's choice; None: no guess."""
        if len(allowed) == 1:
            return 0 if allowed[0] < 0x80 else None
        space = np.flatnonzero(allowed == 0x20)
        if before in (b":", b",") and len(space):
            return int(space[0])
        other = np.flatnonzero(~np.isin(allowed, (0x20, 0x0A, 0x09)))
        if before not in (b":", b",") and len(other) == 1 and allowed[other[0]] < 0x80:
            return int(other[0])
        return None

    def __call__(self, grammar: Any, logits: np.ndarray) -> int:
        if self.exhaustive:
            ok = self.allowed(grammar, np.arange(self.n_vocab, dtype=np.int32), logits)
            if not len(ok):
                raise VermError("the answer grammar allows no token here")
            return int(ok[np.argmax(logits[ok])])
        best = int(np.argmax(logits))
        if self.allows(grammar, best, logits):
            return best
        top = np.argpartition(logits, -self.TOP)[-self.TOP :].astype(np.int32)
        ok = self.allowed(grammar, top, logits[top])
        if not len(ok):
            self.full_passes += 1
            ids = self.candidates(grammar)
            ok = self.allowed(grammar, ids, logits[ids])
            if not len(ok):
                raise VermError("the answer grammar allows no token here")
        return int(ok[np.argmax(logits[ok])])


class TokenSampler:
    """One sequence's next token: greedy (under the answer grammar: `GrammarArgmax`), or a
    llama.cpp sampler chain (repetition penalty over the prompt and the generated tokens,
    presence penalty over the generated ones, then temperature, top-k, top-p and a seeded
    draw), under the grammar when there is one. The single path and each sequence of a
    batch use one."""

    shortlist = True  # chains run on a shortlist (see _chain); False: on everything

    def __init__(
        self,
        pick: GrammarArgmax,
        sampling: Sampling,
        grammar: str | None = None,
        max_tokens: int = 0,
        prompt_tokens: list[int] | None = None,
    ):
        lc, vocab, n_vocab = pick.lc, pick.vocab, pick.n_vocab
        self.pick, self.lc, self.n_vocab, self.sampling = pick, lc, n_vocab, sampling
        self.grammar = self.chain = None
        self.out: list[int] = []
        # ignore_eos: end-of-generation tokens are never picked (llama-server does the same).
        self.banned = pick.index.eog if sampling.ignore_eos else None
        self.penalised = np.zeros(0, dtype=np.int32)  # prompt tokens the chain penalises
        sp = sampling
        if grammar is not None:
            self.grammar = lc.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not self.grammar:
                raise VermError("llama.cpp could not compile the answer grammar")
        if sp.temperature > 0 or sp.repeat_penalty != 1.0 or sp.presence_penalty != 0.0:
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            window = max(max_tokens, 1)
            if sp.repeat_penalty != 1.0:
                prompt = list(prompt_tokens or ())
                rep = lc.llama_sampler_init_penalties(
                    n_vocab, len(prompt) + window, sp.repeat_penalty, 0.0, 0.0
                )
                for tok in prompt:
                    lc.llama_sampler_accept(rep, tok)
                lc.llama_sampler_chain_add(chain, rep)
                self.penalised = np.unique(np.asarray(prompt, dtype=np.int32))
            if sp.presence_penalty != 0.0:
                lc.llama_sampler_chain_add(
                    chain,
                    lc.llama_sampler_init_penalties(n_vocab, window, 1.0, 0.0, sp.presence_penalty),
                )
            if sp.temperature > 0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(sp.temperature))
                if sp.top_k > 0:
                    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(sp.top_k))
                if sp.top_p < 1.0:
                    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(sp.top_p, 1))
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
        if self.banned is not None:
            logits = logits.copy()
            logits[self.banned] = -np.inf
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
        seeded draw included (the repetition penalty's prompt tokens count as generated).
        Under the grammar, the k best allowed tokens come from the TOP best when that many
        of those are allowed, else from the grammar's candidates."""
        sp, g, pick = self.sampling, self.grammar, self.pick
        k = sp.top_k if sp.temperature > 0 else 1
        if not self.shortlist or k <= 0:  # no top-k: the whole vocabulary
            tok = pick.select(self.chain, logits)
            if g is not None and not pick.allows(g, tok, logits):
                ids = pick.candidates(g)
                tok = pick.select(self.chain, logits, pick.allowed(g, ids, logits[ids]))
            return tok
        seen = np.union1d(np.asarray(self.out, dtype=np.int32), self.penalised)
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


class ForcedSampler(TokenSampler):
    """A `TokenSampler` that picks the given tokens in order, then an end-of-generation
    token (teacher forcing: `Request.forced`), its grammar following them."""

    def __init__(self, pick: GrammarArgmax, forced: list[int], grammar: str | None, **kw: Any):
        super().__init__(pick, Sampling(), grammar, **kw)
        self.forced = list(forced)

    def __call__(self, logits: np.ndarray) -> int:
        i = len(self.out)
        tok = self.forced[i] if i < len(self.forced) else int(self.pick.index.eog[0])
        if self.grammar is not None:
            if not self.pick.allows(self.grammar, tok, logits):
                raise VermError(f"the forced answer leaves the grammar at token {i}")
            self.lc.llama_sampler_accept(self.grammar, tok)
        self.out.append(tok)
        return tok


# Token indexes by the identity of the file their vocabulary came from. An index walks the
# whole vocabulary through ctypes (about 0.6 s for 151,936 tokens): a process that loads
# the same file again (judges made in a loop through the Python API, the test suite) takes
# it from here. It is read-only once built; a few files' worth are kept (about 3 MB each).
_INDEXES: OrderedDict[Hashable, _TokenPrefixes] = OrderedDict()
_INDEXES_KEPT = 4
_INDEXES_LOCK = threading.Lock()


def token_index(lc: Any, vocab: Any, n_vocab: int, source: Hashable | None) -> _TokenPrefixes:
    """The vocabulary's token index: built, or the one built before for `source`."""
    if source is None:
        return _TokenPrefixes(lc, vocab, n_vocab)
    with _INDEXES_LOCK:
        index = _INDEXES.get(source)
        if index is None or len(index.first) != n_vocab:
            index = _INDEXES[source] = _TokenPrefixes(lc, vocab, n_vocab)
        _INDEXES.move_to_end(source)
        while len(_INDEXES) > _INDEXES_KEPT:
            _INDEXES.popitem(last=False)
    return index


class _TokenPrefixes:
    """A vocabulary's tokens grouped by how the grammar can be asked about them: by their
    first two bytes where a token is exactly those two bytes (group = the two-byte code),
    else by their first byte (group = PAIRS + the byte); the tokens that are exactly one
    byte and exactly two bytes, one per value; the byte values no one-byte token stands for
    (always candidates: the grammar cannot be asked about them); the end-of-generation
    tokens (no group: always candidates). Pieces as the grammar sees them, special pieces
    included. Built by a picker on its first fallback or draft (about 0.6 s over the
    vocabulary), once per file a process loads (`token_index`)."""

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
        self.eog = np.array(
            [t for t in range(n_vocab) if lc.llama_vocab_is_eog(vocab, t)], dtype=np.int32
        )
        self.eog_set = frozenset(self.eog.tolist())
        # What `GrammarArgmax.forced` asks the grammar about: every byte, and the end.
        self.probe = (
            np.concatenate([self.single, self.eog]),
            np.zeros(len(self.single) + len(self.eog), np.float32),
        )
        has_pair = np.zeros(self.PAIRS, dtype=bool)
        has_pair[list(double)] = True
        group = np.where(
            (code >= 0) & has_pair[np.maximum(code, 0)], code, self.PAIRS + first.astype(np.int32)
        )
        group[first < 0] = -1
        group[self.eog] = -1
        keep = np.flatnonzero(group >= 0)
        self.order = keep[np.argsort(group[keep], kind="stable")].astype(np.int32)
        self.start = np.searchsorted(group[self.order], np.arange(self.PAIRS + 257))
