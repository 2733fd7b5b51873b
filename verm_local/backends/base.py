"""What every backend offers: load once, generate an answer for [images..., prompt]
(optionally constrained to a JSON schema), and report timings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..constants import DEFAULT_MAX_TOKENS, RL_SAMPLING
from ..images import PreparedImage
from ..schema import ModelInfo


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; the defaults are greedy so a judgement reproduces."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int = 0

    @classmethod
    def rl(cls, max_tokens: int, seed: int = 0) -> Sampling:
        """The authors' RL sampling (`constants.RL_SAMPLING`), seeded."""
        keys = ("temperature", "top_p", "top_k", "presence_penalty")
        return cls(max_tokens=max_tokens, seed=seed, **{k: RL_SAMPLING[k] for k in keys})


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int  # text + image tokens actually evaluated
    image_tokens: int
    completion_tokens: int
    vision_s: float
    prefill_s: float  # vision encoding + all prompt decoding
    decode_s: float


class Backend(Protocol):
    info: ModelInfo
    load_s: float

    def generate(
        self,
        images: list[PreparedImage],
        prompt: str,
        sampling: Sampling,
        schema: dict[str, Any] | None = None,
    ) -> Generation: ...

    def close(self) -> None: ...
