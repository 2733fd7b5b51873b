"""Token-level agreement between two models' distributions on the same forced tokens:
KL(reference || candidate) per token, its summary, and top-1 agreement. Pure numpy."""

from __future__ import annotations

import math

import numpy as np


def kl_per_token(ref_logprobs: np.ndarray, cand_logprobs: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_cand) in nats for each row of two [tokens, vocab] log-prob arrays."""
    ref = np.asarray(ref_logprobs, dtype=np.float64)
    cand = np.asarray(cand_logprobs, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {cand.shape}")
    p = np.exp(ref)
    # 0 * log 0 = 0: rows where the reference gives no mass contribute nothing there.
    terms = np.where(p > 0, p * (ref - cand), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


def top1_agreement(ref_logprobs: np.ndarray, cand_logprobs: np.ndarray) -> float:
    """Fraction of positions where both models' most likely token is the same."""
    return float(np.mean(np.argmax(ref_logprobs, -1) == np.argmax(cand_logprobs, -1)))


def summarize(kl: np.ndarray) -> dict[str, float]:
    """Mean, median, p95, max and the standard error of the mean of per-token KL."""
    kl = np.asarray(kl, dtype=np.float64).ravel()
    if kl.size == 0:
        raise ValueError("no tokens to summarize")
    stderr = float(kl.std(ddof=1) / math.sqrt(kl.size)) if kl.size > 1 else float("nan")
    return {
        "tokens": int(kl.size),
        "mean": float(kl.mean()),
        "median": float(np.median(kl)),
        "p95": float(np.percentile(kl, 95)),
        "max": float(kl.max()),
        "stderr": stderr,
    }
