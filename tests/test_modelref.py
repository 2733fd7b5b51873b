"""What --model means: GGUF files and directories, HF and GPTQ checkpoints."""

import json
import struct

import pytest

from verm_local.errors import ModelError
from verm_local.gguf_meta import read_metadata
from verm_local.modelref import resolve_model


def _gguf(path, kv: dict):
    """A minimal GGUF header with string/uint32 values and no tensors."""
    out = bytearray(b"GGUF") + struct.pack("<IQQ", 3, 0, len(kv))
    for key, value in kv.items():
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k
        if isinstance(value, str):
            v = value.encode()
            out += struct.pack("<IQ", 8, len(v)) + v
        else:
            out += struct.pack("<II", 4, value)
    path.write_bytes(bytes(out))
    return path


def test_header_reader_reads_strings_and_ints(tmp_path):
    p = _gguf(tmp_path / "m.gguf", {"general.architecture": "qwen3vl", "qwen3vl.block_count": 4})
    assert read_metadata(p) == {"general.architecture": "qwen3vl", "qwen3vl.block_count": 4}


def test_depth_below_deepstack_is_refused_before_loading(tmp_path):
    model = _gguf(
        tmp_path / "model-F16.gguf",
        {
            "general.architecture": "qwen3vl",
            "qwen3vl.block_count": 2,
            "qwen3vl.n_deepstack_layers": 3,
            "qwen3vl.embedding_length": 256,
        },
    )
    mm = _gguf(
        tmp_path / "mmproj-f16.gguf",
        {"general.architecture": "clip", "clip.projector_type": "qwen3vl_merger"},
    )
    with pytest.raises(ModelError, match="text depth 2 leaves no layer after its 3 deepstack"):
        resolve_model(model, mm)
    # Equal counts abort llama.cpp too (the last layer is a deepstack layer): refused.
    _gguf(
        model,
        {
            "general.architecture": "qwen3vl",
            "qwen3vl.block_count": 3,
            "qwen3vl.n_deepstack_layers": 3,
            "qwen3vl.embedding_length": 256,
        },
    )
    with pytest.raises(ModelError, match="text depth 3 leaves no layer after its 3 deepstack"):
        resolve_model(model, mm)


def test_other_architectures_are_refused(tmp_path):
    model = _gguf(tmp_path / "llama.gguf", {"general.architecture": "llama"})
    mm = _gguf(tmp_path / "mmproj.gguf", {"general.architecture": "clip"})
    with pytest.raises(ModelError, match="'llama' is not qwen3vl"):
        resolve_model(model, mm)


def test_hf_and_gptq_directories_pick_the_transformers_backend(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "dtype": "bfloat16"}))
    (hf / "model.safetensors").write_bytes(b"weights")
    r = resolve_model(hf)
    assert (r.format, r.quant, r.backend) == ("hf", "bf16", "transformers") and len(r.sha256) == 64
    cfg = {"model_type": "qwen3_vl", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (hf / "config.json").write_text(json.dumps(cfg))
    r = resolve_model(hf)
    assert (r.format, r.quant) == ("gptq", "gptq-int4")
    (hf / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelError, match="is not qwen3_vl"):
        resolve_model(hf)
    (hf / "model.safetensors").unlink()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(ModelError, match="no safetensors"):
        resolve_model(hf)
