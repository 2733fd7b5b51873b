"""One request, one answer (issue 34): with the batch-invariant kernels a greedy judgement's
logits are compared bitwise, not only its answer, across the paths it can take: alone,
with drafted tokens, beside 1 and 7 other sequences, with its ground truth's prefix taken
from the cache, in other prompt chunks; for every quant of the catalog. Then the greedy
judgements of `judge`, `judge --pairs` and `serve` (`/v1/judge`, `/v1/chat/completions`,
alone and under 8 concurrent clients, with and without speculation) are the same, task by
task. Random weights flip on the smallest rounding, which makes them a sharp test."""

from __future__ import annotations

import base64
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from verm_local.select import decode_path, determinism_decision

from .conftest import run_here

TASKS = ("chart", "table", "svg")
QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
AMD = ("avx", "avx2", "avx512f", "fma", "f16c")


# ---------------------------------------------------------------- the decision (pure)


def test_determinism_is_on_where_the_build_and_device_allow():
    on = determinism_decision(1)
    assert on.on and "revision 1" in on.reason
    assert not determinism_decision(0).on and "install.sh" in determinism_decision(0).reason
    cuda = determinism_decision(1, device="cuda", gpu_layers=-1)
    assert not cuda.on and "GPU" in cuda.reason
    assert not determinism_decision(1, backend="transformers").on
    assert not determinism_decision(1, override=False).on
    from verm_local.errors import InputError, PlanError

    with pytest.raises(PlanError, match="cannot hold"):
        determinism_decision(0, override="on")
    with pytest.raises(InputError):
        determinism_decision(1, override="sometimes")


def test_doctor_says_which_kernels_the_build_has():
    """doctor's build line, from recorded machines: none, revision 1 (the same answers,
    batched Q8_0 one vec_dot at a time: rebuild for speed), revision 2 (the tile, which
    is x86 AVX2's: an Apple M2 keeps vec_dot, and no rebuild gives it more)."""
    from verm_local.doctor import build_guarantees

    from .test_select import LAPTOP_8GB, M2_16GB

    def line(revision: int, machine=LAPTOP_8GB) -> str:
        return build_guarantees(dataclasses.replace(machine, llama_batch_invariant=revision))

    assert "no batch-invariant kernels" in line(0) and "install.sh" in line(0)
    assert "revision 1" in line(1) and "batches slower" in line(1) and "install.sh" in line(1)
    assert "revision 2" in line(2) and "tile kernel with vec_dot's sums" in line(2)
    assert "install.sh" not in line(2)
    for revision in (1, 2):
        arm = line(revision, M2_16GB)
        assert "x86 AVX2's" in arm and "install.sh" not in arm and "GPU backend" in arm


def test_weights_load_plain_where_decoding_is_deterministic():
    det, repack, why = decode_path(1, AMD, quant="Q8_0")
    assert det.on and repack is False and "deterministic" in why
    # --no-deterministic: the CPU's own decision again (Q8_0 repacked on AVX-512)
    det, repack, _ = decode_path(1, AMD, quant="Q8_0", deterministic=False)
    assert not det.on and repack is True
    # --repack forces repacked weights in: auto determinism gives way, --deterministic refuses
    det, repack, _ = decode_path(1, AMD, quant="Q4_K_M", repack=True)
    assert repack and not det.on and "--repack" in det.reason
    from verm_local.errors import PlanError

    with pytest.raises(PlanError, match="repack"):
        decode_path(1, AMD, repack=True, deterministic=True)
    # A build without the kernels keeps the CPU's repack decision and says why it is off.
    det, repack, _ = decode_path(0, AMD, quant="Q8_0")
    assert not det.on and repack is True


def test_the_wheel_key_follows_the_patches(tmp_path):
    from verm_local.hardware import patches_digest, wheel_key

    assert patches_digest(tmp_path) == ""
    (tmp_path / "a.patch").write_text("one")
    first = patches_digest(tmp_path)
    (tmp_path / "a.patch").write_text("two")
    assert patches_digest(tmp_path) not in ("", first)
    stock = wheel_key("0.3.36", "", "x86_64", AMD)
    assert wheel_key("0.3.36", "", "x86_64", AMD, first) != stock
    assert wheel_key("0.3.36", "", "x86_64", AMD, "") == stock  # no patches: the old key


def test_the_installed_build_has_the_kernels():
    """scripts/install.sh builds llama-cpp-python with scripts/patches/ applied, this
    revision of them (2: the Q8_0 tile kernel), so a wheel cached before is not taken."""
    from verm_local.hardware import probe_batch_invariant

    assert probe_batch_invariant() >= 2


# ---------------------------------------------------------------- logits, bitwise


@pytest.fixture(scope="module")
def quants(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny model in every quant of the catalog (Q6_K and Q5_K_M made here from F16)."""
    from verm_local.convert.gguf import quantize_gguf

    out = tmp_path_factory.mktemp("quants")
    for f in ("model-F16.gguf", "model-Q8_0.gguf", "model-Q4_K_M.gguf", "mmproj-f16.gguf"):
        (out / f).symlink_to(tiny_gguf / f)
    for q in ("Q6_K", "Q5_K_M"):
        quantize_gguf(tiny_gguf / "model-F16.gguf", out / f"model-{q}.gguf", q)
    return out


def _traced(j, gt, pred, task="chart", reuse_prefix=False):
    req = j.request(gt, pred, task, max_errors=2).request
    return dataclasses.replace(req, trace=True, reuse_prefix=reuse_prefix)


def _run(j, requests):
    out = j.backend.generate_all(requests)
    for g in out:
        assert not isinstance(g, Exception), g
    return out


def _same_logits(a, b, what: str) -> None:
    assert a.trace is not None and b.trace is not None
    assert a.trace.shape == b.trace.shape, f"{what}: {a.trace.shape} vs {b.trace.shape}"
    # Bit for bit (NaNs and signed zeros included); how far apart only when they are not.
    if a.trace.dtype != b.trace.dtype or a.trace.tobytes() != b.trace.tobytes():
        diff = np.abs(a.trace.astype(np.float64) - b.trace.astype(np.float64)).max()
        pytest.fail(f"{what}: logits differ by up to {diff:g}")
    assert a.text == b.text


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
def test_logits_are_bitwise_equal_on_every_path(quants, chart_group, quant):
    from verm_local.judge import Judge

    gt, preds = chart_group
    model = str(quants / f"model-{quant}.gguf")
    common = dict(vision="gguf", image_tokens=64, max_tokens=48)
    with Judge(model, parallel=8, prefix_cache=2, speculate=False, **common) as j:
        b = j.backend
        assert b.deterministic.on, b.deterministic.reason
        assert b.repack is False
        base = _traced(j, gt, preds[0])
        alone = _run(j, [base])[0]
        assert b.batch.ctx.batch_invariant  # the context llama.cpp made took the setting
        assert alone.deterministic and len(alone.trace) >= 2
        b.batch.speculate = True
        drafted = _run(j, [base])[0]
        b.batch.speculate = False
        assert drafted.drafted > 0 and drafted.forward_passes < len(drafted.trace)
        _same_logits(alone, drafted, f"{quant}: drafted")
        others = [_traced(j, gt, p) for p in preds[1:]]
        _same_logits(alone, _run(j, [base, others[0]])[0], f"{quant}: batch of 2")
        crowd = _run(j, [others[3], base, *others[:3], *others[4:]])
        _same_logits(alone, crowd[1], f"{quant}: batch of 8")
        # The ground truth's prefix evaluated for another prediction, then reused.
        _run(j, [dataclasses.replace(others[0], reuse_prefix=True)])
        hits = b.batch.cache.hits
        cached = _run(j, [_traced(j, gt, preds[0], reuse_prefix=True)])[0]
        assert b.batch.cache.hits == hits + 1
        _same_logits(alone, cached, f"{quant}: prefix from the cache")
    # One-shot judging as `judge` does it, its prompt in chunks of 16 rows, one thread.
    with Judge(model, one_shot=True, n_ubatch=16, threads=1, **common) as j:
        chunked = _run(j, [_traced(j, gt, preds[0])])[0]
        _same_logits(alone, chunked, f"{quant}: one-shot, n_ubatch 16, 1 thread")


@pytest.mark.slow
def test_off_says_so_and_drafts_stay_off(tiny_gguf, chart_group):
    from verm_local.judge import Judge

    gt, preds = chart_group
    with Judge(
        str(tiny_gguf / "model-Q4_K_M.gguf"), vision="gguf", image_tokens=64, max_tokens=24,
        deterministic=False,
    ) as j:  # fmt: skip
        assert not j.backend.deterministic.on and "asked for" in j.backend.deterministic.reason
        assert j.backend.batch.speculate is False  # drafts are exact only where invariant
        judgement = j.judge(gt, preds[0], unreadable="score")
        assert judgement.deterministic is False


# ---------------------------------------------------------------- the same answer everywhere


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _comparable(judgement: dict) -> dict:
    keep = {"timings", "model", "prompt_source", "id", "line"}
    out = {k: v for k, v in judgement.items() if k not in keep}
    out["completion_tokens"] = judgement["timings"]["completion_tokens"]
    return out


def _post(server, path: str, body: dict) -> dict:
    code, out = server.request("POST", path, json.dumps(body).encode())
    assert code == 200, out
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_one_answer_per_request_on_every_path(tiny_gguf, served, chart_group, tmp_path, task):
    from verm_local.answer import answer_schema
    from verm_local.judge import build_request
    from verm_local.schema import Judgement, extract_json
    from verm_local.tasks import decoding, profile

    gt, preds = chart_group
    model = tiny_gguf / "model-Q8_0.gguf"
    flags = ["-m", model, "--vision", "gguf", "--max-tokens", "400", "--image-tokens", "64",
             "--task", task, "--max-errors", "2"]  # fmt: skip
    # `judge` alone (one-shot), with and without drafts.
    ref = None
    for spec in ("--speculate", "--no-speculate"):
        proc = run_here("judge", gt, preds[0], *flags, "--json", spec)
        assert proc.returncode in (0, 7), proc.stderr[-2000:]
        got = json.loads(proc.stdout)
        assert got["deterministic"] is True
        ref = ref or _comparable(got)
        assert _comparable(got) == ref, spec
    # `judge --pairs`: the pair among 7 others sharing its ground truth (batched, prefix).
    rows = tmp_path / "pairs.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"gt": str(gt), "pred": str(p), "task": task, "id": i}) + "\n"
            for i, p in enumerate(preds)
        )  # fmt: skip
    )
    proc = run_here("judge", "--pairs", rows, *flags, "--parallel", "8", "-q")
    assert proc.returncode in (0, 7), proc.stderr[-2000:]
    first = json.loads(proc.stdout.splitlines()[0])
    assert first["id"] == 0 and _comparable(first) == ref
    # serve: /v1/judge alone and as one of 8 concurrent clients.
    body = {"gt": _data_url(gt), "pred": _data_url(preds[0]), "task": task, "max_errors": 2}
    p = profile(task)
    jr = build_request(gt, preds[0], p, sampling=decoding(p).with_(max_tokens=400),
                       max_errors=2, image_tokens=64)  # fmt: skip
    from verm_local.images import data_url

    chat = {
        "messages": jr.messages_with(lambda img: {"type": "image_url",
                                                   "image_url": {"url": data_url(img)}}),
        "max_tokens": 400,
        "temperature": 0,
        "response_format": {"type": "json_schema",
                            "json_schema": {"schema": answer_schema(p, 400, 2)}},
    }  # fmt: skip
    if jr.request.sampling.repeat_penalty != 1.0:
        chat["repetition_penalty"] = jr.request.sampling.repeat_penalty
    # The server drafts (its default here); `judge --no-speculate` above did not.
    assert _comparable(_post(served, "/v1/judge", body)) == ref
    others = [{**body, "pred": _data_url(q)} for q in preds[1:]]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_post, served, "/v1/judge", b) for b in [body, *others]]
        crowd = [f.result() for f in futures]
    assert _comparable(crowd[0]) == ref
    # The same request as an OpenAI chat completion (the authors' layout, the answer's
    # schema): the same answer, alone and with 7 others at once.
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_post, served, "/v1/chat/completions", chat) for _ in range(8)]
        texts = [f.result()["choices"][0]["message"]["content"] for f in futures]
    assert len(set(texts)) == 1
    if ref["complete"]:
        read = Judgement.from_answer(p, extract_json(texts[0]))
        assert read.errors == [
            type(e).model_validate(e) for e in Judgement.model_validate(crowd[0]).errors
        ]
        assert read.counts == ref["counts"]
