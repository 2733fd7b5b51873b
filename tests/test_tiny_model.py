"""The offline test model: real Qwen2 tokenizer, Qwen-VL specials, K-quant-able widths."""

import json

import pytest
import torch

from verm_local.constants import SPECIAL_TOKENS

pytestmark = pytest.mark.slow


def test_tokenizer_reproduces_llama_cpp_vectors(tiny_hf):
    from transformers import AutoTokenizer

    from verm_local.convert.llama_sources import tokenizer_vectors

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    vectors = tokenizer_vectors()
    assert len(vectors) == 46
    for text, expected in vectors:
        assert tok.encode(text, add_special_tokens=False) == expected, text
    assert len(tok) == 151936
    for content, tid in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(content) == tid
        assert tok.encode(content, add_special_tokens=False) == [tid]


def test_chat_template_places_images_as_vision_blocks(tiny_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare"}],
        }
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == f"<|im_start|>user\n{block}{block}compare<|im_end|>\n<|im_start|>assistant\n"


def test_config_shapes(tiny_hf):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    for width in (
        text["hidden_size"],
        text["intermediate_size"],
        vision["hidden_size"],
        vision["intermediate_size"],
    ):
        assert width % 256 == 0
    assert text["num_hidden_layers"] >= len(vision["deepstack_visual_indexes"])
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (tiny_hf / name).is_file(), name


def test_weights_are_deterministic_for_a_seed():
    from verm_local.convert.tiny_model import make_model

    a, b, c = (make_model(s).state_dict() for s in (0, 0, 1))
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shapes_that_decode_keep_a_layer_after_the_deepstack_ones():
    """llama.cpp asserts when the last text layer is a deepstack layer (so the 3-layer
    8b-vision shape is for vision timings only); every other shape keeps one more, and
    8b-text4 has the real 8B text widths."""
    from verm_local.convert.tiny_model import SHAPES, TEXT_8B

    for name, (text, vision) in SHAPES.items():
        assert vision["out_hidden_size"] == text["hidden_size"], name
        if name != "8b-vision":
            assert text["num_hidden_layers"] > len(vision["deepstack_visual_indexes"]), name
    text, _ = SHAPES["8b-text4"]
    widths = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    )
    assert {k: text[k] for k in widths} == {k: TEXT_8B[k] for k in widths}
    assert text["num_hidden_layers"] == 4
