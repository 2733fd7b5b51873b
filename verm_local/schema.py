"""The one `Judgement` type, the JSON schema the model is constrained to, and the tolerant
parser that reads a free answer. Pure: no I/O."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, Field

from .constants import CATEGORIES, SEVERITY_MAX, SEVERITY_MIN, TASKS
from .errors import AnswerError
from .reward import reward

# Bounds that keep a constrained answer finite; generous for a real judge's output.
MAX_ERRORS = 24
MAX_COUNT = MAX_ERRORS
MAX_LOCATION_CHARS = 64
MAX_DESCRIPTION_CHARS = 240


class JudgedError(BaseModel):
    category: str
    severity: int = Field(ge=SEVERITY_MIN, le=SEVERITY_MAX)
    location: str = ""
    description: str = ""


class ModelInfo(BaseModel):
    path: str = ""
    quant: str = ""
    sha256: str = ""
    vision: str = ""  # which vision encoder ran: "mmproj-f16", "onnx-int8", "transformers"


class Timings(BaseModel):
    load_s: float = 0.0
    vision_s: float = 0.0  # image encoding, part of prefill_s
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Judgement(BaseModel):
    task: str
    errors: list[JudgedError] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    total_severity: int = 0
    score: float = 1.0
    model: ModelInfo = Field(default_factory=ModelInfo)
    timings: Timings = Field(default_factory=Timings)

    @classmethod
    def from_answer(
        cls,
        task: str,
        answer: dict[str, Any],
        *,
        reward_scale: float | None = None,
        model: ModelInfo | None = None,
        timings: Timings | None = None,
    ) -> "Judgement":
        """Build a judgement from the model's JSON object (already parsed)."""
        errors = normalise_errors(task, answer)
        counts = {c: 0 for c in CATEGORIES[task]}
        for e in errors:
            counts[e.category] += 1
        total = sum(e.severity for e in errors)
        return cls(
            task=task,
            errors=errors,
            counts=counts,
            total_severity=total,
            score=reward(total, reward_scale),
            model=model or ModelInfo(),
            timings=timings or Timings(),
        )


def answer_schema(task: str, max_errors: int = MAX_ERRORS) -> dict[str, Any]:
    """JSON schema of the model's answer for a task: per-category counts and the errors
    (at most `max_errors` of them; strings bounded, so the answer is always finite)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 0 <= max_errors <= MAX_ERRORS:
        raise ValueError(f"max_errors must be within 0..{MAX_ERRORS}, got {max_errors}")
    cats = list(CATEGORIES[task])
    props: dict[str, Any] = {
        f"{c}_count": {"type": "integer", "enum": list(range(MAX_COUNT + 1))} for c in cats
    }
    props["errors"] = {
        "type": "array",
        "maxItems": max_errors,
        "items": {
            "type": "object",
            "properties": {
                "category": {"type": "string", "enum": cats},
                "severity": {"type": "integer", "enum": [1, 2, 3]},
                "location": {"type": "string", "maxLength": MAX_LOCATION_CHARS},
                "description": {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS},
            },
            "required": ["category", "severity", "location", "description"],
            "additionalProperties": False,
        },
    }
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


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
    start = cleaned.find("{")
    while start != -1:
        end = _balanced_end(cleaned, start)
        if end is None:
            break
        try:
            obj = json.loads(cleaned[start : end + 1], strict=False)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = cleaned.find("{", start + 1)
    raise AnswerError(f"no JSON object in the model's answer: {_snippet(text)!r}")


def _balanced_end(s: str, start: int) -> int | None:
    """Index of the brace closing the object opened at `start`, honouring strings."""
    depth = 0
    in_str = False
    escaped = False
    for i in range(start, len(s)):
        ch = s[i]
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def normalise_errors(task: str, answer: dict[str, Any]) -> list[JudgedError]:
    """Read the `errors` list, accepting the older `type` key for `category`. Entries with
    an unknown category or a severity outside 1..3 are refused (AnswerError), not guessed."""
    raw = answer.get("errors", [])
    if not isinstance(raw, list):
        raise AnswerError("'errors' in the model's answer is not a list")
    allowed = CATEGORIES[task]
    out: list[JudgedError] = []
    for item in raw:
        if not isinstance(item, dict):
            raise AnswerError(f"an error entry is not an object: {item!r}")
        cat = item.get("category", item.get("type"))
        if cat not in allowed:
            raise AnswerError(f"category {cat!r} is not one of the {task} categories")
        try:
            sev = int(item.get("severity"))
        except (TypeError, ValueError):
            raise AnswerError(f"severity {item.get('severity')!r} is not an integer") from None
        if not SEVERITY_MIN <= sev <= SEVERITY_MAX:
            raise AnswerError(f"severity {sev} is outside {SEVERITY_MIN}..{SEVERITY_MAX}")
        out.append(
            JudgedError(
                category=cat,
                severity=sev,
                location=str(item.get("location", "")),
                description=str(item.get("description", "")),
            )
        )
    return out
