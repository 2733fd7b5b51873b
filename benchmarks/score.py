"""VC-RewardBench scored as the authors score it (InternLM/Visual-ERM,
`evaluation/evaluation.py` at d842bec; facts in DESIGN.md section 2), so that a figure here
compares with the paper's.

Per item: the labels whose `type` is one of the task's error types and the predictions
whose `type` (or `category`) is; one matcher reply (pairs of pred_id, gt_id and a level
yes | partial, and the unmatched ids); the reply cleaned (other levels, ids that are not
integers or out of range dropped; one-to-one kept greedily in reply order; an unmatched
list the reply leaves out or leaves empty filled with the ids not matched, a given one used
as given). Hard F1 counts yes matches as true positives, soft F1 counts a partial one half;
false positives and negatives are the unmatched lists' lengths. Sums are micro-averaged per
task, over all items, and per error type (true and false positives by the prediction's
type, false negatives by the label's). Severity sums per type and in total (a missing or
non-numeric severity counts 0) are correlated (Pearson) per type within a task, per task
and overall. An item whose reply cannot be read fails: it is listed and left out of every
figure. Items of another category are not scored at all.

Pure: the matcher's reply comes in as text (`benchmarks/matcher.py` asks for it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from verm_local.constants import CATEGORIES

TASK_ORDER = ("table", "chart", "svg")  # the order the authors report tasks in
ALL_TYPES = sorted({t for types in CATEGORIES.values() for t in types})


class ItemFailed(Exception):
    """The matcher's reply for an item could not be used: the item is left out."""


# ---------------------------------------------------------------- formulas


def ratio(a: float, b: float) -> float:
    """a / b, and 0 where b is 0."""
    return a / b if b != 0 else 0.0


def f1_hard(tp: float, fp: float, fn: float) -> float:
    """F1 from counts; nothing predicted and nothing to find is a perfect 1."""
    if tp == 0 and fp == 0 and fn == 0:
        return 1.0
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return ratio(2 * p * r, p + r)


def f1_soft(tp: float, fp: float, fn: float) -> float:
    """F1 from a fractional true-positive count (partial matches count half); all-zero
    counts give 0, as in the authors' evaluation."""
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return ratio(2 * p * r, p + r)


def counts(tp_hard: float, tp_soft: float, fp: float, fn: float) -> dict[str, float]:
    return {
        "tp_hard": tp_hard,
        "tp_soft": tp_soft,
        "fp": fp,
        "fn": fn,
        "f1_hard": f1_hard(tp_hard, fp, fn),
        "f1_soft": f1_soft(tp_soft, fp, fn),
    }


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson r; nan under two items or when a side is constant."""
    if len(xs) != len(ys) or len(xs) < 2:
        return float("nan")
    if min(xs) == max(xs) or min(ys) == max(ys):
        return float("nan")
    from scipy.stats import pearsonr

    return float(pearsonr(xs, ys).statistic)


# ---------------------------------------------------------------- one item


def error_type(e: dict[str, Any]) -> Any:
    """An error's type: its `type`, or else its `category` (chart and svg answers)."""
    return e.get("type") or e.get("category")


def task_of(item: dict[str, Any]) -> str | None:
    """The item's task when it is one the benchmark scores, else None."""
    cat = item.get("category")
    return cat if isinstance(cat, str) and cat in CATEGORIES else None


def kept_errors(item: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(predicted, labelled) errors of an item that count: labels whose `type` is one of
    the task's types, predictions whose type or category is."""
    allowed = CATEGORIES[item["category"]]
    labels = item.get("human_errors", []) or []
    pred_json = item.get("pred_json", {}) or {}
    preds = pred_json.get("errors", []) or []
    return (
        [e for e in preds if error_type(e) in allowed],
        [e for e in labels if e.get("type") in allowed],
    )


def matcher_lists(preds: list[dict], labels: list[dict]) -> tuple[list[dict], list[dict]]:
    """The two lists the matcher is shown: each error's id, type, description and
    severity (no location)."""

    def shown(e: dict[str, Any]) -> dict[str, Any]:
        t = error_type(e)
        return {
            "type": "unknown" if t is None else t,
            "description": e.get("description", ""),
            "severity": e.get("severity", None),
        }

    return (
        [{"pred_id": i, **shown(e)} for i, e in enumerate(preds)],
        [{"gt_id": i, **shown(e)} for i, e in enumerate(labels)],
    )


def read_reply(text: str) -> dict[str, Any]:
    """The matcher's JSON object: code fences dropped, the text from the first `{` to the
    last `}` parsed. ItemFailed when that is not a JSON object."""
    raw = (text or "").strip()
    if raw.startswith("```"):
        raw = raw.strip("`")
        start = raw.find("{")
        if start >= 0:
            raw = raw[start:]
    first, last = raw.find("{"), raw.rfind("}")
    if 0 <= first < last:
        raw = raw[first : last + 1]
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ItemFailed(f"the matcher's reply is not JSON ({exc})") from None
    if not isinstance(reply, dict):
        raise ItemFailed("the matcher's reply is not a JSON object")
    return reply


def clean_matches(reply: dict[str, Any], n_pred: int, n_gt: int) -> list[dict[str, Any]]:
    """Matches with a level of yes or partial and integer ids in range, one-to-one: a pair
    whose prediction or label is already taken (earlier in the reply) is dropped."""
    taken_pred: set[int] = set()
    taken_gt: set[int] = set()
    out = []
    for m in reply.get("matches", []) or []:
        pid, gid, level = m.get("pred_id"), m.get("gt_id"), m.get("match_level", "no")
        if level not in ("yes", "partial"):
            continue
        if not isinstance(pid, int) or not isinstance(gid, int):
            continue
        if not (0 <= pid < n_pred and 0 <= gid < n_gt):
            continue
        if pid in taken_pred or gid in taken_gt:
            continue
        taken_pred.add(pid)
        taken_gt.add(gid)
        out.append({"pred_id": pid, "gt_id": gid, "match_level": level})
    return out


def _unmatched(reply: dict[str, Any], key: str, n: int, matched: Iterable[int]) -> set:
    given = reply.get(key)
    if not given:  # left out or empty: the ids nothing matched
        return set(range(n)) - set(matched)
    return set(given)


def severity_sums(errors: list[dict], allowed: tuple[str, ...]) -> dict[str, float]:
    """Severity summed per type (missing or non-numeric: 0), and `__total__`."""
    sums = {t: 0.0 for t in allowed}
    for e in errors:
        t = error_type(e)
        if t not in allowed:
            continue
        try:
            sums[t] += float(e.get("severity", 0))
        except (TypeError, ValueError):
            pass
    sums["__total__"] = sum(sums[t] for t in allowed)
    return sums


def score_item(item: dict[str, Any], reply_text: str) -> dict[str, Any]:
    """One item's result from the matcher's reply. Anything in the item or the reply that
    cannot be used as the evaluation uses it fails the item (ItemFailed), as there."""
    try:
        return _score_item(item, reply_text)
    except ItemFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed part fails this item only
        raise ItemFailed(f"{exc.__class__.__name__}: {exc}") from None


def _score_item(item: dict[str, Any], reply_text: str) -> dict[str, Any]:
    category = item["category"]
    allowed = CATEGORIES[category]
    preds, labels = kept_errors(item)
    reply = read_reply(reply_text)
    matches = clean_matches(reply, len(preds), len(labels))
    un_pred = _unmatched(reply, "unmatched_pred", len(preds), (m["pred_id"] for m in matches))
    un_gt = _unmatched(reply, "unmatched_gt", len(labels), (m["gt_id"] for m in matches))
    hard = sum(m["match_level"] == "yes" for m in matches)
    soft = sum(1.0 if m["match_level"] == "yes" else 0.5 for m in matches)
    by_type = {}
    for t in allowed:
        mine = [m for m in matches if error_type(preds[m["pred_id"]]) == t]
        by_type[t] = counts(
            sum(m["match_level"] == "yes" for m in mine),
            float(sum(1.0 if m["match_level"] == "yes" else 0.5 for m in mine)),
            sum(1 for i in un_pred if error_type(preds[i]) == t),
            sum(1 for i in un_gt if error_type(labels[i]) == t),
        )
    return {
        "id": item.get("id"),
        "idx": item.get("idx"),
        "category": category,
        "counts": {
            "pred_error_num": len(preds),
            "gt_error_num": len(labels),
            "match_num": len(matches),
        },
        "matches": matches,
        "overall": counts(hard, float(soft), len(un_pred), len(un_gt)),
        "by_type": by_type,
        "severity_pred": severity_sums(preds, allowed),
        "severity_gt": severity_sums(labels, allowed),
        "raw_resp": reply_text,
    }


# ---------------------------------------------------------------- the whole set


def aggregate(rows: list[dict[str, Any]], category: str | None) -> dict[str, Any]:
    """Micro sums of a task's items (or all items, `category=None`): overall, and per
    error type (over the types of the task, or every type of any task)."""
    types = CATEGORIES[category] if category else ALL_TYPES
    total = {k: sum(r["overall"][k] for r in rows) for k in ("tp_hard", "tp_soft", "fp", "fn")}
    by_type = {}
    for t in types:
        parts = [r["by_type"][t] for r in rows if t in r["by_type"]]
        if parts:
            by_type[t] = counts(
                *(sum(x[k] for x in parts) for k in ("tp_hard", "tp_soft", "fp", "fn"))
            )
    return {"overall": counts(**total), "by_type": by_type}


def severity_correlation(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pearson r of the severity sums: per type and in total within each task, and in
    total over all items."""
    out: dict[str, Any] = {"by_category": {}, "overall": {}}

    def r(part: list[dict], key: str) -> float:
        return pearson(
            [x["severity_pred"].get(key, 0.0) for x in part],
            [x["severity_gt"].get(key, 0.0) for x in part],
        )

    for cat in TASK_ORDER:
        part = [x for x in rows if x["category"] == cat]
        out["by_category"][cat] = {
            "by_type": {t: r(part, t) for t in CATEGORIES[cat]},
            "total": r(part, "__total__"),
        }
    out["overall"]["total"] = r(rows, "__total__")
    return out


def summarize(rows: list[dict[str, Any]], failed: list[dict[str, Any]]) -> dict[str, Any]:
    """The authors' summary: `overall`, `by_category` (table, chart, svg), the failed
    items under `errors`, and `severity_correlation`."""
    return {
        "overall": aggregate(rows, None),
        "by_category": {
            cat: aggregate([x for x in rows if x["category"] == cat], cat) for cat in TASK_ORDER
        },
        "errors": failed,
        "severity_correlation": severity_correlation(rows),
    }


def table_rows(summary: dict[str, Any], rows: list[dict], failed: list[dict]) -> list[dict]:
    """The paper's figures per task and overall: F1-hard, F1-soft, severity r (each x100),
    items scored and items failed."""
    out = []
    for group in (*TASK_ORDER, "overall"):
        agg = summary["overall"] if group == "overall" else summary["by_category"][group]
        corr = summary["severity_correlation"]
        r = corr["overall"]["total"] if group == "overall" else corr["by_category"][group]["total"]
        out.append(
            {
                "group": group,
                "f1_hard": 100 * agg["overall"]["f1_hard"],
                "f1_soft": 100 * agg["overall"]["f1_soft"],
                "severity_r": 100 * r,
                "items": sum(1 for x in rows if group in ("overall", x["category"])),
                "failed": sum(1 for x in failed if group in ("overall", x.get("category"))),
            }
        )
    return out


def markdown_table(table: list[dict], title: str = "") -> str:
    from .markdown import table_head

    lines = [title, ""] if title else []
    lines += table_head("task", "F1-hard", "F1-soft", "severity r", "items", "failed")
    for row in table:
        r = "n/a" if math.isnan(row["severity_r"]) else f"{row['severity_r']:.1f}"
        lines.append(
            f"| {row['group']} | {row['f1_hard']:.1f} | {row['f1_soft']:.1f} | {r} | "
            f"{row['items']} | {row['failed']} |"
        )
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """nan (an undefined correlation) written as null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, set):
        return sorted(json_safe(v) for v in value)
    return value


# ---------------------------------------------------------------- a whole file


def score_rows(
    rows: list[dict[str, Any]],
    matcher: Any,
    *,
    workers: int = 8,
    progress: Any = None,
) -> dict[str, Any]:
    """Score rows in the authors' input format with `matcher` (one reply per item, `workers`
    at once): {"summary", "per_item_results", "failed_items"} as their evaluation returns
    it, plus `skipped` (rows of a category the benchmark does not score) and the table."""
    from concurrent.futures import ThreadPoolExecutor

    scored = [r for r in rows if isinstance(r, dict) and task_of(r) is not None]
    skipped = len(rows) - len(scored)

    def one(item: dict[str, Any]) -> dict[str, Any]:
        try:
            preds, labels = kept_errors(item)
            reply = matcher.reply(item["category"], preds, labels)
            return score_item(item, reply)
        except Exception as exc:  # noqa: BLE001 - a failed item is listed, never fatal
            return {
                "id": item.get("id"),
                "idx": item.get("idx"),
                "category": item.get("category"),
                "error": str(exc) or exc.__class__.__name__,
            }

    ordered = sorted(scored, key=lambda r: TASK_ORDER.index(r["category"]))
    results, failed = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for n, res in enumerate(pool.map(one, ordered), 1):
            (failed if "error" in res else results).append(res)
            if progress is not None:
                progress(n, len(ordered), len(failed))
    summary = summarize(results, failed)
    return {
        "summary": summary,
        "per_item_results": results,
        "failed_items": failed,
        "skipped": skipped,
        "table": table_rows(summary, results, failed),
    }


def run_score(
    predictions: Path, matcher: Any, out: Path, *, workers: int = 8
) -> tuple[dict[str, Any], str]:
    """`bench score`: score a predictions file (a JSON list or JSONL) with `matcher`; write
    `out` (the authors' structure, JSON with null for an undefined correlation) and its
    Markdown table beside it; the result and the table."""
    import logging

    from verm_local.fileio import write_json_atomic
    from verm_local.rows import load_rows

    log = logging.getLogger(__name__)
    rows = [value for _, _, value in load_rows(predictions)]

    def progress(n: int, total: int, failed: int) -> None:
        if n == total or n % 25 == 0:
            log.info("score: %d/%d items (%d failed)", n, total, failed)

    result = score_rows(rows, matcher, workers=workers, progress=progress)
    comparable = bool(matcher.comparable)
    report = {
        "summary": result["summary"],
        "per_item_results": result["per_item_results"],
        "failed_items": result["failed_items"],
        "comparable": comparable,
        "matcher": matcher.describe(),
        "predictions": str(predictions),
        "items": len(result["per_item_results"]),
        "skipped": result["skipped"],
        "table": result["table"],
    }
    note = (
        "Scored as the authors' evaluation scores VC-RewardBench: comparable with the paper's "
        "figures (Visual-ERM: F1-hard 42.1, F1-soft 44.7, severity r 58.4)."
        if comparable
        else "comparable: false (the "
        + ("lexical matcher" if matcher.kind == "lexical" else "built-in matcher prompt")
        + "): not to be set beside the paper's figures."
    )
    table = markdown_table(result["table"], f"# VC-RewardBench: {predictions.name} (x100)")
    table += f"\n{note} Matcher: {matcher.describe().get('model') or matcher.kind}; "
    table += f"{len(result['failed_items'])} failed, {result['skipped']} skipped.\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, json_safe(report))
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    return report, table


# ---------------------------------------------------------------- comparing two models


FIGURES = ("f1_hard", "f1_soft", "severity_r")


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    return {
        **{
            k: np.array([r["overall"][k] for r in rows], dtype=float)
            for k in ("tp_hard", "tp_soft", "fp", "fn")
        },
        "sev_pred": np.array([r["severity_pred"]["__total__"] for r in rows], dtype=float),
        "sev_gt": np.array([r["severity_gt"]["__total__"] for r in rows], dtype=float),
    }


def _figures_of(c: dict[str, Any], idx: Any) -> dict[str, Any]:
    """The overall figures (x100) of the items `idx` ([resamples, items] indices),
    vectorised over resamples, with the authors' formulas."""
    import numpy as np

    tp_h, tp_s, fp, fn = (c[k][idx].sum(axis=-1) for k in ("tp_hard", "tp_soft", "fp", "fn"))
    with np.errstate(divide="ignore", invalid="ignore"):

        def f1(tp: Any, all_zero_is_one: bool) -> Any:
            p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
            f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
            if all_zero_is_one:
                f = np.where((tp == 0) & (fp == 0) & (fn == 0), 1.0, f)
            return 100 * f

        x, y = c["sev_pred"][idx], c["sev_gt"][idx]
        xm, ym = x - x.mean(axis=-1, keepdims=True), y - y.mean(axis=-1, keepdims=True)
        vx, vy = (xm**2).sum(axis=-1), (ym**2).sum(axis=-1)
        r = np.where((vx > 0) & (vy > 0), (xm * ym).sum(axis=-1) / np.sqrt(vx * vy), np.nan)
    return {"f1_hard": f1(tp_h, True), "f1_soft": f1(tp_s, False), "severity_r": 100 * r}


def paired_difference(
    reference: list[dict[str, Any]],
    candidate: list[dict[str, Any]],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Candidate minus reference, for each overall figure (x100, points), with a paired
    bootstrap interval: the same resampled items for both (item results aligned, both
    scored). An undefined correlation in a resample is left out of its interval."""
    import numpy as np

    if len(reference) != len(candidate):
        raise ValueError("paired results must be aligned item by item")
    n = len(reference)
    ref, cand = _columns(reference), _columns(candidate)
    full = np.arange(n)[None, :]
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n)) if n else full
    a_full, b_full = _figures_of(ref, full), _figures_of(cand, full)
    a, b = _figures_of(ref, draws), _figures_of(cand, draws)
    tail = 100 * (1 - confidence) / 2
    out = {}
    for k in FIGURES:
        diff = b[k] - a[k]
        diff = diff[~np.isnan(diff)]
        value = float(b_full[k][0] - a_full[k][0])
        low, high = (
            (float(np.percentile(diff, tail)), float(np.percentile(diff, 100 - tail)))
            if diff.size
            else (math.nan, math.nan)
        )
        out[k] = {
            "value": value,
            "low": low,
            "high": high,
            "reference": float(a_full[k][0]),
            "candidate": float(b_full[k][0]),
            "items": n,
        }
    return out


def difference_line(name: str, diff: dict[str, dict[str, Any]]) -> str:
    """`Q4_K_M: F1-hard -1.2 (-2.9, +0.4), F1-soft ..., severity r ...`"""
    labels = {"f1_hard": "F1-hard", "f1_soft": "F1-soft", "severity_r": "severity r"}
    parts = []
    for k, label in labels.items():
        d = diff[k]
        if math.isnan(d["value"]):
            parts.append(f"{label} n/a")
        else:
            parts.append(f"{label} {d['value']:+.1f} ({d['low']:+.1f}, {d['high']:+.1f})")
    return f"{name}: " + ", ".join(parts)
