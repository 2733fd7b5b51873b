"""What `bench latency` reports per model and what its CI gate reads: spreads of the stages,
the ratios (`overhead_ratio`, `relative_e2e`, `shared_ratio`) with their confidence
intervals, the repack comparison, and a stored run read back as a baseline."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from .gate import ratio_interval
from .latency_runs import STAGES

log = logging.getLogger(__name__)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_model(verm: dict[str, Any], stock: dict[str, Any] | None) -> dict[str, Any]:
    runs = verm["runs"]
    out: dict[str, Any] = {
        "model": verm["model"],
        "load_s": verm["load_s"],
        "peak_rss": verm["peak_rss"],
        "peak_gpu": verm["peak_gpu"],
        "completion_tokens": runs[-1]["completion_tokens"],
        "prompt_tokens": runs[-1]["prompt_tokens"],
        "cut_runs": sum(bool(r.get("cut")) for r in runs),
        "rounds": len(runs),
    }
    for key in STAGES[1:]:
        out[key] = _spread([r[key] for r in runs])
    if stock is not None:
        e2e = [r["e2e_s"] for r in stock["runs"]]
        out["llamacpp"] = {
            "load_s": stock["load_s"],
            "e2e_s": _spread(e2e),
            "completion_tokens": stock["runs"][-1]["completion_tokens"],
        }
        iv = ratio_interval([r["e2e_s"] for r in runs], e2e).to_dict()
        out["overhead_ratio"] = iv["value"]
        out["intervals"] = {"overhead_ratio": iv}
    return out


def shared_summary(
    ind: dict[str, Any], bat: dict[str, Any], predictions: int, rl: bool = False
) -> dict[str, Any]:
    """The ratio, and where it comes from: the prompts' evaluation (vision, prefill; the
    ground truth's share is what reuse saves) and the decode rate (what batching buys:
    on a GPU an N-row step costs about one row's; on a small CPU about N rows')."""

    def rate(r: dict[str, Any]) -> float:
        return r["tokens"] / r["decode_s"] if r["decode_s"] > 0 else 0.0

    out = {
        "predictions": predictions,
        "rounds": len(ind.get("runs", [])),
        "sampling": "rl" if rl else "greedy",
        "independent_s": ind["s"],
        "batched_s": bat["s"],
        "ratio": bat["s"] / ind["s"],
        "independent_tokens": ind["tokens"],
        "batched_tokens": bat["tokens"],
        "failed": bat["failed"],
        "ratio_per_token": (bat["s"] / max(bat["tokens"], 1)) / (ind["s"] / max(ind["tokens"], 1)),
        "independent_prompt_s": ind["s"] - ind["decode_s"],
        "batched_prompt_s": bat["s"] - bat["decode_s"],
        "independent_decode_tok_s": rate(ind),
        "batched_decode_tok_s": rate(bat),
    }
    out["prompt_ratio"] = out["batched_prompt_s"] / out["independent_prompt_s"]
    out["decode_speedup"] = (
        out["batched_decode_tok_s"] / out["independent_decode_tok_s"]
        if out["independent_decode_tok_s"]
        else 0.0
    )
    return out


def repack_summary(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """The same model loaded with and without llama.cpp's extra buffer types (repacked
    weight layouts, AMX tiles): medians per stage and off/on ratios (above 1: repacking
    is faster)."""
    out: dict[str, Any] = {}
    for name, m in (("on", on), ("off", off)):
        runs = m["runs"]
        out[name] = {
            k: statistics.median(r[k] for r in runs)
            for k in ("e2e_s", "text_prefill_s", "vision_s", "decode_tok_s")
        }
        out[name]["load_s"] = m["load_s"]
        out[name]["peak_rss"] = m["peak_rss"]
    out["e2e_ratio_off_on"] = out["off"]["e2e_s"] / out["on"]["e2e_s"]
    out["prefill_ratio_off_on"] = (
        out["off"]["text_prefill_s"] / out["on"]["text_prefill_s"]
        if out["on"]["text_prefill_s"]
        else 0.0
    )
    out["decode_ratio_on_off"] = (
        out["on"]["decode_tok_s"] / out["off"]["decode_tok_s"]
        if out["off"]["decode_tok_s"]
        else 0.0
    )
    out["faster"] = "on" if out["e2e_ratio_off_on"] > 1 else "off"
    return out


def load_baseline(path: Path) -> dict[str, Any]:
    """A stored latency report; InputError when it is not one."""
    from verm_local.errors import InputError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{path}: not a latency report") from None
    if not isinstance(data, dict) or "models" not in data:
        raise InputError(f"{path}: not a latency report")
    return data
