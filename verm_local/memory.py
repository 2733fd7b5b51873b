"""What a judgement holds in memory, part by part, and handing freed memory back.

`estimate_llamacpp` is the model `doctor` and the plan use for a GGUF variant on llama.cpp;
its constants are measured with `verm-local bench latency --memory` on the 8B shape
(random weights, Q4_K_M, one default judgement of a 1024x768 chart pair, a 2-core AMD
EPYC; benchmarks/README.md, "Memory"). A one-shot judgement has two phases that never
overlap: the vision phase (the projector and the image encoder's activations) and the text
phase (weights, KV cache, compute buffers); the peak is the larger."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from dataclasses import asdict, dataclass

MB = 1_000_000

# Answer tokens a context sized for its requests holds at first (backends/batch.py grows
# it when an answer needs more): above a usual judgement (a chart answer of 11 errors is
# about 700 tokens), far below the trained caps.
ANSWER_RESERVE = 1024

# Python, numpy, the native libraries, the tokenizer and the images' embeddings: RSS at
# the start of the text phase minus the weights (measured 222-278 MB).
RUNTIME_BYTES = 280 * MB
# Compute buffers of the text phase that llama.cpp touches, beyond attention scores: the
# layer activations of one ubatch (measured ~75 MB at n_ubatch 512 for n_embd 4096).
ACTIVATION_BYTES_PER_UBATCH_ROW = 150_000
# The vision phase: the encoder's activations per image token (measured 366 MB for a
# 768-token image on the 8B tower with the mmproj).
VISION_BYTES_PER_TOKEN = 480_000
KV_ELEMENT_BYTES = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class Shape:
    """The text model's shape (Qwen3-VL-8B by default)."""

    layers: int = 36
    kv_heads: int = 8
    heads: int = 32
    head_dim: int = 128


@dataclass(frozen=True)
class MemoryEstimate:
    text_weights: int
    vision_weights: int
    kv_cache: int
    compute: int
    runtime: int
    vision_activations: int

    @property
    def text_phase(self) -> int:
        return self.runtime + self.text_weights + self.kv_cache + self.compute

    @property
    def vision_phase(self) -> int:
        return self.runtime + self.vision_weights + self.vision_activations

    @property
    def peak(self) -> int:
        return max(self.text_phase, self.vision_phase)

    def to_dict(self) -> dict[str, int]:
        return {
            **asdict(self),
            "text_phase": self.text_phase,
            "vision_phase": self.vision_phase,
            "peak": self.peak,
        }


def kv_bytes(n_ctx: int, kv_type: str = "f16", shape: Shape = Shape()) -> int:
    per = KV_ELEMENT_BYTES[kv_type]
    return int(n_ctx * shape.layers * shape.kv_heads * shape.head_dim * 2 * per)


def compute_bytes(n_ctx: int, n_ubatch: int, flash_attn: bool, shape: Shape = Shape()) -> int:
    """Compute buffers touched in the text phase: without flash attention the attention
    scores of one ubatch against the whole context (f32, every head) dominate."""
    scores = 0 if flash_attn else n_ubatch * n_ctx * shape.heads * 4
    return scores + n_ubatch * ACTIVATION_BYTES_PER_UBATCH_ROW


def estimate_llamacpp(
    text_bytes: int,
    vision_bytes: int,
    n_ctx: int,
    *,
    image_tokens: int = 1024,
    kv_type: str = "f16",
    flash_attn: bool = False,
    n_ubatch: int = 512,
    one_shot: bool = True,
    shape: Shape = Shape(),
) -> MemoryEstimate:
    """One judgement at context `n_ctx` with images of up to `image_tokens` each. Not
    one-shot (a loaded server), the vision weights stay beside the text phase."""
    est = MemoryEstimate(
        text_weights=text_bytes,
        vision_weights=vision_bytes,
        kv_cache=kv_bytes(n_ctx, kv_type, shape),
        compute=compute_bytes(n_ctx, n_ubatch, flash_attn, shape),
        runtime=RUNTIME_BYTES,
        vision_activations=image_tokens * VISION_BYTES_PER_TOKEN,
    )
    if one_shot:
        return est
    return MemoryEstimate(
        text_weights=est.text_weights + est.vision_weights,
        vision_weights=0,
        kv_cache=est.kv_cache,
        compute=est.compute,
        runtime=est.runtime,
        vision_activations=0,
    )


# transformers: eager activations in 16 bits beside the weights and the KV cache
# (measured about 2 GB for a 1024-token image pair on the 8B shape).
TRANSFORMERS_ACTIVATION_BYTES = 2_000 * MB


def estimate_transformers(weight_bytes: int, n_ctx: int, shape: Shape = Shape()) -> int:
    """Peak memory of a judgement on transformers: the weights as loaded, the KV cache in
    16 bits, the eager activations."""
    return weight_bytes + kv_bytes(n_ctx, "f16", shape) + TRANSFORMERS_ACTIVATION_BYTES


def release_heap(collect: bool = True) -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's
    malloc_trim; elsewhere nothing to do): what a released ONNX Runtime session or
    projector freed stops counting toward the process's memory. `collect=False` skips
    the garbage collection, for buffers that reference counting has freed already: a
    full collection costs about 0.3 s in a process that has imported torch."""
    if collect:
        gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
