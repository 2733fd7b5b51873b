"""The vision tower on ONNX Runtime feeding llama.cpp: shared preprocessing, export
correctness, and the judge end to end with --vision onnx."""

import json
import shutil

import numpy as np
import pytest
import torch

from verm_local.benchmarks.kld import kl_per_token
from verm_local.errors import ModelError, VermError
from verm_local.images import load_image
from verm_local.prompts import default_prompt
from verm_local.tasks import profile
from verm_local.vision_onnx import (
    VisionSpec,
    choose_vision,
    graph_inputs,
    position_interpolation,
    rotary_positions,
)

from .conftest import FORCED_ANSWER, draw_chart, run_here


def test_choice_of_vision_path_is_a_pure_function(tmp_path):
    assert choose_vision("auto", tmp_path, True, False)[0] == "onnx"
    assert choose_vision("auto", None, True, False)[0] == "gguf"
    path, reason = choose_vision("auto", tmp_path, False, False)
    assert path == "gguf" and "onnxruntime is not installed" in reason
    assert choose_vision("auto", tmp_path, True, True)[0] == "gguf"
    assert choose_vision("gguf", tmp_path, True, False)[0] == "gguf"
    with pytest.raises(ModelError, match="no ONNX vision tower"):
        choose_vision("onnx", None, True, False)
    with pytest.raises(VermError, match="needs onnxruntime"):
        choose_vision("onnx", tmp_path, False, False)


@pytest.mark.parametrize("gh,gw", [(16, 20), (2, 2), (32, 8), (64, 64)])
def test_grid_inputs_match_transformers(gh, gw):
    from transformers.vision_utils import (
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    thw = torch.tensor([[1, gh, gw]])
    idx, wts = get_vision_interpolation_indices_and_weights(
        thw, num_grid_per_side=48, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    mine_idx, mine_wts = position_interpolation(gh, gw, 2, 48)
    assert np.array_equal(mine_idx, idx.numpy())
    assert np.allclose(mine_wts, wts.numpy(), atol=1e-6)
    assert np.array_equal(rotary_positions(gh, gw, 2), get_vision_position_ids(thw, 2).numpy())


@pytest.mark.slow
def test_patches_match_the_hf_image_processor(tiny_hf, pair):
    from transformers import AutoProcessor

    img = load_image(pair[0])
    hf = AutoProcessor.from_pretrained(str(tiny_hf)).image_processor(
        images=[img.image], return_tensors="pt"
    )
    ours = graph_inputs(img, VisionSpec())["patches"]
    assert hf["image_grid_thw"].tolist() == [[1, 16, 20]]
    assert np.abs(ours - hf["pixel_values"].numpy()).max() < 1e-5


@pytest.mark.slow
def test_onnx_fp32_matches_the_pytorch_tower_on_any_grid(tiny_hf, tiny_onnx, tmp_path):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from verm_local.vision_onnx import OnnxVision

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_hf), dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(str(tiny_hf)).image_processor
    onnx = OnnxVision(tiny_onnx / "fp32")
    for size in [(320, 256), (512, 128), (96, 224)]:  # grids other than the export example
        img = load_image(draw_chart(tmp_path / f"{size}.png", [2, 4, 3], size=size))
        b = proc(images=[img.image], return_tensors="pt")
        with torch.no_grad():
            out = model.model.visual(b["pixel_values"], grid_thw=b["image_grid_thw"])
        ref = torch.cat([out.pooler_output, *out.deepstack_features], dim=1).numpy()
        got, _ = onnx.encode(img)
        assert got.shape == ref.shape == (img.visual_tokens, 4 * 256)
        assert np.abs(got - ref).max() < 1e-4


@pytest.mark.slow
def test_onnx_fp32_matches_the_f32_mmproj(tiny_gguf, tiny_mmproj_f32, tiny_onnx, pair):
    from verm_local.backends.llamacpp import LlamaCppBackend
    from verm_local.modelref import resolve_model
    from verm_local.vision_onnx import OnnxVision

    model = resolve_model(tiny_gguf / "model-F16.gguf", mmproj=tiny_mmproj_f32)
    assert model.mmproj.name == "mmproj-f32.gguf"
    images = [load_image(p) for p in pair]
    mm = LlamaCppBackend(model, n_ctx=2048)
    ox = LlamaCppBackend(model, n_ctx=2048, vision=OnnxVision(tiny_onnx / "fp32"))
    try:
        e_mm, e_ox = mm.image_embeddings(images[0]), ox.image_embeddings(images[0])
        rel = np.linalg.norm(e_mm - e_ox) / np.linalg.norm(e_mm)
        print(f"ONNX fp32 vs f32 mmproj: relative error {rel:.2e}")
        assert e_mm.shape == e_ox.shape and rel < 1e-3
        prompt = default_prompt(profile("chart"))
        answer = mm.model.tokenize(FORCED_ANSWER)
        kl = kl_per_token(
            mm.answer_logprobs(images, prompt, answer), ox.answer_logprobs(images, prompt, answer)
        )
        print(f"judge logits, ONNX fp32 path vs mmproj path: mean KL {kl.mean():.2e}")
        assert kl.mean() < 1e-3
        int8 = LlamaCppBackend(model, n_ctx=2048, vision=OnnxVision(tiny_onnx / "int8"))
        e_i8 = int8.image_embeddings(images[0])
        int8.close()
        print(
            f"ONNX int8 vs f32 mmproj: relative error "
            f"{np.linalg.norm(e_mm - e_i8) / np.linalg.norm(e_mm):.2e}"
        )
    finally:
        mm.close()
        ox.close()


@pytest.mark.slow
def test_judge_with_onnx_vision_end_to_end(tiny_gguf, tiny_onnx, pair, tmp_path):
    proc = run_here(
        "judge",
        *pair,
        "--model",
        tiny_gguf,
        "--quant",
        "Q4_K_M",
        "--json",
        "--vision",
        "onnx",
        "--vision-model",
        tiny_onnx / "int8",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"]["vision"] == "onnx-int8" and out["timings"]["vision_s"] > 0
    # auto uses a tower kept in <model>/onnx; without one, the mmproj.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gguf, model_dir)
    proc = run_here("judge", *pair, "--model", model_dir, "--quant", "Q4_K_M", "--json")
    assert json.loads(proc.stdout)["model"]["vision"] == "mmproj-f16"
    shutil.copytree(tiny_onnx / "fp32", model_dir / "onnx")
    proc = run_here("judge", *pair, "--model", model_dir, "--quant", "Q4_K_M", "--json")
    assert json.loads(proc.stdout)["model"]["vision"] == "onnx-fp32"
    proc = run_here("judge", *pair, "--model", tiny_gguf, "--vision", "onnx")
    assert proc.returncode == 3 and "no ONNX vision tower" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_vision_stage_benchmark_reports_every_path(tiny_gguf, tiny_onnx, pair):
    from verm_local.benchmarks.vision_stage import markdown, measure

    rows = measure(tiny_gguf, pair[0], [tiny_onnx / "fp32", tiny_onnx / "int8"], repeat=1)
    assert [r["path"] for r in rows] == ["onnx fp32", "mmproj f16", "onnx int8"]
    assert all(r["median_s"] > 0 and r["tokens"] == 80 for r in rows)
    assert rows[1]["rel_error_vs_ref"] < 1e-2  # f16 mmproj vs the exact fp32 tower
    assert "| onnx int8 |" in markdown(rows, "gt.png", (320, 256))
