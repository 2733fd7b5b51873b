"""`verm-local bench latency`: per-stage latency and memory per model, side by side with
llama.cpp's own multimodal path on the same files, and a CI gate against a stored run.

The timed runs load every model, and for GGUF models llama-cpp-python's stock multimodal
chat path on the same files (MTMDChatHandler, the same images, prompt and JSON schema,
greedy), in one worker process: a warm-up each, then --repeat rounds that judge once on
each in turn (A, B, A, B ...). Each gated ratio is taken per round and reported with a
confidence interval over the rounds (benchmarks/gate.py): `overhead_ratio` = verm-local
end-to-end / stock end-to-end, `relative_e2e` = a model's end-to-end / the first
model's. Time to first token is vision + prefill + one mean decode step. Memory is
measured apart, one default judgement per model in a fresh process (--memory). With
--predictions N, N predictions against one ground truth are judged one at a time and as
one batch, interleaved in one process (greedy, or --rl-sampling), and `shared_ratio` =
batched / independent."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .gate import Plan, ratio_interval
from .latency_report import write_reports
from .latency_runs import prefill_sweep, run_worker
from .latency_summary import repack_summary, shared_summary, summarize_model

log = logging.getLogger(__name__)


def run_latency(
    models: list[str],
    gt: str,
    pred: str,
    *,
    task: str = "chart",
    repeat: int = 3,
    threads: int | None = None,
    image_tokens: int | None = None,
    max_tokens: int | None = None,
    stock: bool = True,
    out: str | Path | None = None,
    predictions: int = 0,
    rl_sampling: bool = False,
    repack: bool | None = None,
    compare_repack: bool = False,
    memory: bool = True,
    serve_parallel: int = 0,
    sweep: bool = False,
    timed: bool = True,
    plan: Plan | None = None,
    slowdown: float | None = None,
) -> dict[str, Any]:
    """Latency per model (and llama.cpp's own path), and for GGUF models: one default
    judgement's memory (`memory`), the served worker's (`serve_parallel`), the prefill
    settings side by side (`sweep`); `timed=False` skips the repeated timing runs. With a
    gate `plan` the timed and shared measurements run rounds until each gated ratio is
    decided (its targets keyed `MODEL|ratio` by the names in `models`); `slowdown` makes
    verm-local's side that much slower (checking the gate)."""
    from verm_local.hardware import default_threads
    from verm_local.modelref import resolve_model

    from .agreement import model_path

    # One count for both sides: llama-cpp-python's own default is half the logical CPUs,
    # verm-local's one per physical core, which would time them on different threads.
    threads = threads or default_threads()  # VERM_LOCAL_THREADS, else the machine's
    args = {
        "gt": str(gt),
        "pred": str(pred),
        "task": task,
        "repeat": repeat,
        "threads": threads,
        "image_tokens": image_tokens,
        "max_tokens": max_tokens,
        "repack": repack,
        "slowdown": slowdown,
    }
    report: dict[str, Any] = {"settings": args, "machine": _machine(), "models": {}}
    paths = {name: model_path(name) for name in models}
    if plan is not None:
        # The workers know the models by path.
        by_path = {
            f"{paths[k.split('|')[0]]}|{k.split('|')[1]}": v for k, v in plan.targets.items()
        }
        args["gate"] = {**plan.to_dict(), "targets": by_path}
        report["gate_plan"] = {
            "schedule": plan.schedule(),
            "level": plan.level,
            "budget_s": plan.budget_s,
            "max_repeat": plan.max_repeat,
        }
    measured: dict[str, Any] = {}
    if timed:
        log.info(
            "latency: %s%s, %s interleaved rounds ...",
            ", ".join(models),
            " and llama.cpp's own path" if stock else "",
            repeat if plan is None else f"up to {plan.max_repeat} (within {plan.budget_s:g} s)",
        )
        measured = run_worker(
            "timed", "", {**args, "models": [paths[n] for n in models], "stock": stock}
        )
    for name in models:
        path = paths[name]
        gguf = resolve_model(path).format == "gguf"
        entry: dict[str, Any] = {}
        if timed:
            verm = measured[path]["verm"]
            entry = summarize_model(verm, measured[path]["stock"])
            _sequential(entry, measured, path, "overhead_ratio")
        report["models"][name] = entry
        if memory and gguf:
            log.info("latency: %s: one default judgement, its memory ...", name)
            entry["oneshot"] = run_worker("oneshot", path, args)
        if serve_parallel and gguf:
            log.info("latency: %s: serve --parallel %d, its memory ...", name, serve_parallel)
            entry["served"] = run_worker("served", path, {**args, "serve_parallel": serve_parallel})
        if sweep and gguf:
            entry["sweep"] = prefill_sweep(path, args)
        if compare_repack and gguf and timed:
            log.info("latency: %s: weights repacked and not, side by side ...", name)
            both = {}
            for setting in (True, False):  # the default run above is one of the two
                both[setting] = (
                    verm
                    if verm.get("repack") is setting
                    else run_worker("verm", path, {**args, "repack": setting})
                )
            report["models"][name]["repack"] = repack_summary(both[True], both[False])
        if predictions > 1 and gguf:
            log.info(
                "latency: %s: %d predictions vs one ground truth, independent and batched ...",
                name,
                predictions,
            )
            extra = {**args, "predictions": predictions, "rl": rl_sampling}
            both = run_worker("shared", path, extra)
            shared = shared_summary(both["independent"], both["batched"], predictions, rl_sampling)
            entry.setdefault("intervals", {})["shared_ratio"] = ratio_interval(
                [r["s"] for r in both["batched"]["runs"]],
                [r["s"] for r in both["independent"]["runs"]],
            ).to_dict()
            _sequential(entry, both, path, "shared_ratio")
            report["models"][name]["shared_prefix"] = shared
            report["models"][name]["shared_ratio"] = shared["ratio"]
    timed_models = [n for n in models if "e2e_s" in report["models"][n]]
    if timed_models:
        # Each model against the first, measured in the same rounds. The first is the
        # reference (its ratio to itself is 1 by definition), so it has none to gate.
        first = [r["e2e_s"] for r in measured[paths[timed_models[0]]]["verm"]["runs"]]
        for n in timed_models[1:]:
            iv = ratio_interval(
                [r["e2e_s"] for r in measured[paths[n]]["verm"]["runs"]], first
            ).to_dict()
            report["models"][n]["relative_e2e"] = iv["value"]
            report["models"][n].setdefault("intervals", {})["relative_e2e"] = iv
            _sequential(report["models"][n], measured, paths[n], "relative_e2e")
    if out:
        write_reports(report, Path(out))
    return report


def _sequential(entry: dict[str, Any], measured: dict[str, Any], path: str, ratio: str) -> None:
    """A sequential run's interval of `ratio` (its decisive look, at the plan's per-look
    level, with rounds, seconds and the smallest detectable slowdown) in place of the
    plain one."""
    found = (measured.get("_sequential") or {}).get(f"{path}|{ratio}")
    if found:
        entry.setdefault("intervals", {})[ratio] = found
        entry[ratio] = found["value"]


def _machine() -> dict[str, Any]:
    from verm_local.hardware import probe

    hw = probe(with_torch=False)
    return {
        "cpu": hw.cpu_model,
        "threads": hw.cores_logical,
        "ram_gb": round(hw.ram_total / 1e9, 1),
        "cuda": [g.name for g in hw.cuda],
    }
