"""transformers backend (bf16 reference) and GPTQ int4/int8 export and inference."""

import json

import jsonschema
import pytest
from safetensors import safe_open

from verm_local.backends.gptq_kernels import build_gptq_kernels
from verm_local.benchmarks.kld import kl_per_token, summarize
from verm_local.fileio import sha256_file
from verm_local.hardware import GPTQ_AVX512_BF16, gptq_cpu_kernels, probe
from verm_local.images import load_image
from verm_local.prompts import default_prompt
from verm_local.schema import judgement_schema
from verm_local.tasks import profile

from .conftest import FORCED_ANSWER, run_cli, run_here

pytestmark = pytest.mark.slow


def _judge(model, pair, *extra):
    proc = run_here("judge", *pair, "--model", model, "--json", "--max-errors", "1", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    jsonschema.validate(out, judgement_schema())
    return out


def test_the_gptq_kernels_this_cpu_loads_are_built():
    """scripts/install.sh builds GPTQModel's CPU kernels that this machine loads
    (`hardware.gptq_cpu_kernels`): each loads from GPTQModel's cache (or is built now, on
    an install from before that step), and the fused int4 kernel is chosen by the CPU
    features GPTQModel's own check reads."""
    from gptqmodel.utils.cpu_features import _REQUIRED_AVX512_BF16_FLAGS, has_avx512_bf16

    names = gptq_cpu_kernels(probe(with_torch=False))
    assert set(GPTQ_AVX512_BF16) == _REQUIRED_AVX512_BF16_FLAGS - {"xsave"}
    assert ("int4_qzero_group_scaled_cpu" in names) == has_avx512_bf16()
    results = build_gptq_kernels(names)
    assert [(name, why) for name, _, why in results] == [(name, None) for name in names]


def test_the_install_step_goes_on_where_a_kernel_does_not_build(tmp_path):
    """`python -m verm_local.backends.gptq_kernels`, as install.sh runs it, where the C++
    compiler fails: one line per kernel saying why, exit 0 (GPTQModel works without them),
    and nothing built in the cache it was given."""
    import os
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("c++", "g++"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CXX": str(bin_dir / "c++"),
        "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "verm_local.backends.gptq_kernels"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"GPTQModel kernel {name}" for name in gptq_cpu_kernels(probe(with_torch=False))
    ]
    assert all("not built, GPTQModel falls back (" in line for line in lines)
    assert all("build_root" not in line and len(line) < 300 for line in lines), lines
    assert not list((tmp_path / "ext").rglob("*.so"))


def test_transformers_backend_judges_the_hf_checkpoint(tiny_hf, tiny_gguf, pair):
    out = _judge(tiny_hf, pair, "--backend", "transformers", "--task", "table")
    assert out["model"]["quant"] == "bf16@float32"
    assert len(out["errors"]) <= 1
    assert all(
        e["category"] in ("layout_error", "text_error", "numeric_error") for e in out["errors"]
    )
    # Same prompt and image handling as llama.cpp: the same token count.
    gguf = _judge(tiny_gguf, pair, "--task", "table", "--quant", "Q4_K_M")
    assert out["timings"]["prompt_tokens"] == gguf["timings"]["prompt_tokens"]


def test_backend_must_match_the_format(tiny_hf, pair):
    proc = run_here("judge", *pair, "--model", tiny_hf, "--backend", "llamacpp")
    assert proc.returncode == 3 and "runs on the transformers backend" in proc.stderr


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_export_is_a_gptq_v1_checkpoint_with_manifest(request, bits):
    out = request.getfixturevalue(f"tiny_gptq{bits}")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    # What transformers and vLLM read to serve a GPTQ checkpoint.
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == bits
    assert qcfg["group_size"] == 128 and qcfg.get("checkpoint_format", "gptq") == "gptq"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "gptq" and manifest["bits"] == bits
    for entry in manifest["files"]:
        assert entry["sha256"] == sha256_file(out / entry["file"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        qweights = [k for k in keys if k.endswith(".qweight")]
        assert qweights and all(k.startswith("model.language_model.layers.") for k in qweights)
        # The vision tower stays 16-bit.
        vision = [k for k in keys if k.startswith("model.visual.") and k.endswith(".weight")]
        assert vision and all(
            str(f.get_tensor(k).dtype) in ("torch.bfloat16", "torch.float16") for k in vision[:20]
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_judges_and_reports_kl_against_the_reference(request, tiny_hf, pair, bits):
    from verm_local.backends.transformers import TransformersBackend
    from verm_local.modelref import resolve_model

    model = request.getfixturevalue(f"tiny_gptq{bits}")
    out = _judge(model, pair)
    assert out["model"]["quant"] == f"gptq-int{bits}"

    images = [load_image(p) for p in pair]
    prompt = default_prompt(profile("chart"))
    ref = TransformersBackend(resolve_model(tiny_hf))
    answer = ref.processor.tokenizer.encode(FORCED_ANSWER, add_special_tokens=False)
    ref_lp = ref.answer_logprobs(images, prompt, answer)
    cand = TransformersBackend(resolve_model(model))
    # On the CPU GPTQModel's layers run eagerly: none keeps the torch.compile wrapper that
    # GPTQModel sets on its int8 kernel's dequantizer as it loads (eager_gptq_layers).
    layers = [m for m in cand.model.modules() if hasattr(m, "qweight")]
    assert layers and not [m for m in layers if "dequantize_weight" in vars(m)]
    if bits == 4 and "int4_qzero_group_scaled_cpu" in gptq_cpu_kernels(probe(with_torch=False)):
        # The fused kernel that install.sh builds for this CPU is the one the loader took.
        assert {type(m).__name__ for m in layers} == {"TorchCpuAvx512Linear"}
    stats = summarize(kl_per_token(ref_lp, cand.answer_logprobs(images, prompt, answer)))
    print(f"GPTQ int{bits} vs HF fp32: {stats}")
    assert stats["tokens"] == len(answer) and stats["mean"] == stats["mean"]
    assert 0 <= stats["mean"] < 1.0


def test_gptq_refuses_bad_input(tmp_path, tiny_hf):
    proc = run_cli("convert", "gptq", tmp_path / "nowhere", tmp_path / "out")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    fake = tmp_path / "llama"
    fake.mkdir()
    (fake / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    proc = run_cli("convert", "gptq", fake, tmp_path / "out")
    assert proc.returncode == 3 and "is not Qwen3VLForConditionalGeneration" in proc.stderr
    proc = run_cli("convert", "gptq", tiny_hf, tmp_path / "out", "--bits", "3")
    assert proc.returncode == 2 and "--bits must be 4 or 8" in proc.stderr


def test_greedy_grammar_shortcut_picks_what_the_full_mask_picks(tiny_hf):
    """The transformers backend's grammar under greedy decoding checks the scores' own
    argmax first and builds the vocabulary's mask only when the grammar refuses it: step by
    step on random scores, the tokens chosen equal those of xgrammar's full mask (its own
    processor), over answers with bounded strings both short and long, and most steps
    inside strings take the shortcut."""
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer
    from xgrammar.contrib.hf import LogitsProcessor

    from verm_local.answer import answer_grammar
    from verm_local.backends.transformers import STOP_IDS, _GrammarMask
    from verm_local.decoding import Sampling

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=151936, stop_token_ids=[*STOP_IDS])
    compiler = xgr.GrammarCompiler(info)
    gen = torch.Generator().manual_seed(0)
    shortcuts = 0
    for task, max_tokens in (("chart", 300), ("table", 400), ("svg", 600)):
        compiled = compiler.compile_grammar(answer_grammar(profile(task), max_tokens, 2))
        fast = _GrammarMask(compiled, Sampling(temperature=0.0))
        full = LogitsProcessor(compiled)
        filled = 0
        original = fast.matcher.fill_next_token_bitmask

        def counting(*a, _orig=original):
            nonlocal filled
            filled += 1
            return _orig(*a)

        fast.matcher.fill_next_token_bitmask = counting
        ids = torch.tensor([[1, 2, 3]])
        for step in range(300):
            scores = torch.randn(1, 151936, generator=gen)
            # Text-like scores: a few ordinary tokens score high, as a model's would.
            scores[0, torch.randint(0, 150000, (40,), generator=gen)] += 6.0
            a = fast(ids, scores.clone()).argmax(-1)
            b = full(ids, scores.clone()).argmax(-1)
            assert int(a) == int(b), (task, step)
            ids = torch.cat([ids, b[:, None]], dim=1)
            if int(b) in STOP_IDS:
                break
        fast(ids, scores)  # the last token accepted, as the next step would
        assert fast.matcher.is_terminated() == (int(b) in STOP_IDS)
        shortcuts += step + 1 - filled
    assert shortcuts > 10  # inside strings the argmax was allowed, no mask built
    # Sampling always masks in full: the draw is over the allowed tokens.
    sampled = _GrammarMask(compiled, Sampling(temperature=0.7))
    out = sampled(torch.tensor([[1]]), torch.zeros(1, 151936))
    allowed = (out[0] > float("-inf")).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith("{") for t in allowed)
