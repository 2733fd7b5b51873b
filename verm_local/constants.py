"""Every name and number the package agrees on: tasks, categories, severities, reward,
quant types and the pinned llama.cpp release. Import from here; never repeat a literal."""

from __future__ import annotations

from importlib import metadata

TASKS: tuple[str, ...] = ("chart", "table", "svg")

# Closed category sets per task (Visual-ERM's training labels).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "chart": ("structure_error", "data_error", "text_error", "style_error"),
    "table": ("layout_error", "text_error", "numeric_error"),
    "svg": ("structure_error", "shape_error", "style_error", "text_symbol_error"),
}

SEVERITY_MIN = 1
SEVERITY_MAX = 3
SEVERITY_NAMES: dict[int, str] = {1: "minor", 2: "medium", 3: "severe"}

# rm_reward = clip(1 - S / REWARD_SCALE, 0, 1), as in the authors' RL recipe.
REWARD_SCALE = 50.0
MIN_REWARD = 0.0

# One visual token per 32x32 pixels (patch 16, spatial merge 2).
PIXELS_PER_TOKEN_SIDE = 32
DEFAULT_IMAGE_TOKEN_BUDGET = 1024
# Refuse images whose pixel count suggests a decompression bomb before decoding them.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

# Qwen3-VL special token ids (real vocabulary).
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
VOCAB_SIZE = 151936

# GGUF quant types, best first; a converted directory's default is the first present.
GGUF_QUANTS: tuple[str, ...] = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
MMPROJ_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "f32")
MANIFEST_NAME = "manifest.json"

# The converter and the runtime come from one llama.cpp commit: this release's sdist.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

MODEL_ARCHITECTURE = "Qwen3VLForConditionalGeneration"
MODEL_TYPE = "qwen3_vl"


def package_version() -> str:
    """verm-local's version, as its installed metadata says (pyproject.toml's)."""
    try:
        return metadata.version("verm-local")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"
