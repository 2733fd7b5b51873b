"""Error matching by an LLM behind any OpenAI-compatible endpoint (vLLM, verm-local serve,
llama.cpp's server, a hosted API), for those who want the benchmark's LLM-based matching
instead of the lexical one. The LLM says which predicted error is which labelled error;
the one-to-one assignment is still made optimally from its answers."""

from __future__ import annotations

import json
import urllib.request

import numpy as np

from verm_local.errors import VermError
from verm_local.schema import extract_json
from verm_local.settings import settings

PROMPT = """Two lists of visual discrepancies describe the same pair of images.
List A (predicted):
{pred}
List B (reference):
{gold}
For every pair that points at the same discrepancy in the same place of the image, give
its match: "full" if they describe the same error, "partial" if they overlap only in part.
Answer with JSON only:
{{"matches": [{{"a": <index in A>, "b": <index in B>, "match": "full"|"partial"}}]}}"""


class EndpointMatcher:
    def __init__(self, url: str, model: str = "default", timeout: float = 120.0):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, timeout

    def __call__(self, pred: list[dict], gold: list[dict]) -> np.ndarray:
        def listing(errors: list[dict]) -> str:
            return "\n".join(
                f"{i}. [{e['category']}] {e.get('location', '')}: {e.get('description', '')}"
                for i, e in enumerate(errors)
            )

        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": PROMPT.format(pred=listing(pred), gold=listing(gold))}
            ],
        }
        headers = {"Content-Type": "application/json"}
        key = settings().openai_api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = json.loads(resp.read())["choices"][0]["message"]["content"]
            answer = extract_json(text)
        except Exception as exc:  # noqa: BLE001 - one line for any endpoint failure
            raise VermError(f"matcher {self.url}: {exc.__class__.__name__}: {exc}") from None
        m = np.zeros((len(pred), len(gold)))
        for entry in answer.get("matches", []) if isinstance(answer, dict) else []:
            try:
                a, b = int(entry["a"]), int(entry["b"])
            except (KeyError, TypeError, ValueError):
                continue
            if 0 <= a < len(pred) and 0 <= b < len(gold):
                m[a, b] = max(m[a, b], 1.0 if entry.get("match") == "full" else 0.5)
        return m
