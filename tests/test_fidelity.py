"""The conversions are shown correct: teacher-forced distributions of the GGUF models
(llama.cpp) against the HF checkpoint in float32 (transformers), same prompt, same two
images (sides multiples of 32, so both image pipelines see the same pixels)."""

import numpy as np
import pytest

from verm_local.benchmarks.kld import kl_per_token, summarize, top1_agreement
from verm_local.images import load_image
from verm_local.prompts import default_prompt
from verm_local.tasks import profile

from .conftest import FORCED_ANSWER

pytestmark = pytest.mark.slow

TASKS = ("chart", "table", "svg")


@pytest.fixture(scope="module")
def reference(tiny_hf, pair):
    from verm_local.backends.transformers import TransformersBackend
    from verm_local.modelref import resolve_model

    images = [load_image(p) for p in pair]
    assert all(im.size[0] % 32 == 0 and im.size[1] % 32 == 0 for im in images)
    hf = TransformersBackend(resolve_model(tiny_hf), dtype="float32")
    answer = hf.processor.tokenizer.encode(FORCED_ANSWER, add_special_tokens=False) + [151645]
    logprobs = {t: hf.answer_logprobs(images, default_prompt(profile(t)), answer) for t in TASKS}
    swapped = hf.answer_logprobs(images[::-1], default_prompt(profile("chart")), answer)
    tokens = hf.prompt_text_tokens(images, default_prompt(profile("chart")))
    hf.close()
    return images, answer, logprobs, swapped, tokens


def _gguf_logprobs(tiny_gguf, quant, images, answer):
    from verm_local.backends.llamacpp import LlamaCppBackend
    from verm_local.modelref import resolve_model

    ll = LlamaCppBackend(resolve_model(tiny_gguf, quant=quant), n_ctx=2048)
    try:
        out = {t: ll.answer_logprobs(images, default_prompt(profile(t)), answer) for t in TASKS}
        tokens = ll.prompt_text_tokens(images, default_prompt(profile("chart")))
    finally:
        ll.close()
    return out, tokens


@pytest.fixture(scope="module")
def gguf(tiny_gguf, reference):
    images, answer, _, _, _ = reference
    return {q: _gguf_logprobs(tiny_gguf, q, images, answer) for q in ("F16", "Q8_0", "Q4_K_M")}


def test_both_pipelines_tokenize_the_prompt_identically(reference, gguf):
    assert gguf["F16"][1] == reference[4]


def test_f16_gguf_matches_hf_float32(reference, gguf):
    _, answer, ref, swapped, _ = reference
    for task in TASKS:
        kl = kl_per_token(ref[task], gguf["F16"][0][task])
        stats = summarize(kl)
        print(f"F16 vs HF fp32 [{task}]: {stats}")
        assert stats["tokens"] == len(answer)
        assert stats["mean"] < 1e-3
    # Same argmax on >= 99% of all forced positions (3 prompts x the answer). A random
    # model's top tokens are near-ties, so a flip is printed with the reference's gap.
    ref_all = np.concatenate([ref[t] for t in TASKS])
    f16_all = np.concatenate([gguf["F16"][0][t] for t in TASKS])
    agree = top1_agreement(ref_all, f16_all)
    rows = np.nonzero(ref_all.argmax(-1) != f16_all.argmax(-1))[0]
    gaps = [float(ref_all[r].max() - ref_all[r, f16_all[r].argmax()]) for r in rows]
    print(f"F16 top-1 agreement {agree:.4f} over {len(ref_all)} positions; flips' gaps {gaps}")
    assert agree >= 0.99
    # The comparison sees the pixels: swapping the images moves the distributions far
    # more than the conversion does.
    moved = kl_per_token(swapped, gguf["F16"][0]["chart"]).mean()
    assert moved > 10 * kl_per_token(ref["chart"], gguf["F16"][0]["chart"]).mean()


def test_quant_ladder_orders_by_kl(reference, gguf):
    ref = reference[2]
    means = {}
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        per_task = [kl_per_token(ref[t], gguf[quant][0][t]).mean() for t in TASKS]
        assert all(v == v and v < float("inf") for v in per_task)  # finite
        means[quant] = sum(per_task) / len(per_task)
    print(f"mean KL vs HF fp32 over {len(TASKS)} prompts: {means}")
    assert means["F16"] <= means["Q8_0"] <= means["Q4_K_M"]


def test_odd_sized_images_get_the_same_pixels_on_both_paths(tiny_hf, tiny_gguf, tmp_path):
    """Images whose sides are not multiples of 32 are resized once by verm-local (Qwen's
    smart resize), so neither llama.cpp nor transformers resamples them differently."""
    from verm_local.backends.llamacpp import LlamaCppBackend
    from verm_local.backends.transformers import TransformersBackend
    from verm_local.modelref import resolve_model

    from .conftest import draw_chart

    gt = draw_chart(tmp_path / "gt.png", [2, 6, 3], size=(333, 251))
    pred = draw_chart(tmp_path / "pred.png", [2, 5, 3], size=(333, 251))
    images = [load_image(gt), load_image(pred)]
    assert images[0].size == (320, 256)
    hf = TransformersBackend(resolve_model(tiny_hf), dtype="float32")
    answer = hf.processor.tokenizer.encode(FORCED_ANSWER, add_special_tokens=False)
    ref = hf.answer_logprobs(images, default_prompt(profile("chart")), answer)
    ll = LlamaCppBackend(resolve_model(tiny_gguf, quant="F16"), n_ctx=2048)
    try:
        cand = ll.answer_logprobs(images, default_prompt(profile("chart")), answer)
    finally:
        ll.close()
    assert kl_per_token(ref, cand).mean() < 1e-3
