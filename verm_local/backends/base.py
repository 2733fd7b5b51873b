"""What every backend offers, and the request and result types they share.

A `Request` is the exact chat a model sees (messages whose image parts stand for
`images`, in order), how to decode it, and the grammar the answer must follow. Every
backend runs lists of requests (`generate_all`, as batches where it can), scores forced
answers (`answer_logprobs`) and reports what it loaded (`info`, `load_s`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..decoding import Sampling
from ..errors import VermError
from ..images import PreparedImage
from ..schema import ModelInfo
from ..select import Determinism

__all__ = ["Backend", "Generation", "Request", "Sampling", "user_turn"]


@dataclass
class Request:
    """One generation: images in order; chat messages whose `{"type": "image"}` parts stand
    for them, in order; decoding; the answer's grammar (GBNF text, root rule `root`)."""

    images: list[PreparedImage]
    messages: list[dict[str, Any]]
    sampling: Sampling = field(default_factory=Sampling)
    grammar: str | None = None
    reuse_prefix: bool = True  # False: evaluate the whole prompt, leave the cache alone
    # Teacher forcing: the answer is these tokens (then the end), whatever the logits, and
    # goes through the decode loop as a generated one would (benchmarks replay known
    # answers: `benchmarks/speculate.py`). It must be one the grammar allows.
    forced: list[int] | None = None
    # Keep the logits each answer token is chosen from (`Generation.trace`): tests and
    # `bench determinism` compare them bitwise across paths.
    trace: bool = False


def user_turn(
    images: list[PreparedImage], prompt: str | list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Messages for `prompt`: a list of messages as given, or text after the images in one
    user turn."""
    if isinstance(prompt, list):
        return prompt
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


@dataclass
class ImageEmbedding:
    """An encoded image, ready for the text model: embeddings [n, n_embd_inp], decoder
    positions ([n], or [4, n] for M-RoPE), the positions it advances, encoder seconds."""

    embd: np.ndarray
    pos: np.ndarray
    seconds: float
    n_pos: int
    causal: bool = True


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # text + image tokens actually evaluated
    image_tokens: int
    completion_tokens: int
    vision_s: float
    prefill_s: float  # vision encoding + all prompt decoding
    decode_s: float
    # Decode calls the answer took (with drafts of grammar-dictated text, fewer than its
    # tokens: `batch.BatchEngine`), tokens drafted, drafted tokens kept. 0: not counted.
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    # The logits behind this answer are the same bits on every path it could have taken
    # (alone, batched, drafted, prefix-cached, other prompt chunks): `select.Determinism`.
    deterministic: bool = False
    # With `Request.trace`: the logits each answer token was chosen from, in order (one
    # row per sampler call: the answer's tokens and the end), float32 [n, vocab].
    trace: np.ndarray | None = None


class Backend(Protocol):
    """A loaded judge model. `parallel` requests run at once in `generate_all`."""

    info: ModelInfo
    load_s: float
    parallel: int
    # Whether a greedy answer's logits are the same on every path, and why (`select`).
    deterministic: Determinism

    def generate_all(self, requests: list[Request]) -> list[Generation | VermError]:
        """A generation (or the error) per request, in order."""
        ...

    def generate(
        self,
        images: list[PreparedImage],
        prompt: str | list[dict[str, Any]],
        sampling: Sampling,
        grammar: str | dict[str, Any] | None = None,
    ) -> Generation:
        """One generation; `prompt` is text after the images, or messages; `grammar` is
        GBNF text or a JSON schema. Raises VermError."""
        ...

    def answer_logprobs(
        self, images: list[PreparedImage], prompt: str | list[dict[str, Any]], answer: list[int]
    ) -> np.ndarray:
        """Log-probabilities [len(answer), vocab] at each position of a forced answer."""
        ...

    def answer_tokens(self, text: str) -> list[int]:
        """An answer's token ids as the model would emit them, ending with <|im_end|>."""
        ...

    def prompt_text_tokens(
        self, images: list[PreparedImage], prompt: str | list[dict[str, Any]]
    ) -> list[int]:
        """The prompt's text token ids, image tokens left out (to compare tokenizers)."""
        ...

    def weight_files(self) -> list[Path]:
        """The files of weights this backend loaded (text model, vision encoder)."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters and sizes of the engine (prefix cache hits and misses, context tokens
        per stream and grows); {} where there are none."""
        ...

    def close(self) -> None: ...
