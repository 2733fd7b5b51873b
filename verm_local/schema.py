"""The one `Judgement` type (from parser to CLI, server and benchmarks) and the tolerant
parser that reads an answer. Pure: no I/O. The answer schema and grammar are in
`answer.py`; the per-task layout and reward recipe in `tasks.py` and `reward.py`."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, Field

from .constants import SEVERITY_MAX, SEVERITY_MIN
from .errors import AnswerError
from .reward import RewardRecipe, with_settings
from .tasks import TaskProfile


class JudgedError(BaseModel):
    category: str  # the trained answer's `category` (chart, svg) or `type` (table)
    severity: int = Field(ge=SEVERITY_MIN, le=SEVERITY_MAX)
    location: str | None = Field(None, exclude_if=lambda v: v is None)  # not for tables
    description: str = ""


class ModelInfo(BaseModel):
    path: str = ""
    quant: str = ""
    sha256: str = ""
    vision: str = ""  # which vision encoder ran: "mmproj-f16", "onnx-int8", "transformers"
    repack: bool | None = None  # llama.cpp: weights in extra buffer types (None: not llama.cpp)


class Timings(BaseModel):
    load_s: float = 0.0
    vision_s: float = 0.0  # image encoding, part of prefill_s
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0  # to the first answer token: prefill and one decode step
    prompt_tokens: int = 0  # image tokens included
    image_tokens: int = 0
    completion_tokens: int = 0
    # Decode calls of the answer (fewer than completion_tokens when drafted text was kept),
    # tokens drafted from the grammar, drafted tokens kept (speculative decoding).
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0


class Judgement(BaseModel):
    task: str
    errors: list[JudgedError] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    total_severity: float = 0
    # The authors' reward for the task (chart, svg: 1 + clip(1 - S/50, 0, 1) for a rendered
    # prediction; table: -S), and the judge's clipped term clip(1 - S/50, 0, 1) alone.
    reward: float = 2.0
    rm_reward: float = 1.0
    # False when the answer ran into the token cap or could not be read: errors are then
    # empty and S is the recipe's failure value, never a partial answer scored as whole.
    complete: bool = True
    problem: str = ""
    prompt_source: str = ""  # trained | file:PATH | built-in
    # True where the logits behind this answer do not depend on the path it took (alone,
    # batched with other requests, drafted, prefix-cached): `verm-local doctor` says why.
    deterministic: bool = False
    model: ModelInfo = Field(default_factory=ModelInfo)
    timings: Timings = Field(default_factory=Timings)

    @property
    def score(self) -> float:
        """The clipped term (`rm_reward`), under its name before the reward recipes."""
        return self.rm_reward

    @classmethod
    def from_answer(
        cls,
        p: TaskProfile,
        answer: dict[str, Any],
        *,
        reward_scale: float | None = None,
        recipe: RewardRecipe | None = None,
        **fields: Any,
    ) -> "Judgement":
        """Build a judgement from the model's JSON object (already parsed)."""
        recipe = recipe or with_settings(p.reward, reward_scale)
        errors = normalise_errors(p, answer)
        counts = {c: 0 for c in p.categories}
        for e in errors:
            counts[e.category] += 1
        total = sum(e.severity for e in errors)
        return cls(
            task=p.name,
            errors=errors,
            counts=counts,
            total_severity=total,
            reward=recipe.reward(total),
            rm_reward=recipe.rm_reward(total),
            **fields,
        )

    @classmethod
    def failed(
        cls,
        p: TaskProfile,
        problem: str,
        *,
        reward_scale: float | None = None,
        recipe: RewardRecipe | None = None,
        **fields: Any,
    ) -> "Judgement":
        """The judgement of an answer cut at the cap or unreadable: no errors, S and the
        reward at the recipe's failure values (chart, svg: S = 25; table: reward -4)."""
        recipe = recipe or with_settings(p.reward, reward_scale)
        severity = (
            -recipe.fail if recipe.kind == "negative_severity" else recipe.parse_fail_severity
        )
        return cls(
            task=p.name,
            counts={c: 0 for c in p.categories},
            total_severity=severity,
            reward=recipe.unreadable(),
            rm_reward=recipe.rm_reward(severity),
            complete=False,
            problem=problem,
            **fields,
        )


def judgement_schema() -> dict[str, Any]:
    """JSON schema of `judge --json` output (the Judgement)."""
    return Judgement.model_json_schema()


_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*")


def extract_json(text: str) -> dict[str, Any]:
    """Tolerant read of a free answer: strip <think> blocks and code fences, then take the
    first balanced JSON object, raw control characters in its strings allowed (another
    engine's unconstrained answer may break a description over lines). Raises AnswerError
    when none parses."""
    cleaned = _FENCE.sub("", _THINK.sub("", text))
    decoder = json.JSONDecoder(strict=False)
    start = cleaned.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(cleaned, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = cleaned.find("{", start + 1)
    raise AnswerError(f"no JSON object in the model's answer: {_snippet(text)!r}")


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def normalise_errors(p: TaskProfile, answer: dict[str, Any]) -> list[JudgedError]:
    """Read the `errors` list; an item's category is under the task's trained key
    (`category`, or `type` for tables), the other one accepted too. Entries with an unknown
    category or a severity outside 1..3 are refused (AnswerError), not guessed."""
    raw = answer.get("errors", [])
    if not isinstance(raw, list):
        raise AnswerError("'errors' in the model's answer is not a list")
    other = "type" if p.category_key == "category" else "category"
    out: list[JudgedError] = []
    for item in raw:
        if not isinstance(item, dict):
            raise AnswerError(f"an error entry is not an object: {item!r}")
        cat = item.get(p.category_key, item.get(other))
        if cat not in p.categories:
            raise AnswerError(f"category {cat!r} is not one of the {p.name} categories")
        try:
            sev = int(item.get("severity"))
        except (TypeError, ValueError):
            raise AnswerError(f"severity {item.get('severity')!r} is not an integer") from None
        if not SEVERITY_MIN <= sev <= SEVERITY_MAX:
            raise AnswerError(f"severity {sev} is outside {SEVERITY_MIN}..{SEVERITY_MAX}")
        location = None
        if p.has_location:
            location = "" if item.get("location") is None else str(item["location"])
        out.append(
            JudgedError(
                category=cat,
                severity=sev,
                location=location,
                description=str(item.get("description", "")),
            )
        )
    return out


class Critique(BaseModel):
    """What the visual critic says of one prediction (`/v1/critique`, the MCP `critique`
    tool): the judgement of its render against the ground truth (None when the code did
    not render), the task's reward, why it did not render, and the revision message
    `refine` would send the policy."""

    judgement: Judgement | None = None
    reward: float
    render_error: str | None = None
    revision_message: str
