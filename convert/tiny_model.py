"""A tiny random-weight Qwen3-VL checkpoint, built offline and deterministic for a seed.

It has Visual-ERM's architecture (`Qwen3VLForConditionalGeneration`) and the real Qwen2
tokenizer (151,936 entries, rebuilt from llama.cpp's `ggml-vocab-qwen2.gguf`, with the
Qwen-VL special tokens at their real ids), so every stage of the pipeline (conversion,
quantization, multimodal inference) runs for real; only the weights are random."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from verm_local.constants import MODEL_ARCHITECTURE, SPECIAL_TOKENS, VOCAB_SIZE
from verm_local.errors import VermError
from verm_local.fileio import atomic_directory

from .llama_sources import qwen2_vocab, tokenizer_vectors

log = logging.getLogger(__name__)

# Widths are multiples of 256 so K-quants (256-wide super-blocks) are really exercised;
# text depth (4) > number of deepstack layers (3): llama.cpp needs a layer after the last
# deepstack one (gguf_meta.check_depth).
TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
VISION = dict(
    depth=4,
    hidden_size=256,
    intermediate_size=512,
    num_heads=2,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=256,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[1, 2, 3],
)

# Real Qwen3-VL-8B shapes (its config.json), for speed and memory work with random weights.
TEXT_8B = dict(
    TEXT,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=262144,
)
VISION_8B = dict(
    VISION,
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    out_hidden_size=4096,
    deepstack_visual_indexes=[8, 16, 24],
)
SHAPES = {
    "tiny": (TEXT, VISION),
    # The real vision tower with a 4-layer text model: vision-stage timings without 16 GB.
    # Four, not three: the text model needs a layer after its 3 deepstack layers.
    "8b-vision": (dict(TEXT_8B, num_hidden_layers=4), VISION_8B),
    "8b": (TEXT_8B, VISION_8B),
    # Real text widths with 4 of the 36 layers and the tiny vision tower: a weight-heavy
    # text model's decode and batching (4.1 GB) where the full 8B does not fit or run.
    "8b-text4": (dict(TEXT_8B, num_hidden_layers=4), dict(VISION, out_hidden_size=4096)),
}

# Renders image parts as vision blocks (the Qwen-VL convention); text parts verbatim.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}


# Qwen2's pre-tokenizer split (transformers' qwen2 PRETOKENIZE_REGEX; llama.cpp's "qwen2").
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def qwen2_tokenizer_json(gguf: Path) -> dict:
    """tokenizer.json of the byte-level BPE in llama.cpp's vocabulary file, as transformers'
    GGUF loader builds it (tokens, merges, control tokens special, user-defined ones
    added), from the header read directly: gguf's reader takes 25 s over the 151k
    entries, element by element."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    from verm_local.gguf_meta import read_values

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    values = read_values(gguf, set(keys))
    if set(values) != set(keys):
        raise VermError(f"{gguf}: no BPE vocabulary in it")
    tokens, types, merges = (values[k] for k in keys)
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ")) for m in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single="$A", pair="$A $B:1")
    typed = list(zip(tokens, types))
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, ty in typed if ty == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, ty in typed if ty == _USER_DEFINED]
    )
    return json.loads(tok.to_str())


def build_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json/tokenizer_config.json: llama.cpp's Qwen2 vocabulary with the
    Qwen-VL special tokens placed in the [PAD1516xx] slots at their real ids."""
    gguf, _, _ = qwen2_vocab()
    data = qwen2_tokenizer_json(gguf)
    by_id = {a["id"]: a for a in data["added_tokens"]}
    vocab = data["model"]["vocab"]
    for content, tid in SPECIAL_TOKENS.items():
        entry = by_id.get(tid)
        if entry is None:
            raise VermError(f"vocabulary has no slot for id {tid}")
        old = entry["content"]
        entry.update(content=content, special=True, normalized=False)
        if old in vocab and old != content:
            vocab[content] = vocab.pop(old)
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "backend": "tokenizers",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "model_max_length": 262144,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def check_tokenizer(model_dir: Path) -> int:
    """Tokenize llama.cpp's reference texts; return how many matched (raises on mismatch)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vectors = tokenizer_vectors()
    for text, expected in vectors:
        got = tok.encode(text, add_special_tokens=False)
        if got != expected:
            raise VermError(f"tokenizer mismatch on {text[:30]!r}: {got[:8]} != {expected[:8]}")
    for content, tid in SPECIAL_TOKENS.items():
        if tok.convert_tokens_to_ids(content) != tid:
            raise VermError(f"special token {content} is not at id {tid}")
    return len(vectors)


def make_model(seed: int = 0, shape: str = "tiny"):
    """A random-weight Qwen3VLForConditionalGeneration in bf16 (`shape`: tiny, 8b-vision,
    8b, 8b-text4), weights fixed by `seed`."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if shape not in SHAPES:
        raise VermError(f"unknown shape {shape!r}; choose {', '.join(SHAPES)}")
    text, vision = SHAPES[shape]
    config = Qwen3VLConfig(
        text_config=dict(text, bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(vision),
        image_token_id=SPECIAL_TOKENS["<|image_pad|>"],
        video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = [MODEL_ARCHITECTURE]
    torch.manual_seed(seed)
    if shape == "tiny":
        return Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    torch.set_default_dtype(torch.bfloat16)  # the 8B shape in fp32 first would need 32 GB
    try:
        return Qwen3VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def build_tiny_model(out_dir: str | Path, seed: int = 0, shape: str = "tiny") -> Path:
    """Write a random-weight Qwen3-VL HF checkpoint to `out_dir` (deterministic for `seed`);
    `shape` tiny (the test model) or the real 8B shapes for speed work."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        log.info("[1/4] tokenizer from llama.cpp's qwen2 vocabulary")
        build_tokenizer(tmp)
        n = check_tokenizer(tmp)
        log.info("      %d reference tokenizations reproduced", n)

        log.info("[2/4] random weights (seed %s)", seed)
        model = make_model(seed, shape)

        log.info("[3/4] config and safetensors")
        # 2 GB shards: safetensors serializes a shard in memory, so one 17 GB file of the
        # 8B shape would need the weights twice over.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        gen = {
            "bos_token_id": 151643,
            "eos_token_id": [151645, 151643],
            "pad_token_id": 151643,
            "do_sample": False,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))

        log.info("[4/4] image processor and chat template")
        (tmp / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2))
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        (tmp / "tiny-model.json").write_text(
            json.dumps({"seed": seed, "shape": shape, "random_weights": True})
        )
    return out_dir
