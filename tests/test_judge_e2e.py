"""`verm-local judge` end to end through llama.cpp on the tiny model, in subprocesses."""

import json

import jsonschema
import pytest
from PIL import Image

from verm_local.constants import CATEGORIES, TASKS
from verm_local.memory import ANSWER_RESERVE
from verm_local.prompts import default_prompt
from verm_local.schema import judgement_schema
from verm_local.tasks import profile

from .conftest import run_here

pytestmark = pytest.mark.slow


def _judge_json(*args):
    proc = run_here("judge", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_judgement(out, task, quant):
    jsonschema.validate(out, judgement_schema())
    assert set(out) == {
        "task",
        "errors",
        "counts",
        "total_severity",
        "reward",
        "rm_reward",
        "complete",
        "problem",
        "prompt_source",
        "deterministic",
        "model",
        "timings",
    }
    assert out["task"] == task and out["complete"] is True
    assert out["deterministic"] is True  # this machine's build has the batch-invariant kernels
    assert set(out["counts"]) == set(CATEGORIES[task])
    # A table error has no location (the trained table answer has none).
    keys = {"category", "severity", "description"} | (
        {"location"} if profile(task).has_location else set()
    )
    for e in out["errors"]:
        assert e["category"] in CATEGORIES[task] and e["severity"] in (1, 2, 3)
        assert set(e) == keys
    assert sum(out["counts"].values()) == len(out["errors"])
    assert out["total_severity"] == sum(e["severity"] for e in out["errors"])
    term = max(0.0, 1 - out["total_severity"] / 50)
    assert out["rm_reward"] == pytest.approx(term)
    # The authors' reward: 1 + the term for a rendered chart or SVG, -S for a table.
    want = -out["total_severity"] if task == "table" else 1.0 + term
    assert out["reward"] == pytest.approx(want)
    assert out["model"]["quant"] == quant and len(out["model"]["sha256"]) == 64
    t = out["timings"]
    assert t["load_s"] > 0 and t["prefill_s"] > 0 and t["decode_s"] > 0
    # Two 320x256 images are 80 visual tokens each; they are counted in prompt_tokens.
    assert t["prompt_tokens"] > 160 and t["completion_tokens"] > 0


@pytest.mark.parametrize("task", TASKS)
def test_judge_each_task_q4_k_m(tiny_gguf, pair, task):
    gt, pred = pair
    out = _judge_json(gt, pred, "--model", tiny_gguf, "--quant", "Q4_K_M", "--task", task)
    _check_judgement(out, task, "Q4_K_M")


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_judge_other_quants_by_file(tiny_gguf, pair, quant):
    gt, pred = pair
    out = _judge_json(gt, pred, "--model", tiny_gguf / f"model-{quant}.gguf")
    _check_judgement(out, "chart", quant)
    assert out["model"]["path"].endswith(f"model-{quant}.gguf")


def test_directory_defaults_to_best_fidelity_quant(tiny_gguf, pair):
    out = _judge_json(*pair, "--model", tiny_gguf, "--max-tokens", "600")
    assert out["model"]["quant"] == "F16"


def test_greedy_is_reproducible_and_terminal_output_is_a_table(tiny_gguf, pair):
    args = [*pair, "--model", tiny_gguf, "--quant", "Q4_K_M", "--task", "svg"]
    a, b = _judge_json(*args), _judge_json(*args)
    assert a["errors"] == b["errors"] and a["reward"] == b["reward"]
    proc = run_here("judge", *args)
    assert proc.returncode == 0, proc.stderr
    assert "total severity" in proc.stdout and "score" in proc.stdout


def test_free_mode_reads_with_the_tolerant_parser_or_fails_cleanly(tiny_gguf, pair):
    proc = run_here(
        "judge",
        *pair,
        "--model",
        tiny_gguf,
        "--quant",
        "Q4_K_M",
        "--free",
        "--json",
        "--max-tokens",
        "64",
    )
    if proc.returncode == 0:
        jsonschema.validate(json.loads(proc.stdout), judgement_schema())
    else:
        # A random-weight model writes no JSON: one clear line, exit 4, no traceback (a
        # warning line may say the built-in prompts were used).
        assert proc.returncode in (4, 7)
        lines = [
            ln
            for ln in proc.stderr.strip().splitlines()
            if not ln.startswith("verm-local: warning:")
        ]
        assert len(lines) == 1 and lines[0].startswith("verm-local: error:")


def test_prompt_file_replaces_the_prompt(tiny_gguf, pair, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Compare image 2 with image 1. JSON only.")
    base = _judge_json(*pair, "--model", tiny_gguf, "--quant", "Q4_K_M")
    custom = _judge_json(*pair, "--model", tiny_gguf, "--quant", "Q4_K_M", "--prompt-file", prompt)
    assert custom["timings"]["prompt_tokens"] < base["timings"]["prompt_tokens"]


def _bad_inputs(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    Image.effect_noise((200, 200), 40).convert("RGB").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")
    return {
        "missing": (tmp_path / "missing.png", "file not found"),
        "empty": (tmp_path / "empty.png", "empty file"),
        "non-image": (tmp_path / "text.png", "not an image"),
        "truncated": (tmp_path / "cut.png", "truncated or corrupt"),
        "bomb": (tmp_path / "bomb.png", "decompression bomb"),
        "directory": (tmp_path, "is a directory"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "empty", "non-image", "truncated", "bomb", "directory"]
)
@pytest.mark.parametrize("position", ["gt", "pred"])
def test_bad_input_is_one_line_and_exit_2(tiny_gguf, pair, tmp_path, case, position):
    bad, expected = _bad_inputs(tmp_path)[case]
    gt, pred = (bad, pair[1]) if position == "gt" else (pair[0], bad)
    proc = run_here("judge", gt, pred, "--model", tiny_gguf)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0] and expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_model_paths_are_one_line(tiny_gguf, pair, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOTGGUF" * 100)
    cases = [
        (["--model", tmp_path / "none.gguf"], "model not found"),
        (["--model", junk, "--mmproj", tiny_gguf / "mmproj-f16.gguf"], "not a GGUF file"),
        (["--model", tiny_gguf, "--quant", "Q6_K"], "no Q6_K model"),
        ([], "verm-local pull gguf-q4_k_m"),  # an empty store names the command to run
    ]
    for extra, expected in cases:
        proc = run_here("judge", *pair, *extra, env={"VERM_LOCAL_HOME": str(tmp_path / "s")})
        assert proc.returncode == 3, (extra, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr
    proc = run_here("judge", *pair, "--model", tiny_gguf, "--task", "poster")
    assert proc.returncode == 2 and "unknown task" in proc.stderr


def test_python_api_reuses_a_loaded_model(tiny_gguf, pair):
    import verm_local

    with verm_local.Judge(model=tiny_gguf, quant="Q4_K_M") as j:
        first = j.judge(*pair, task="table")
        second = j.judge(*pair, task="table")
    assert isinstance(first, verm_local.Judgement)
    assert first.errors == second.errors
    assert first.timings.load_s == second.timings.load_s  # loaded once
    one_shot = verm_local.judge(*pair, task="table", model=tiny_gguf, quant="Q4_K_M")
    assert one_shot.errors == first.errors


def test_thread_count_from_the_argument_the_environment_or_the_machine(tiny_gguf, monkeypatch):
    """--threads wins, then VERM_LOCAL_THREADS, then one per physical core within the CPUs
    this process may use; a backend's name is taken where a backend object would be."""
    import verm_local
    from verm_local.hardware import default_threads

    model = tiny_gguf / "model-Q4_K_M.gguf"
    monkeypatch.delenv("VERM_LOCAL_THREADS", raising=False)  # the suite's workers set it
    with verm_local.Judge(model=model) as j:
        assert j.backend.threads == default_threads() >= 1
    monkeypatch.setenv("VERM_LOCAL_THREADS", "1")
    with verm_local.Judge(model=model) as j:
        assert j.backend.threads == 1
    with verm_local.Judge(model=model, threads=3, backend="llamacpp") as j:
        assert j.backend.threads == 3


def test_wrong_files_are_refused_before_llama_cpp_sees_them(tiny_gguf, pair, tmp_path):
    from verm_local.gguf_meta import read_metadata

    meta = read_metadata(tiny_gguf / "model-Q4_K_M.gguf")
    assert meta["general.architecture"] == "qwen3vl"
    assert meta["qwen3vl.block_count"] == 4 and meta["qwen3vl.n_deepstack_layers"] == 3
    mm = tiny_gguf / "mmproj-f16.gguf"
    swapped = run_here("judge", *pair, "--model", mm, "--mmproj", tiny_gguf / "model-F16.gguf")
    assert swapped.returncode == 3 and "pass it as --mmproj" in swapped.stderr
    data = (tiny_gguf / "model-Q4_K_M.gguf").read_bytes()
    cut = tmp_path / "model-cut.gguf"
    cut.write_bytes(data[:200])  # inside the header: refused by our reader
    proc = run_here("judge", *pair, "--model", cut, "--mmproj", mm)
    assert proc.returncode == 3 and "truncated or corrupt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    cut.write_bytes(data[: len(data) // 2])  # inside the tensors: llama.cpp refuses it
    proc = run_here("judge", *pair, "--model", cut, "--mmproj", mm)
    assert proc.returncode == 3 and "could not load the model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prompt_puts_ground_truth_image_first(tiny_gguf):
    from verm_local.backends.llamacpp import LlamaCppBackend
    from verm_local.modelref import resolve_model

    backend = LlamaCppBackend(resolve_model(tiny_gguf, quant="Q4_K_M"), n_ctx=1024)
    try:
        text = backend.render_prompt(2, "PROMPT")
    finally:
        backend.close()
    marker = "<__media__>"
    assert text.startswith("<|im_start|>user\n")
    assert text.index(marker) < text.rindex(marker) < text.index("PROMPT")
    assert text.endswith("<|im_start|>assistant\n")


def test_fast_grammar_decoding_gives_the_same_answer(tiny_gguf, pair):
    """Greedy under the grammar checks the argmax first and passes the whole vocabulary
    through the grammar only when it is refused: the same tokens as the full pass."""
    from verm_local.answer import answer_schema
    from verm_local.backends.base import Sampling

    with verm_local_judge(tiny_gguf) as j:
        images = [j.prepare(p) for p in pair]
        for task in ("chart", "table", "svg"):
            out = {}
            for fast in (True, False):
                j.backend.fast_grammar = fast
                out[fast] = j.backend.generate(
                    images,
                    default_prompt(profile(task)),
                    Sampling(max_tokens=1024),
                    answer_schema(profile(task)),
                )
            assert out[True].text == out[False].text
            assert out[True].completion_tokens == out[False].completion_tokens
            assert out[True].finish_reason == out[False].finish_reason == "stop"
            print(
                f"{task}: {out[True].decode_s:.2f} s fast vs {out[False].decode_s:.2f} s full "
                f"({j.backend.full_grammar_passes} full passes of "
                f"{out[True].completion_tokens} tokens)"
            )


def test_grammar_argmax_is_the_best_allowed_token(tiny_gguf):
    """On random logits (whose argmax the grammar mostly refuses), the picker's token is
    the best the grammar allows out of the whole vocabulary, step after step through the
    answer grammar, including the steps that go through its byte-prefix candidates."""
    import numpy as np

    from verm_local.answer import answer_grammar
    from verm_local.backends.sampling import GrammarArgmax

    with verm_local_judge(tiny_gguf) as j:
        b = j.backend
        lc, n_vocab, vocab = b.lc, b.model.n_vocab, b.model.vocab
        g = answer_grammar(profile("chart"), 1024, 2)
        sampler = lc.llama_sampler_init_grammar(vocab, g.encode(), b"root")
        pick, full = GrammarArgmax(lc, vocab, n_vocab), GrammarArgmax(lc, vocab, n_vocab)
        everything = np.arange(n_vocab, dtype=np.int32)
        rng = np.random.default_rng(0)
        try:
            for _ in range(120):
                logits = (rng.standard_normal(n_vocab) * 4).astype(np.float32)
                ok = full.allowed(sampler, everything, logits)
                assert pick(sampler, logits) == int(ok[np.argmax(logits[ok])])
                tok = int(ok[np.argmax(logits[ok])])
                lc.llama_sampler_accept(sampler, tok)
                if lc.llama_vocab_is_eog(vocab, tok):
                    break
        finally:
            lc.llama_sampler_free(sampler)
        assert pick.full_passes > 10


def test_a_reloaded_file_reuses_its_token_index(tiny_gguf, tmp_path):
    """The picker's token index is built once per file a process loads (each build walks
    the whole vocabulary): the same file loaded again takes the same index, another file
    (a copy, a changed file) builds its own, equal to it where the vocabulary is."""
    import shutil

    import numpy as np

    from verm_local.backends import native
    from verm_local.backends.sampling import GrammarArgmax, _TokenPrefixes

    def index(path):
        m = native.Model(path, vocab_only=True)
        try:
            ix = GrammarArgmax(m.lc, m.vocab, m.n_vocab, m.source).index
            fresh = _TokenPrefixes(m.lc, m.vocab, m.n_vocab)
        finally:
            m.close()
        for name in ("first", "pair", "order", "start", "eog", "single", "always"):
            assert np.array_equal(getattr(ix, name), getattr(fresh, name)), name
        return ix

    src = tiny_gguf / "model-Q4_K_M.gguf"
    first = index(src)
    assert index(src) is first
    copy = tmp_path / "copy.gguf"
    shutil.copy(src, copy)
    other = index(copy)
    assert other is not first
    with copy.open("ab") as f:  # the same path, another file: built again
        f.write(b"\0" * 32)
    assert index(copy) is not other


def test_answer_grammar_keeps_strings_json(tiny_gguf):
    """The answer grammar refuses a raw newline or tab inside a string (no strict JSON
    reader takes one) and allows the escaped ones; llama-cpp-python's own conversion of the
    same schema allows the raw ones, which a random model once wrote."""
    import json

    import numpy as np
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from verm_local.answer import answer_grammar
    from verm_local.backends.grammar import json_schema_grammar

    schema = {
        "type": "object",
        "properties": {"d": {"type": "string", "maxLength": 8}},
        "required": ["d"],
    }
    with verm_local_judge(tiny_gguf) as j:
        b = j.backend
        lc, pick = b.lc, b.picker
        logits = np.zeros(pick.n_vocab, dtype=np.float32)

        def tok(text: str) -> int:
            ids = b.model.tokenize(text)
            assert len(ids) == 1, (text, ids)
            return ids[0]

        def allowed_after(grammar: str, prefix: str) -> set[str]:
            smpl = lc.llama_sampler_init_grammar(pick.vocab, grammar.encode(), b"root")
            try:
                for t in b.model.tokenize(prefix):
                    lc.llama_sampler_accept(smpl, t)
                return {
                    s for s in ("\n", "\t", "\\", "n", "x") if pick.allows(smpl, tok(s), logits)
                }
            finally:
                lc.llama_sampler_free(smpl)

        ours = json_schema_grammar(schema)
        assert allowed_after(ours, '{"d":"a') == {"\\", "n", "x"}
        assert allowed_after(ours, '{"d":"a\\') == {"\\", "n"}  # the escapes \\ and \n
        loose = json_schema_to_gbnf(json.dumps(schema))
        assert allowed_after(loose, '{"d":"a') == {"\n", "\t", "\\", "n", "x"}
        assert b.grammar(schema) is b.grammar(dict(schema))  # compiled once per schema
        # The answer's own grammar keeps strings JSON too.
        answer = answer_grammar(profile("chart"))
        assert allowed_after(
            answer,
            '{"structure_error_count": 0, "data_error_count": 0, '
            '"text_error_count": 0, "style_error_count": 0, "errors": '
            '[{"category": "data_error", "severity": 1, "location": "a',
        ) == {"\\", "n", "x"}


def verm_local_judge(model):
    import verm_local

    return verm_local.Judge(model=model, quant="Q4_K_M", vision="gguf")


def test_one_shot_encodes_images_first_and_sizes_the_context(tiny_gguf, pair):
    """One-shot judging (what `verm-local judge` does): both images are encoded, then the
    vision projector is let go, then the context is allocated, sized for the request
    (prompt tokens + the answer reserve, 256-aligned; it grows when an answer needs
    more), not for the largest task."""
    from verm_local import events
    from verm_local.judge import Judge

    seen: list[str] = []
    with events.listening(lambda name, detail: seen.append(name)):
        with Judge(model=tiny_gguf, quant="Q4_K_M", one_shot=True) as j:
            out = j.judge(*pair, task="chart")
            engine = j.backend.batch
            assert j.backend.mctx is None  # the vision projector is gone
            n_ctx = engine.n_ctx
            need = out.timings.prompt_tokens + ANSWER_RESERVE + 1
            assert n_ctx == (need + 255) // 256 * 256 and engine.grown == 0
            assert engine.settings == {
                "n_ubatch": 256,
                "flash_attn": True,
                "kv_type": "f16",
                "batch_invariant": True,
            }
            # A table's request (a longer prompt) gets a context that holds it.
            table = j.judge(*pair, task="table")
            assert engine.n_ctx >= table.timings.prompt_tokens + ANSWER_RESERVE + 1
    # One-shot judges what a loaded model judges, token for token.
    for quant in ("F16", "Q4_K_M"):
        with Judge(model=tiny_gguf, quant=quant, one_shot=True) as j:
            once = j.judge(*pair, task="svg")
        with Judge(model=tiny_gguf, quant=quant) as j:
            kept = j.judge(*pair, task="svg")
        assert once.errors == kept.errors and once.complete and kept.complete
    first_context = seen.index("allocate context")
    assert seen.count("encode image") >= 2
    assert max(i for i, s in enumerate(seen[:first_context]) if s == "encode image") < first_context
    assert seen.index("load vision projector") < seen.index("encode image")
    # The second judgement loaded the projector again.
    assert seen.count("load vision projector") == 2


def test_context_grows_when_an_answer_needs_it(tiny_gguf, pair, tmp_path):
    """An answer longer than the context's reserve moves, with every other sequence's
    cells, into a context of the whole cap and carries on: the same tokens as a context
    sized for the cap from the start, on the single path and in a batch with a cached
    ground-truth prefix."""
    from PIL import Image

    from verm_local.backends.base import Sampling
    from verm_local.judge import Judge
    from verm_local.prompts import load_prompt

    other = tmp_path / "other.png"
    Image.open(pair[1]).rotate(90).save(other)
    texts: dict[int, list[str]] = {}
    for reserve in (4096, 8):
        with Judge(model=tiny_gguf, quant="Q8_0", vision="gguf", parallel=2, prefix_cache=1) as j:
            engine = j.backend.batch
            engine.answer_reserve = reserve
            images = [j.prepare(pair[0]), j.prepare(pair[1])]
            # No grammar: the random model rambles to the cap (120 tokens).
            single = j.backend.generate(
                images, load_prompt(profile("chart"), None), Sampling(max_tokens=120)
            )
            requests = [
                j.request(
                    pair[0], pred, "chart", sampling=Sampling(max_tokens=120), free=True
                ).request
                for pred in (pair[1], other)
            ]
            batch = j.backend.generate_all(requests)
            assert all(not isinstance(g, Exception) for g in batch)
            texts[reserve] = [single.text] + [g.text for g in batch]
            assert single.completion_tokens == 120
            assert (engine.grown > 0) == (reserve == 8)
    assert texts[8] == texts[4096]


def test_quantized_kv_cache_and_flash_attention_run(tiny_gguf, pair):
    from verm_local.judge import Judge

    with Judge(model=tiny_gguf, quant="Q8_0", kv_type="q8_0", flash_attn=True) as j:
        out = j.judge(*pair, task="svg")
    assert out.complete and out.timings.completion_tokens > 0
    with Judge(model=tiny_gguf, quant="Q8_0", n_ubatch=256) as j:
        assert j.judge(*pair, task="svg").complete


def test_progress_goes_to_stderr_and_json_carries_stage_timings(tiny_gguf, pair):
    proc = run_here(
        "judge", *pair, "--model", tiny_gguf, "--quant", "Q4_K_M", "--json", "--progress"
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    for stage in (
        "load text model",
        "encode image 1/2",
        "encode image 2/2",
        "allocate context",
        "prefill",
        "decode",
    ):
        assert f"verm-local: {stage}" in err, err
    t = json.loads(proc.stdout)["timings"]
    assert t["ttft_s"] >= t["prefill_s"] > t["vision_s"] > 0 and t["image_tokens"] == 160
    # Without a terminal (a pipe, as here) there is no progress by default, nor with -q.
    quiet = run_here("judge", *pair, "--model", tiny_gguf, "--quant", "Q4_K_M", "--json")
    assert "encode image" not in quiet.stderr
    quieter = run_here("-q", "judge", *pair, "--model", tiny_gguf, "--quant", "Q4_K_M")
    assert quieter.returncode == 0 and quieter.stderr == ""
    # The same after the verb, where people type it.
    after = run_here("judge", *pair, "--model", tiny_gguf, "--quant", "Q4_K_M", "-q")
    assert after.returncode == 0 and after.stderr == "", after.stderr
