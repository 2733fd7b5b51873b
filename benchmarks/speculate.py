"""`verm-local bench speculate`: decoding with drafts of the grammar-dictated text against
decoding without, one model, side by side in one run (`batch.BatchEngine`, issue 27).

- replay: labelled synthetic pairs (`data.pair_images`), each with its answer in the
  trained format (`answer.trained_answer`, written as `json.dumps` writes it, the layout
  of the calibration answers), teacher-forced through the decode loop (`Request.forced`):
  the answer a model gives that follows the canonical tokens. Decode calls per answer
  token and decode seconds, with and without drafts: the gain's ceiling, real timings of
  the model's shape (the weights do not matter to it).
- free: the same pairs judged as `judge` judges them (greedy; `max_errors` bounds the
  list, random weights otherwise fill it to the cap), with and without: decode
  seconds, drafts kept, and whether every judgement is identical. Random weights pick
  odd tokenizations of the dictated text, so their acceptance says little of a trained
  model's.

Pairs alternate which side runs first, so neither gets the warmer caches throughout."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

from verm_local.answer import trained_answer
from verm_local.errors import VermError
from verm_local.tasks import profile

from .data import pair_images
from .markdown import table_head

log = logging.getLogger(__name__)

SIDES = ("off", "on")


def _counts(gen: Any) -> dict[str, Any]:
    return {
        "tokens": gen.completion_tokens,
        "passes": gen.forward_passes,
        "drafted": gen.drafted,
        "accepted": gen.accepted,
        "decode_s": round(gen.decode_s, 4),
    }


def run_speculate(
    model: str | Path,
    *,
    items: int = 6,
    tasks: tuple[str, ...] = ("chart",),
    seed: int = 0,
    free: bool = True,
    max_errors: int | None = 3,
    image_tokens: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Both measurements on `items` pairs (round-robin over `tasks`); the report."""
    from verm_local.judge import Judge

    rng = random.Random(seed)
    pairs = []
    for i in range(items):
        task = tasks[i % len(tasks)]
        gt, pred, errors = pair_images(task, rng, 1 + i % 3)
        pairs.append((task, gt, pred, errors))
    rows: list[dict[str, Any]] = []
    with Judge(model=model, image_tokens=image_tokens, threads=threads) as j:
        engine = j.backend.batch
        try:
            for i, (task, gt, pred, errors) in enumerate(pairs):
                p = profile(task)
                text = json.dumps(trained_answer(p, errors), ensure_ascii=False)
                request = dataclasses.replace(
                    j.request(gt, pred, p).request,
                    forced=j.backend.answer_tokens(text),  # the answer and its end
                    reuse_prefix=False,
                )
                row: dict[str, Any] = {"task": task, "errors": len(errors)}
                order = SIDES if i % 2 == 0 else SIDES[::-1]
                judged = {}
                for side in order:
                    engine.speculate = side == "on"
                    gen = j.backend.generate_all([request])[0]
                    if isinstance(gen, Exception):
                        raise gen
                    if gen.text != text:
                        raise VermError("the replayed answer came out changed")
                    row[f"replay_{side}"] = _counts(gen)
                    if free:
                        judged[side] = j.judge(
                            gt, pred, p, max_errors=max_errors, unreadable="score"
                        )
                        row[f"free_{side}"] = {
                            **_counts(j.last_generation),
                            "reward": judged[side].reward,
                        }
                if free:
                    a, b = (judged[s].model_dump(exclude={"timings"}) for s in SIDES)
                    row["identical"] = a == b
                rows.append(row)
                log.info(
                    "[%d/%d] %s: replay %s -> %s decode calls%s",
                    i + 1, len(pairs), task, row["replay_off"]["passes"],
                    row["replay_on"]["passes"],
                    f", judgement identical: {row['identical']}" if free else "",
                )  # fmt: skip
        finally:
            engine.speculate = True
    return {
        "model": j.backend.info.model_dump(),
        "items": items,
        "tasks": list(tasks),
        "seed": seed,
        "max_errors": max_errors,
        "rows": rows,
        "summary": summarise(rows),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per measurement and side: tokens, decode calls, calls per token, drafts, seconds;
    the decode-time ratio with/without and the share of drafts kept."""
    out: dict[str, Any] = {}
    for kind in ("replay", "free"):
        if not rows or f"{kind}_on" not in rows[0]:
            continue
        sides = {}
        for side in SIDES:
            got = [r[f"{kind}_{side}"] for r in rows]
            tot = {k: sum(g[k] for g in got) for k in ("tokens", "passes", "drafted", "accepted")}
            tot["decode_s"] = round(sum(g["decode_s"] for g in got), 3)
            tot["passes_per_token"] = round(tot["passes"] / max(tot["tokens"], 1), 3)
            tot["ms_per_token"] = round(1000 * tot["decode_s"] / max(tot["tokens"], 1), 2)
            sides[side] = tot
        on, off = sides["on"], sides["off"]
        out[kind] = {
            **sides,
            "decode_ratio": round(on["decode_s"] / off["decode_s"], 3) if off["decode_s"] else None,
            "acceptance": round(on["accepted"] / on["drafted"], 3) if on["drafted"] else None,
        }
    if rows and "identical" in rows[0]:
        out["identical"] = sum(r["identical"] for r in rows)
        out["judged"] = len(rows)
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    m = report["model"]
    lines = [
        f"# Speculative decoding: {Path(m['path']).name} ({m['quant']}), "
        f"{report['items']} pairs ({', '.join(report['tasks'])})",
        "",
        *table_head(
            "measurement",
            "drafts",
            "answer tokens",
            "decode calls",
            "calls/token",
            "drafted",
            "kept",
            "decode s",
            "ms/token",
            "decode with/without",
        ),  # fmt: skip
    ]
    for kind in ("replay", "free"):
        if kind not in s:
            continue
        for side in SIDES:
            t = s[kind][side]
            ratio = s[kind]["decode_ratio"] if side == "on" else ""
            lines.append(
                f"| {kind} | {side} | {t['tokens']} | {t['passes']} | {t['passes_per_token']} "
                f"| {t['drafted']} | {t['accepted']} | {t['decode_s']} | {t['ms_per_token']} "
                f"| {ratio} |"
            )
    if "identical" in s:
        lines += [
            "",
            f"Judgements identical with and without drafts: {s['identical']}/{s['judged']}.",
        ]
    lines += [
        "",
        "replay: the trained-format answers teacher-forced (a model that follows the "
        "canonical tokens: the ceiling); free: the model's own greedy judgements (random "
        "weights choose odd tokenizations: their share of drafts kept says little of a "
        "trained model's).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Decode calls per answer token and decode seconds, without and with drafts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    kinds = [k for k in ("replay", "free") if k in s]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in (
        (axes[0], "passes_per_token", "decode calls per answer token"),
        (axes[1], "decode_s", "decode seconds"),
    ):
        for k, side in enumerate(SIDES):
            xs = [i + (k - 0.5) * 0.38 for i in range(len(kinds))]
            ax.bar(xs, [s[kind][side][key] for kind in kinds], 0.38, label=f"drafts {side}")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(Path(report["model"]["path"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
