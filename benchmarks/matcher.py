"""The matcher of VC-RewardBench's scoring: which predicted error is which labelled one.

`LLMMatcher` asks an LLM behind any OpenAI-compatible endpoint (the authors used
gpt-5-mini; llama-server, Ollama or vLLM serve one locally) with the authors' own prompt,
as `verm-local pull` (or `pull --prompts-only`) stores it from their evaluation at the
pinned commit: one call per item, as their evaluation makes it (a system message "You are
a helpful assistant.", the prompt as the user's text, 8192 tokens). Calls are retried with
backoff by the openai client; replies are cached on disk by (the prompt's sha256, the
model), so scoring again, or a second model's identical items, costs no call. Without the
authors' prompt an own-words prompt stands in: a warning, and the figures say
`comparable: false`.

`LexicalMatcher` needs no LLM: a one-to-one assignment maximising a lexical similarity of
location and description (`metrics.credit`), written as the same reply. Its figures are
never comparable with the paper's."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verm_local.constants import CATEGORIES
from verm_local.errors import VermError
from verm_local.prompts import MATCHER_SOURCE, Template, stored_matcher

from .score import ItemFailed, error_type, matcher_lists, read_reply

log = logging.getLogger(__name__)

SYSTEM = "You are a helpful assistant."
MAX_TOKENS = 8192

# Own words, the same slots and the same reply format as the authors' matcher.
BUILT_IN = Template(
    (
        (
            "text",
            "You align two lists of visual errors found in the same pair of images: PRED "
            "(an automatic judge's) and GT (a human's). Decide which entries describe the "
            "same concrete error and answer with JSON only.\n\nData category: ",
        ),
        ("slot", "category"),
        ("text", "\nError types of this category: "),
        ("slot", "allowed_types"),
        (
            "text",
            "\n\nRules:\n- Two entries match when they point at the same element (place, "
            'object, cell, series) and describe the same fault.\n- Use match_level "yes" '
            'for a clear match and "partial" when PRED is vaguer than GT but clearly '
            "about the same fault.\n- Each PRED entry matches at most one GT entry and "
            "each GT entry at most one PRED entry.\n- When unsure, do not match.\n\n"
            "Answer in this form:\n"
            '{"matches": [{"pred_id": 0, "gt_id": 2, "match_level": "yes"}], '
            '"unmatched_pred": [1], "unmatched_gt": [0, 1]}\n\nPRED errors:\n',
        ),
        ("slot", "pred_list"),
        ("text", "\n\nGT errors:\n"),
        ("slot", "gt_list"),
        ("text", "\n"),
    ),
    strip=True,
)


@dataclass(frozen=True)
class MatcherPrompt:
    template: Template
    source: str  # where it came from
    comparable: bool  # the authors' own prompt

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.template.sha256,
            "comparable": self.comparable,
        }


def matcher_prompt(home: Path | None = None, warn: bool = True) -> MatcherPrompt:
    """The authors' matcher prompt from the store, else the built-in one (a warning)."""
    stored = stored_matcher(home)
    if stored is not None:
        template, record = stored
        src = record.get("source", {})
        where = f"{src.get('path', MATCHER_SOURCE.path)}@{str(src.get('commit', ''))[:7]}"
        return MatcherPrompt(template, f"authors ({where})", True)
    if warn:
        log.warning(
            "the authors' matcher prompt is not in the store (`verm-local pull "
            "--prompts-only` fetches it): an own-words prompt is used and the figures are "
            "not comparable with the paper's"
        )
    return MatcherPrompt(BUILT_IN, "built-in", False)


def render_prompt(template: Template, category: str, preds: list, labels: list) -> str:
    """The prompt of one item: its category, the category's error types as the authors
    print their list, and the two lists as indented JSON (non-ASCII kept)."""
    pred_list, gt_list = matcher_lists(preds, labels)
    return template.render(
        {
            "category": str(category),
            "allowed_types": str(list(CATEGORIES[category])),
            "pred_list": json.dumps(pred_list, ensure_ascii=False, indent=2),
            "gt_list": json.dumps(gt_list, ensure_ascii=False, indent=2),
        }
    )


class MatcherError(VermError):
    """The matcher gave no usable reply for an item (after its retries)."""


class LLMMatcher:
    kind = "llm"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        prompt: MatcherPrompt | None = None,
        cache_dir: Path | None = None,
        timeout: float = 300.0,
        retries: int = 3,
    ):
        from verm_local import net
        from verm_local.settings import settings

        self.url, self.model = url.rstrip("/"), model
        self.prompt = prompt or matcher_prompt()
        self.comparable = self.prompt.comparable
        self.cache_dir = cache_dir
        key = api_key or settings().openai_api_key
        self.client = net.openai_client(
            self.url, key, timeout=timeout, policy=net.RetryPolicy(retries=retries)
        )
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "url": self.url,
            "model": self.model,
            "prompt": self.prompt.to_dict(),
        }

    def _cache_file(self, text: str) -> Path | None:
        if self.cache_dir is None:
            return None
        prompt_sha = hashlib.sha256(text.encode()).hexdigest()
        key = hashlib.sha256(f"{self.model}\0{prompt_sha}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def reply(self, category: str, preds: list, labels: list) -> str:
        """The reply text for one item; MatcherError when the endpoint gives none."""
        text = render_prompt(self.prompt.template, category, preds, labels)
        cached = self._cache_file(text)
        if cached is not None and cached.is_file():
            try:
                return json.loads(cached.read_text(encoding="utf-8"))["reply"]
            except (OSError, ValueError, KeyError):
                pass
        try:
            out = self.client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": [{"type": "text", "text": text}]},
                ],
                max_tokens=MAX_TOKENS,
            )
            content = out.choices[0].message.content or ""
        except Exception as exc:  # noqa: BLE001 - any endpoint failure fails this item
            raise MatcherError(f"matcher {self.url}: {exc.__class__.__name__}: {exc}") from None
        self.calls += 1
        if cached is not None:
            try:
                read_reply(content)
            except ItemFailed:
                return content  # not cached: asked again next time
            from verm_local.fileio import write_json_atomic

            cached.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cached, {"model": self.model, "reply": content})
        return content


class LexicalMatcher:
    """Matching without an LLM: the one-to-one assignment of the most lexical credit (same
    type and similar location and description: yes; weaker evidence: partial)."""

    kind = "lexical"
    comparable = False
    calls = 0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "prompt": None}

    def reply(self, category: str, preds: list, labels: list) -> str:
        from . import metrics

        def shown(e: dict) -> dict:
            return {
                "category": error_type(e),
                "location": str(e.get("location") or ""),
                "description": str(e.get("description") or ""),
            }

        matches = []
        if preds and labels:
            from scipy.optimize import linear_sum_assignment

            m = metrics.credit_matrix([shown(e) for e in preds], [shown(e) for e in labels])
            for p, g in zip(*linear_sum_assignment(m, maximize=True)):
                if m[p, g] > 0:
                    level = "yes" if m[p, g] >= 1.0 else "partial"
                    matches.append({"pred_id": int(p), "gt_id": int(g), "match_level": level})
        return json.dumps({"matches": matches})


def make_matcher(
    kind: str,
    url: str | None = None,
    model: str | None = None,
    *,
    cache_dir: Path | None = None,
    api_key: str | None = None,
) -> LLMMatcher | LexicalMatcher:
    """`--matcher llm` (the default: needs --matcher-url and --matcher-model) or
    `lexical`."""
    from verm_local.errors import InputError

    if kind == "lexical":
        return LexicalMatcher()
    if kind != "llm":
        raise InputError(f"unknown matcher {kind!r}; choose llm or lexical")
    if not url or not model:
        raise InputError(
            "the LLM matcher needs --matcher-url URL and --matcher-model NAME (any "
            "OpenAI-compatible endpoint); --matcher lexical needs neither (not comparable)"
        )
    return LLMMatcher(url, model, cache_dir=cache_dir, api_key=api_key)
