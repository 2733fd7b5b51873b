"""Decoding settings of one request. Pure data; the samplers that apply them live with the
backends (`backends/sampling.py`, the transformers backend)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

# Cap on answer tokens when a caller gives none and no task profile applies (the
# OpenAI-compatible chat path).
DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; the defaults are greedy so a judgement reproduces.

    Semantics are vLLM's (the authors served Visual-ERM with vLLM): `repeat_penalty`
    (vLLM's repetition_penalty) looks at the prompt and the generated tokens,
    `presence_penalty` at the generated tokens only; temperature applies before top-k
    and top-p. `temperature == 0` is greedy."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: run to max_tokens (vLLM's and llama-server's name)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def with_(self, **changes: Any) -> "Sampling":
        """A copy with some fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
