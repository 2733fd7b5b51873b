"""`verm-local bench determinism`: one pair, one answer (issue 34), measured.

- invariance: a labelled synthetic pair per task with its answer in the trained format,
  teacher-forced through the decode loop (`Request.forced`, so every path decodes the same
  tokens), its logits kept at every answer position (`Request.trace`) on each path a
  judgement can take: alone (the reference), with drafted tokens, beside 1 and 7 other
  sequences, with its ground truth's prefix from the cache, and judged one-shot in prompt
  chunks of 64 rows. The largest |difference| of logits per path, with the batch-invariant
  kernels on and off (`--no-deterministic`: llama.cpp's multi-row kernels, and flash
  attention off for the batched engine as before), side by side in one run.
- cost: a whole greedy judgement alone (prefill with the images, decode, ms per token) and
  the replayed answer with drafts and without (what speculation gains), deterministic on
  and off, alternating, the median of `repeats`; with `compare_lib` the same once more on
  another llama.cpp build (e.g. the stock wheel's `llama_cpp/lib`), in a child process,
  so a build from before this change is measured in the same run.

Random weights of the model's real shape (`convert tiny-model --shape 8b-text4`) give the
real timings and the real rounding; their answers mean nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from verm_local.answer import trained_answer
from verm_local.errors import VermError
from verm_local.tasks import profile

from .data import pair_images, prediction_group
from .markdown import table_head

log = logging.getLogger(__name__)

PATHS = ("drafted", "batch of 2", "batch of 8", "prefix from the cache", "one-shot, n_ubatch 64")
MODES = ("on", "off")


def _gen(j: Any, requests: list[Any]) -> list[Any]:
    out = j.backend.generate_all(requests)
    for g in out:
        if isinstance(g, Exception):
            raise g
    return out


def _maxdiff(a: Any, b: Any) -> float:
    if a.trace is None or b.trace is None or a.trace.shape != b.trace.shape:
        return float("nan")
    return float(np.abs(a.trace.astype(np.float64) - b.trace.astype(np.float64)).max())


def _workload(task: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    gt, pred, errors = pair_images(task, rng, 2)
    _, neighbours = prediction_group(task, rng, 7)
    return {"task": task, "gt": gt, "pred": pred, "errors": errors, "neighbours": neighbours}


def _forced(j: Any, w: dict[str, Any], pred: bytes, errors: list, **change: Any) -> Any:
    p = profile(w["task"])
    text = json.dumps(trained_answer(p, errors), ensure_ascii=False)
    req = j.request(w["gt"], pred, p).request
    fields = dict(forced=j.backend.answer_tokens(text), trace=True, reuse_prefix=False)
    return dataclasses.replace(req, **{**fields, **change})


def invariance(
    model: str, w: dict[str, Any], deterministic: bool, common: dict[str, Any]
) -> dict[str, Any]:
    """The largest |difference| of logits of each path against the path alone."""
    from verm_local.judge import Judge

    out: dict[str, Any] = {}
    with Judge(
        model, parallel=8, prefix_cache=2, speculate=False, deterministic=deterministic, **common
    ) as j:
        b = j.backend
        out["deterministic"] = b.deterministic.on
        out["reason"] = b.deterministic.reason
        req = _forced(j, w, w["pred"], w["errors"])
        alone = _gen(j, [req])[0]
        out["answer_tokens"] = int(alone.completion_tokens)
        b.batch.speculate = True
        drafted = _gen(j, [req])[0]
        b.batch.speculate = False
        out["drafted"] = [int(drafted.drafted), int(drafted.accepted)]
        others = [_forced(j, w, n, [], trace=False) for n in w["neighbours"]]
        two = _gen(j, [req, others[0]])[0]
        eight = _gen(j, [others[3], req, *others[:3], *others[4:]])[1]
        _gen(j, [dataclasses.replace(req, reuse_prefix=True)])  # the prefix into the cache
        hits = b.batch.cache.hits
        cached = _gen(j, [dataclasses.replace(req, reuse_prefix=True)])[0]
        if b.batch.cache.hits != hits + 1:
            raise VermError("the cached prefix was not reused")
        diffs = [_maxdiff(alone, g) for g in (drafted, two, eight, cached)]
    with Judge(model, one_shot=True, n_ubatch=64, deterministic=deterministic, **common) as j:
        chunked = _gen(j, [_forced(j, w, w["pred"], w["errors"])])[0]
        diffs.append(_maxdiff(alone, chunked))
    out["max_abs_diff"] = dict(zip(PATHS, diffs))
    return out


def cost(model: str, w: dict[str, Any], deterministic: bool | None, common: dict[str, Any]) -> dict:
    """A whole greedy judgement alone, and the replayed answer with and without drafts."""
    from verm_local.judge import Judge

    p = profile(w["task"])
    with Judge(model, deterministic=deterministic, **common) as j:
        judgement = j.judge(w["gt"], w["pred"], p, max_errors=3, unreadable="score")
        t = judgement.timings
        row = {
            "deterministic": judgement.deterministic,
            "prefill_s": t.prefill_s,
            "vision_s": t.vision_s,
            "decode_s": t.decode_s,
            "tokens": t.completion_tokens,
            "judgement_s": round(t.prefill_s + t.decode_s, 4),
        }
        req = _forced(j, w, w["pred"], w["errors"], trace=False)
        for side in ("off", "on"):
            j.backend.batch.speculate = side == "on"
            gen = _gen(j, [req])[0]
            row[f"replay_{side}_ms_per_token"] = round(
                1000 * gen.decode_s / max(gen.completion_tokens, 1), 2
            )
            row[f"replay_{side}_passes"] = gen.forward_passes
    return row


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, float):
            out[k] = round(statistics.median(r[k] for r in rows), 4)
    out["runs"] = len(rows)
    return out


def run_determinism(
    model: str,
    *,
    task: str = "chart",
    seed: int = 0,
    repeats: int = 3,
    threads: int | None = None,
    image_tokens: int | None = None,
    compare_lib: Path | None = None,
    measure_cost: bool = True,
) -> dict[str, Any]:
    """Both measurements; the report."""
    from verm_local.backends.llamacpp import path_choice
    from verm_local.hardware import probe_cpu

    w = _workload(task, seed)
    common = dict(threads=threads, image_tokens=image_tokens, vision="gguf")
    report: dict[str, Any] = {
        "model": str(model),
        "task": task,
        "seed": seed,
        "cpu": probe_cpu()[0],
        "threads": threads,
        "invariance": {},
    }
    for mode in MODES:
        log.info("bench determinism: logits per path, deterministic %s", mode)
        report["invariance"][mode] = invariance(model, w, mode == "on", common)
    report["repack"] = {m: path_choice(None, None, m == "on")[1] for m in MODES}
    if measure_cost:
        runs: dict[str, list] = {m: [] for m in MODES}
        for r in range(repeats):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                log.info("bench determinism: cost, deterministic %s (%d/%d)", mode, r + 1, repeats)
                runs[mode].append(cost(model, w, mode == "on", common))
        report["cost"] = {m: _median(v) for m, v in runs.items()}
        if compare_lib is not None:
            log.info("bench determinism: cost on the build in %s", compare_lib)
            report["cost"]["other build"] = _median(
                [_child_cost(model, task, seed, common, compare_lib) for _ in range(repeats)]
            )
            report["compare_lib"] = str(compare_lib)
    return report


def _child_cost(model: str, task: str, seed: int, common: dict, lib: Path) -> dict[str, Any]:
    """`cost` in a child process on the llama.cpp build in `lib` (llama-cpp-python's
    LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB)."""
    from verm_local.settings import child_env

    arg = json.dumps({"model": model, "task": task, "seed": seed, "common": common})
    env = child_env(LLAMA_CPP_LIB_PATH=str(lib), MTMD_CPP_LIB=str(lib))
    proc = subprocess.run(
        [sys.executable, "-m", "verm_local.benchmarks.determinism", arg],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"]
        raise VermError(f"the run on the build in {lib} failed: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    inv = report["invariance"]
    lines = [
        f"# One pair, one answer: {Path(report['model']).name}, {report['task']} "
        f"({report['cpu']}, {report['threads'] or 'default'} threads)",
        "",
        "Largest |difference| of the logits at every answer position (the trained-format "
        f"answer teacher-forced, {inv['on']['answer_tokens']} tokens) against the "
        "judgement alone:",
        "",
        *table_head("path", "deterministic on", "deterministic off"),
    ]
    for path in PATHS:
        on, off = inv["on"]["max_abs_diff"][path], inv["off"]["max_abs_diff"][path]
        lines.append(f"| {path} | {on:g} | {off:g} |")
    lines += ["", f"- {inv['on']['reason']}", f"- {inv['off']['reason']}"]
    cost = report.get("cost")
    if cost:
        lines += [
            "",
            "Cost of a whole greedy judgement alone and of the replayed answer with and "
            "without drafts (medians):",
            "",
            *table_head(
                "build",
                "prefill s",
                "of it vision s",
                "decode ms/token",
                "judgement s",
                "replay ms/token, drafts off",
                "drafts on",
                "decode calls off / on",
            ),
        ]
        for name, c in cost.items():
            per = 1000 * c["decode_s"] / max(c["tokens"], 1)
            label = f"deterministic {name}" if name in MODES else f"{name}"
            lines.append(
                f"| {label} | {c['prefill_s']:.2f} | {c['vision_s']:.2f} | {per:.1f} | "
                f"{c['judgement_s']:.2f} | {c['replay_off_ms_per_token']} | "
                f"{c['replay_on_ms_per_token']} | {c['replay_off_passes']} / "
                f"{c['replay_on_passes']} |"
            )
        if "compare_lib" in report:
            lines += ["", f"other build: the llama.cpp libraries in {report['compare_lib']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """The largest |difference| of logits per path, deterministic on and off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inv = report["invariance"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, mode in enumerate(MODES):
        vals = [inv[mode]["max_abs_diff"][p] for p in PATHS]
        xs = [i + (k - 0.5) * 0.38 for i in range(len(PATHS))]
        ax.bar(xs, [max(v, 1e-9) for v in vals], 0.38, label=f"deterministic {mode}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(PATHS)), PATHS, rotation=15, fontsize=8)
    ax.set_ylabel("max |logit difference| (1e-9 = equal)")
    ax.legend()
    ax.set_title(Path(report["model"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _child_main(arg: str) -> None:
    a = json.loads(arg)
    row = cost(a["model"], _workload(a["task"], a["seed"]), None, a["common"])
    sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    _child_main(sys.argv[1])
