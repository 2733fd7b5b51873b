"""`convert gguf`: real llama.cpp conversion and quantization of the tiny model."""

import json
import shutil

import pytest

from verm_local.fileio import sha256_file

from .conftest import run_cli, run_here

pytestmark = pytest.mark.slow


def _tensor_types(path):
    """The ggml types of a GGUF's tensors, by name (gguf's enum), from verm-local's header
    reader: gguf's own GGUFReader parses the 151k-token vocabulary (15 s a file here); the
    reader is checked against it on the projector, which has no vocabulary."""
    from gguf import GGMLQuantizationType

    from verm_local.gguf_meta import read_tensor_types

    return {GGMLQuantizationType(t).name for t in read_tensor_types(path).values()}


def test_the_tensor_list_reads_as_gguf_reads_it(tiny_gguf, tmp_path):
    from gguf import GGUFReader

    from verm_local.errors import ModelError
    from verm_local.gguf_meta import read_tensor_types, read_values

    mm = tiny_gguf / "mmproj-f16.gguf"
    reader = GGUFReader(str(mm))
    want = {t.name: int(t.tensor_type) for t in reader.tensors}
    assert read_tensor_types(mm) == want and len(want) > 10
    assert {1, 0} <= set(want.values())  # F16 weights, F32 norms and biases
    # Every key's value, arrays in full (the tokenizer builder reads the vocabulary so).
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert any(isinstance(v, list) for v in fields.values())
    assert read_values(mm, set(fields)) == fields
    assert read_values(mm, {"no.such.key"}) == {}
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mm.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        read_tensor_types(cut)
    cut.write_bytes(mm.read_bytes()[:600])  # within the key/values
    with pytest.raises(ModelError, match="truncated or corrupt"):
        read_values(cut, set(fields))


def test_manifest_lists_every_file_with_sha256(tiny_gguf):
    manifest = json.loads((tiny_gguf / "manifest.json").read_text())
    files = {e["file"]: e for e in manifest["files"]}
    assert set(files) == {
        "model-F16.gguf",
        "model-Q8_0.gguf",
        "model-Q4_K_M.gguf",
        "mmproj-f16.gguf",
    }
    for name, entry in files.items():
        path = tiny_gguf / name
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)
    assert manifest["mmproj"] == "mmproj-f16.gguf"
    assert not list(tiny_gguf.glob(".*part")), "temp files left behind"


def test_quants_are_really_what_they_say(tiny_gguf):
    assert "F16" in _tensor_types(tiny_gguf / "model-F16.gguf")
    assert "Q8_0" in _tensor_types(tiny_gguf / "model-Q8_0.gguf")
    q4 = _tensor_types(tiny_gguf / "model-Q4_K_M.gguf")
    # K-quants really used: the widths are multiples of 256, no q5_0 fallback.
    assert "Q4_K" in q4 and "Q6_K" in q4 and "Q5_0" not in q4
    sizes = [(tiny_gguf / f"model-{q}.gguf").stat().st_size for q in ("F16", "Q8_0", "Q4_K_M")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_refuses_a_checkpoint_that_is_not_qwen3_vl(tmp_path, tiny_hf):
    fake = tmp_path / "llama"
    shutil.copytree(tiny_hf, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (fake / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("convert", "gguf", fake, tmp_path / "out")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LlamaForCausalLM is not Qwen3VLForConditionalGeneration" in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_refuses_an_incomplete_checkpoint(tmp_path, tiny_hf):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf, broken)
    (broken / "model.safetensors").unlink()
    proc = run_cli("convert", "gguf", broken, tmp_path / "out")
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines() == [
        f"verm-local: error: {broken}: incomplete checkpoint, no safetensors weights"
    ]
    proc = run_cli("convert", "gguf", tmp_path / "nowhere", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_refuses_a_text_model_with_no_layer_after_its_deepstack_layers(tmp_path, tiny_hf):
    """llama.cpp aborts (GGML_ASSERT ggml_can_repeat in ggml_add) on the first text after
    an image when the last text layer is a deepstack layer (issue 28: the old 8b-vision
    shape, 3 layers and 3 deepstack layers): refused in one line before anything runs."""
    from verm_local.convert.tiny_model import SHAPES
    from verm_local.errors import ModelError
    from verm_local.gguf_meta import check_depth

    for text, vision in SHAPES.values():  # every shape the builder offers can be judged
        check_depth("shape", text["num_hidden_layers"], len(vision["deepstack_visual_indexes"]))
    with pytest.raises(ModelError, match="leaves no layer after its 3 deepstack layers"):
        check_depth("model.gguf", 3, 3)
    shallow = tmp_path / "shallow"
    shutil.copytree(tiny_hf, shallow)
    cfg = json.loads((shallow / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = len(cfg["vision_config"]["deepstack_visual_indexes"])
    (shallow / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("convert", "gguf", shallow, tmp_path / "out")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "text depth 3 leaves no layer after its 3 deepstack" in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_converter_failure_is_one_line_and_leaves_nothing(tmp_path, tiny_hf):
    """The checkpoint passes the checks, llama.cpp's converter fails on it (a tokenizer.json
    without a vocabulary): one line naming the step, and no file written, the text model's
    included (the converter's runs share one process)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf, broken)
    (broken / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    proc = run_here("convert", "gguf", broken, out, "--quant", "Q8_0")
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"verm-local: error: llama.cpp converter failed on {broken} (f16): ")
    assert "Traceback" not in proc.stderr and not list(out.iterdir())
