"""Agreement measures beside the authors' scoring (`score.py`): the lexical credit the
lexical matcher assigns by (no LLM), correlations, count agreement, and KL from a cached
top-k of the reference."""

from __future__ import annotations

import math
import re
from difflib import SequenceMatcher
from typing import Any, Sequence

import numpy as np

FULL_MATCH = 0.5  # similarity at which two errors of one category are the same error
PARTIAL_MATCH = 0.25  # ... or a partial match (0.5 credit)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9%.]+", text.lower()))


def similarity(a: dict[str, Any], b: dict[str, Any]) -> float:
    """0..1: how surely two errors point at the same place (location and description)."""
    sa = f"{a.get('location', '')} {a.get('description', '')}"
    sb = f"{b.get('location', '')} {b.get('description', '')}"
    wa, wb = _words(sa), _words(sb)
    jaccard = len(wa & wb) / len(wa | wb) if wa | wb else 1.0
    return max(jaccard, SequenceMatcher(None, sa.lower(), sb.lower()).ratio())


def credit(a: dict[str, Any], b: dict[str, Any]) -> float:
    """1 same error, 0.5 partial (same place, other category; or weaker evidence), 0 none."""
    same_cat = a.get("category") == b.get("category")
    sim = similarity(a, b)
    if same_cat and sim >= FULL_MATCH:
        return 1.0
    if (same_cat and sim >= PARTIAL_MATCH) or (not same_cat and sim >= FULL_MATCH):
        return 0.5
    return 0.0


def credit_matrix(pred: list[dict], gold: list[dict]) -> np.ndarray:
    return np.array([[credit(p, g) for g in gold] for p in pred], dtype=float).reshape(
        len(pred), len(gold)
    )


def _defined(a: np.ndarray, b: np.ndarray) -> bool:
    """A correlation is defined on two or more items, neither side constant."""
    return a.size >= 2 and np.ptp(a) > 0 and np.ptp(b) > 0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r (scipy); nan when either side is constant (r is undefined there)."""
    from scipy.stats import pearsonr

    a, b = np.asarray(x, float), np.asarray(y, float)
    return float(pearsonr(a, b).statistic) if _defined(a, b) else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy; ties share their mean rank)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(x, float), np.asarray(y, float)
    return float(spearmanr(a, b).statistic) if _defined(a, b) else float("nan")


def count_agreement(
    a: list[list[dict]], b: list[list[dict]], categories: Sequence[str]
) -> dict[str, float]:
    """Per category: the share of items where both sides count the same errors of it."""
    out = {}
    for cat in categories:
        same = [
            sum(e["category"] == cat for e in x) == sum(e["category"] == cat for e in y)
            for x, y in zip(a, b)
        ]
        out[cat] = float(np.mean(same)) if same else float("nan")
    return out


# ---------------------------------------------------------------- token level (top-k cache)


def topk_cache(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [T,k], log-probs [T,k], tail mass [T]) of a [T, vocab] log-prob array, the most
    likely first; k <= 0 keeps the whole vocabulary in id order (ids [T,1]: the most
    likely one; exact KL, large cache)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if k <= 0 or k >= lp.shape[1]:
        top = lp.astype(np.float32)
        return lp.argmax(axis=1)[:, None].astype(np.int32), top, np.zeros(len(lp))
    part = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(lp, part, axis=1), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(lp, ids, axis=1)
    tail = np.clip(1.0 - np.exp(top).sum(axis=1), 0.0, 1.0)
    return ids.astype(np.int32), top.astype(np.float32), tail.astype(np.float64)


def kl_from_topk(
    ids: np.ndarray, ref_top: np.ndarray, ref_tail: np.ndarray, cand_logprobs: np.ndarray
) -> np.ndarray:
    """KL(ref || cand) per token on the reference's top-k tokens plus one bucket for the
    rest: exact for the coarsened distributions, a lower bound of the full KL (equal when
    k covers the vocabulary)."""
    cand = np.asarray(cand_logprobs, dtype=np.float64)
    p_top = np.asarray(ref_top, dtype=np.float64)
    # The whole vocabulary kept (`topk_cache` with k <= 0): the ids are the columns.
    q_top = cand if p_top.shape == cand.shape else np.take_along_axis(cand, ids, axis=1)
    terms = np.exp(p_top) * (p_top - q_top)
    q_tail = np.clip(1.0 - np.exp(q_top).sum(axis=1), 1e-12, 1.0)
    p_tail = np.asarray(ref_tail, dtype=np.float64)
    tail = np.where(
        p_tail > 1e-12, p_tail * (np.log(np.maximum(p_tail, 1e-12)) - np.log(q_tail)), 0.0
    )
    return np.maximum(terms.sum(axis=1) + tail, 0.0)


def finite(x: float) -> float | None:
    """JSON has no nan: undefined figures are written as null."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
