"""Speculative decoding of grammar-dictated text (issue 27): the drafts are the text the
grammar dictates, and the answers are the ones decoding without drafts gives, for each
task, on the single path and in a batch, greedy and sampled."""

from __future__ import annotations

import json

import pytest

from verm_local.backends.base import Request, Sampling, user_turn
from verm_local.judge import Judge

from .conftest import run_here

pytestmark = pytest.mark.slow

TASKS = ("chart", "table", "svg")


@pytest.fixture(scope="module")
def judge(tiny_gguf):
    with Judge(
        model=tiny_gguf, quant="Q8_0", vision="gguf", parallel=4, prefix_cache=2,
        image_tokens=64, max_tokens=400,
    ) as j:  # fmt: skip
        yield j


@pytest.fixture(scope="module")
def charts(chart_group):
    """The session's ground truth and four of its predictions."""
    gt, preds = chart_group
    return gt, preds[:4]


def _with_and_without(j: Judge, run):
    """`run()` with speculation off, then on."""
    engine = j.backend.batch
    out = []
    try:
        for on in (False, True):
            engine.speculate = on
            out.append(run())
    finally:
        engine.speculate = True
    return out


def _same(a, b) -> None:
    assert a.model_dump(exclude={"timings"}) == b.model_dump(exclude={"timings"})
    assert a.timings.completion_tokens == b.timings.completion_tokens


def test_the_draft_is_the_text_the_grammar_dictates(judge):
    b = judge.backend
    lc, picker = b.lc, b.picker
    gbnf = 'root ::= "{" ws "\\"key\\"" ":" " "? "\\"" ("alpha" | "alps") "\\", \\"n\\": 1}"\n'
    gbnf += 'ws ::= " "?\n'
    g = lc.llama_sampler_init_grammar(picker.vocab, gbnf.encode(), b"root")
    try:
        # Optional whitespace after "{" is left out, after ":" put in (json.dumps' layout);
        # the choice between alpha and alps ends the draft after their common "alp".
        assert picker.forced(g) == b'{"key": "alp'
        for tok in b.model.tokenize('{"key": "alp'):
            lc.llama_sampler_accept(g, tok)
        assert picker.forced(g) == b""  # "alpha" or "alps": nothing dictated
        for tok in b.model.tokenize("s"):
            lc.llama_sampler_accept(g, tok)
        # The rest is dictated up to the end, where the answer may stop: no further.
        assert picker.forced(g) == b'", "n": 1}'
        assert picker.forced(g, limit=3) == b'", '
    finally:
        lc.llama_sampler_free(g)


@pytest.mark.parametrize("task", TASKS)
def test_greedy_judgements_are_unchanged_alone_and_batched(judge, charts, task):
    gt, preds = charts
    alone = _with_and_without(
        judge, lambda: judge.judge(gt, preds[0], task, max_errors=3, unreadable="score")
    )
    _same(*alone)
    off, on = alone[0].timings, alone[1].timings
    assert off.drafted == off.accepted == 0 and off.forward_passes >= off.completion_tokens - 1
    assert on.drafted > 0 and 0 <= on.accepted <= on.drafted
    assert on.forward_passes == on.completion_tokens - on.accepted - (not alone[1].complete)
    batched = _with_and_without(
        judge,
        lambda: judge.judge_many([(gt, p, task) for p in preds], max_errors=3, unreadable="score"),
    )
    for a, b in zip(*batched):
        _same(a, b)
    # The batch's answers are the single path's too.
    _same(batched[1][0], alone[1])


def test_sampled_judgements_run_with_drafts(judge, charts):
    """The authors' RL sampling (temperature, top-k/top-p, penalties), seeded, with
    drafts: complete judgements, drafts kept, and seed by seed the answers decoded without
    drafts. A draft is kept only where the sequence's own sampler picks it, so the sampler
    draws at the same positions; with the batch-invariant kernels the logits it draws from
    do not depend on the drafted rows beside them."""
    assert judge.backend.determinism.on
    gt, preds = charts
    engine = judge.backend.batch

    def sampled(task):
        return judge.judge_many(
            [(gt, p, task) for p in preds],
            sampling=lambda p: judge.sampling(p, "rl", 7),
            max_errors=3,
            unreadable="score",
        )

    for task in TASKS:
        runs = sampled(task)
        assert all(not isinstance(r, Exception) for r in runs), runs
        assert sum(r.timings.accepted for r in runs) > 0
        engine.speculate = False
        try:
            plain = sampled(task)
        finally:
            engine.speculate = True
        for a, b in zip(runs, plain):
            _same(a, b)


def test_sampling_distribution_on_a_small_grammar(judge):
    """A sampled choice between dictated runs of a small grammar, 120 draws without drafts
    and 120 with (other seeds: independent samples): the same distribution (chi-square
    test of homogeneity), drafts kept."""
    from scipy.stats import chi2_contingency

    gbnf = (
        'root ::= "{\\"category\\": \\"" cat "\\", \\"severity\\": " [1-5] '
        '", \\"location\\": \\"" [a-z]{1,6} "\\"}"\n'
        'cat ::= "structure_error" | "data_error" | "text_error" | "style_error"\n'
    )
    sampling = Sampling(temperature=1.0, top_k=20, top_p=0.95, max_tokens=60)
    n = 120

    def draw(seeds):  # in batches of `parallel` (each draw is the one it would be alone)
        b = judge.backend
        turn = user_turn([], "Name one chart error.")
        out = b.generate_all([Request([], turn, sampling.with_(seed=s), gbnf) for s in seeds])
        assert not [g for g in out if isinstance(g, Exception)]
        return out

    engine = judge.backend.batch
    engine.speculate = False
    try:
        off = draw(range(n))
    finally:
        engine.speculate = True
    on = draw(range(n, 2 * n))
    assert sum(g.accepted for g in on) > 0 and sum(g.drafted for g in off) == 0
    cats = ["structure_error", "data_error", "text_error", "style_error"]
    table = [[sum(json.loads(g.text)["category"] == c for g in r) for c in cats] for r in (off, on)]
    seen = [i for i in range(4) if table[0][i] + table[1][i] >= 5]
    assert len(seen) >= 2, table  # a real choice was sampled
    _, p, _, _ = chi2_contingency([[row[i] for i in seen] for row in table])
    assert p > 0.01, table


def test_json_timings_and_no_speculate(tiny_gguf, pair):
    args = [*pair, "-m", tiny_gguf, "--quant", "Q8_0", "--vision", "gguf", "--json"]
    args += ["--image-tokens", "64", "--max-errors", "2"]
    on = run_here("judge", *args)
    off = run_here("judge", *args, "--no-speculate")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    a, b = json.loads(on.stdout), json.loads(off.stdout)
    assert a["errors"] == b["errors"] and a["reward"] == b["reward"]
    t, u = a["timings"], b["timings"]
    assert t["completion_tokens"] == u["completion_tokens"]
    assert t["drafted"] > 0 and u["drafted"] == u["accepted"] == 0
    # One decode step fewer per drafted token kept.
    assert t["forward_passes"] == u["forward_passes"] - t["accepted"]
    assert {"forward_passes", "drafted", "accepted"} <= set(t)


def test_threads_sharing_a_judge_take_turns(judge, charts):
    """A Judge shared by threads (an RL reward function in a thread pool): the calls take
    turns on the model (two decoding at once would abort the process), and each answer is
    the one judged alone."""
    from concurrent.futures import ThreadPoolExecutor

    gt, preds = charts
    alone = [judge.judge(gt, p, "chart", max_errors=2) for p in preds[:3]]
    with ThreadPoolExecutor(3) as pool:
        shared = list(pool.map(lambda p: judge.judge(gt, p, "chart", max_errors=2), preds[:3]))
    for a, b in zip(alone, shared):
        _same(a, b)
