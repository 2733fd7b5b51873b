"""`verm-local bench agreement`: what each quantized form loses against the reference.

1. The reference judges every item once (greedy). Its answer tokens, with the reference's
   top-k log-probs and tail mass at each, are cached with a manifest (model, data, seed,
   top-k, vocabulary) so later runs reuse them.
2. Each candidate is teacher-forced on those tokens (KL per token, top-1 agreement) and
   judges every item itself (error-set F1 against the reference, severity-sum
   correlations, reward differences, count agreement, JSON validity).
3. Where the data has human labels: F1 and severity Pearson per category for the reference
   and each candidate; agreement loss = reference minus candidate.
Outputs under --out: agreement.json, agreement.md, agreement.png, and
results/<model>.jsonl (VC-RewardBench style: id, category, pred_json)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from verm_local.constants import CATEGORIES, TASKS
from verm_local.errors import AnswerError, InputError, ModelError
from verm_local.fileio import write_json_atomic

from . import metrics
from .data import Item, data_digest, load_items
from .kld import summarize
from .markdown import table_head

log = logging.getLogger(__name__)

VOCAB_PROBE = (
    '{"errors": [{"category": "data_error", "severity": 2}]} 0123456789 Ünïcödé 中文 表格 end.'
)
CACHE_VERSION = 2  # 2: the task profiles' requests


def model_path(name: str) -> str:
    """A catalog variant in the store, or a path as `judge --model` takes it."""
    from verm_local.catalog import CATALOG
    from verm_local.paths import installed

    if name in CATALOG:
        path = installed(name)
        if path is None:
            raise ModelError(f"{name} is not in the store; run: verm-local pull {name}")
        return str(path)
    if not Path(name).exists():
        raise ModelError(f"{name}: not a variant name or an existing path")
    return name


def model_size(judge: Any) -> int:
    """Bytes of weights on disk (text model + vision encoder, or the checkpoint)."""
    return sum(f.stat().st_size for f in judge.backend.weight_files())


def _vision_label(judge: Any) -> str:
    """The vision path a judge ran: mmproj, the ONNX file and its execution provider, or
    the checkpoint's own tower."""
    return judge.backend.info.vision


def _progress(label: str, i: int, n: int, t0: float) -> None:
    log.info("%s: %d/%d items, %.0f s", label, i, n, time.perf_counter() - t0)


def _judge_item(
    judge: Any, item: Item, free: bool, max_tokens: int | None, max_errors: int | None
) -> dict[str, Any]:
    """One judgement with the task's own request and decoding (greedy for judging)."""
    try:
        j = judge.judge(
            item.gt,
            item.pred,
            item.task,
            free=free,
            max_errors=max_errors,
            sampling=judge.sampling(item.task),
        )
    except AnswerError as exc:
        text = judge.last_generation
        return {
            "valid": False,
            "errors": [],
            "total_severity": 0,
            "score": None,
            "text": text.text if text else "",
            "problem": str(exc),
        }
    if not j.complete:
        return {
            "valid": False,
            "errors": [],
            "total_severity": 0,
            "score": None,
            "text": judge.last_generation.text,
            "problem": j.problem,
        }
    return {
        "valid": True,
        "errors": [e.model_dump() for e in j.errors],
        "total_severity": j.total_severity,
        "score": j.reward,
        "text": judge.last_generation.text,
        "answer": j.model_dump(mode="json"),
    }


def _forced_logprobs(judge: Any, item: Item, tokens: list[int]) -> Any:
    """Log-probs of a forced answer after the task's exact request for the item."""
    req = judge.request(item.gt, item.pred, item.task).request
    return judge.backend.answer_logprobs(req.images, req.messages, tokens)


VISIONS = ("gguf", "onnx", "onnx-fp32", "onnx-fp16", "onnx-int8")


def split_vision(name: str) -> tuple[str, str]:
    """`MODEL#VISION` -> (MODEL, VISION): which vision path a candidate runs with.

    VISION is `gguf` (llama.cpp's mmproj, the default), `onnx` (the tower kept in
    <model>/onnx at its best precision) or `onnx-fp32|fp16|int8`."""
    model, sep, vision = name.rpartition("#")
    if not sep:
        return name, "gguf"
    if vision not in VISIONS:
        raise InputError(
            f"{name}: unknown vision path {vision!r}; use one of " + ", ".join(VISIONS)
        )
    return model, vision


def _open(
    path: str,
    image_tokens: int | None,
    max_tokens: int | None,
    threads: int | None,
    vision: str = "gguf",
) -> Any:
    from verm_local.judge import Judge

    mode, _, precision = vision.partition("-")
    return Judge(
        path,
        image_tokens=image_tokens,
        max_tokens=max_tokens,
        threads=threads,
        vision=mode,
        vision_precision=precision or None,
    )


def reference_pass(
    ref: str,
    items: list[Item],
    cache: Path,
    *,
    free: bool,
    top_k: int,
    seed: int,
    image_tokens: int | None,
    max_tokens: int | None,
    threads: int | None,
    max_errors: int | None = None,
) -> dict[str, Any]:
    """Run (or reuse) the reference: judgements, answer tokens, top-k log-probs."""
    from verm_local.modelref import resolve_model
    from verm_local.prompts import trained_prompts

    prompts = hashlib.sha256(json.dumps(trained_prompts(), sort_keys=True).encode()).hexdigest()
    key = {
        "version": CACHE_VERSION,
        "prompts_sha256": prompts,
        "model_sha256": resolve_model(ref).sha256,
        "data_sha256": data_digest(items),
        "seed": seed,
        "top_k": top_k,
        "free": free,
        "image_tokens": image_tokens,
        "max_tokens": max_tokens,
        "max_errors": max_errors,
    }
    manifest_path = cache / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("key") == key:
            log.info("reference: reusing the cache in %s", cache)
            arrays = np.load(cache / "topk.npz")
            for i, row in enumerate(old["items"]):
                row["topk_ids"] = arrays[f"ids{i}"]
                row["topk_lp"] = arrays[f"lp{i}"]
                row["tail"] = arrays[f"tail{i}"]
            return old
    t0 = time.perf_counter()
    rows, arrays = [], {}
    with _open(ref, image_tokens, max_tokens, threads) as judge:
        vocab = judge.backend.answer_tokens(VOCAB_PROBE)
        for i, item in enumerate(items):
            out = _judge_item(judge, item, free, max_tokens, max_errors)
            tokens = judge.backend.answer_tokens(out["text"])
            lp = _forced_logprobs(judge, item, tokens)
            ids, top, tail = metrics.topk_cache(lp, top_k)
            arrays.update({f"ids{i}": ids, f"lp{i}": top, f"tail{i}": tail})
            rows.append({**out, "id": item.id, "tokens": tokens})
            _progress("reference", i + 1, len(items), t0)
        info = judge.backend.info.model_dump()
        size = model_size(judge)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache / "topk.npz", **arrays)
    result = {"key": key, "model": info, "size_bytes": size, "vocab_probe": vocab, "items": rows}
    write_json_atomic(manifest_path, result)
    for i, row in enumerate(rows):
        row.update(topk_ids=arrays[f"ids{i}"], topk_lp=arrays[f"lp{i}"], tail=arrays[f"tail{i}"])
    return result


def candidate_pass(
    path: str,
    items: list[Item],
    ref: dict[str, Any],
    *,
    free: bool,
    image_tokens: int | None,
    max_tokens: int | None,
    threads: int | None,
    label: str,
    max_errors: int | None = None,
    vision: str = "gguf",
) -> dict[str, Any]:
    t0 = time.perf_counter()
    kls, top1, rows = [], [], []
    with _open(path, image_tokens, max_tokens, threads, vision) as judge:
        if judge.backend.answer_tokens(VOCAB_PROBE) != ref["vocab_probe"]:
            raise InputError(
                f"{path}: its vocabulary differs from the reference's; token-level "
                "agreement needs one tokenizer"
            )
        for i, (item, r) in enumerate(zip(items, ref["items"])):
            lp = _forced_logprobs(judge, item, r["tokens"])
            kls.append(metrics.kl_from_topk(r["topk_ids"], r["topk_lp"], r["tail"], lp))
            top1.append(np.argmax(lp, axis=1) == r["topk_ids"][:, 0])
            rows.append({**_judge_item(judge, item, free, max_tokens, max_errors), "id": item.id})
            _progress(label, i + 1, len(items), t0)
        info = judge.backend.info.model_dump()
        info["vision"] = _vision_label(judge)
        size = model_size(judge)
    kl = np.concatenate(kls)
    # How much of the reference's mass the cached top-k holds: the KL is exact on it and
    # lumps the rest into one bucket (a lower bound; near 1 for a trained, peaked judge,
    # far below 1 for the random tiny model).
    mass = float(np.mean(np.concatenate([1 - r["tail"] for r in ref["items"]])))
    return {
        "model": info,
        "size_bytes": size,
        "items": rows,
        "token": {
            **summarize(kl),
            "top1_agreement": float(np.mean(np.concatenate(top1))),
            "ref_topk_mass": mass,
        },
    }


def judgement_agreement(
    cand: list[dict], ref: list[dict], items: list[Item], scorer: metrics.Scorer
) -> dict[str, Any]:
    s_c = [metrics.severity_sum(c["errors"]) for c in cand]
    s_r = [metrics.severity_sum(r["errors"]) for r in ref]
    rewards = [
        (c["score"], r["score"])
        for c, r in zip(cand, ref)
        if c["score"] is not None and r["score"] is not None
    ]
    counts = {}
    for task in TASKS:
        idx = [i for i, it in enumerate(items) if it.task == task]
        if idx:
            counts[task] = metrics.count_agreement(
                [cand[i]["errors"] for i in idx], [ref[i]["errors"] for i in idx], CATEGORIES[task]
            )
    return {
        **metrics.set_f1([(c["errors"], r["errors"]) for c, r in zip(cand, ref)], scorer),
        "severity_pearson": metrics.finite(metrics.pearson(s_c, s_r)),
        "severity_spearman": metrics.finite(metrics.spearman(s_c, s_r)),
        "reward_mae": float(np.mean([abs(a - b) for a, b in rewards])) if rewards else None,
        "count_agreement": counts,
        "json_valid_rate": float(np.mean([c["valid"] for c in cand])),
    }


def human_agreement(rows: list[dict], items: list[Item], scorer: metrics.Scorer) -> dict[str, Any]:
    """Per task (category of the benchmark) and overall: F1 against the human labels and
    the Pearson correlation of severity sums."""
    out = {}
    groups = {t: [i for i, it in enumerate(items) if it.task == t] for t in TASKS}
    groups["overall"] = list(range(len(items)))
    for name, idx in groups.items():
        if not idx:
            continue
        pairs = [(rows[i]["errors"], items[i].human_errors) for i in idx]
        out[name] = {
            "f1": metrics.set_f1(pairs, scorer)["f1"],
            "severity_pearson": metrics.finite(
                metrics.pearson(
                    [metrics.severity_sum(p) for p, _ in pairs],
                    [metrics.severity_sum(g) for _, g in pairs],
                )
            ),
            "items": len(idx),
        }
    return out


def _loss(ref: dict, cand: dict) -> dict[str, Any]:
    out = {}
    for group, r in ref.items():
        c = cand.get(group, {})
        out[group] = {
            k: (None if r.get(k) is None or c.get(k) is None else r[k] - c[k])
            for k in ("f1", "severity_pearson")
        }
    return out


def run_agreement(
    reference: str,
    candidates: list[str],
    data: str,
    *,
    limit: int | None = None,
    out: str | Path = "bench-agreement",
    free: bool = False,
    matcher_url: str | None = None,
    matcher_model: str = "default",
    top_k: int = 32,
    seed: int = 0,
    image_tokens: int | None = None,
    max_tokens: int | None = None,
    threads: int | None = None,
    max_errors: int | None = None,
) -> dict[str, Any]:
    out = Path(out)
    items = load_items(data, limit)
    if not items:
        raise InputError(f"{data}: no items")
    scorer = metrics.credit_matrix
    if matcher_url:
        from .matcher import EndpointMatcher

        scorer = EndpointMatcher(matcher_url, matcher_model)
    ref_path = model_path(reference)
    ref = reference_pass(
        ref_path,
        items,
        out / "reference",
        free=free,
        top_k=top_k,
        seed=seed,
        image_tokens=image_tokens,
        max_tokens=max_tokens,
        threads=threads,
        max_errors=max_errors,
    )
    has_labels = any(it.human_errors for it in items)
    ref_human = human_agreement(ref["items"], items, scorer) if has_labels else None
    report: dict[str, Any] = {
        "data": {"source": str(data), "items": len(items), "sha256": ref["key"]["data_sha256"]},
        "settings": {
            "free": free,
            "top_k": top_k,
            "seed": seed,
            "image_tokens": image_tokens,
            "max_tokens": max_tokens,
            "max_errors": max_errors,
            "matcher": matcher_url or "lexical",
        },
        "reference": {
            "name": reference,
            "model": ref["model"],
            "size_bytes": ref["size_bytes"],
            "human": ref_human,
            "json_valid_rate": float(np.mean([r["valid"] for r in ref["items"]])),
        },
        "candidates": {},
    }
    _write_results(out, reference, items, ref["items"])
    for name in candidates:
        path, vision = split_vision(name)
        c = candidate_pass(
            model_path(path),
            items,
            ref,
            free=free,
            image_tokens=image_tokens,
            max_tokens=max_tokens,
            threads=threads,
            label=name,
            max_errors=max_errors,
            vision=vision,
        )
        entry = {
            "model": c["model"],
            "size_bytes": c["size_bytes"],
            "token": c["token"],
            "judgement": judgement_agreement(c["items"], ref["items"], items, scorer),
        }
        if has_labels:
            entry["human"] = human_agreement(c["items"], items, scorer)
            entry["human_loss"] = _loss(ref_human, entry["human"])
        report["candidates"][name] = entry
        _write_results(out, name, items, c["items"])
        report.setdefault("items", {})[name] = [
            {
                "id": r["id"],
                "valid": r["valid"],
                "total_severity": r["total_severity"],
                "ref_total_severity": rr["total_severity"],
                "score": r["score"],
                "ref_score": rr["score"],
            }
            for r, rr in zip(c["items"], ref["items"])
        ]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "agreement.json", report)
    (out / "agreement.md").write_text(markdown(report), encoding="utf-8")
    plot(report, out / "agreement.png")
    return report


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[-80:]


def _write_results(out: Path, name: str, items: list[Item], rows: list[dict]) -> None:
    """VC-RewardBench-style predictions: one row per item with the judge's JSON answer."""
    (out / "results").mkdir(parents=True, exist_ok=True)
    with open(out / "results" / f"{_safe(name)}.jsonl", "w", encoding="utf-8") as f:
        for item, row in zip(items, rows):
            f.write(
                json.dumps(
                    {
                        "id": item.id,
                        "category": item.task,
                        "pred_json": row.get("answer") or {"errors": row["errors"]},
                        "valid": row["valid"],
                    }
                )
                + "\n"
            )


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    ref = report["reference"]
    lines = [
        f"# Agreement with the reference `{ref['name']}` ({ref['model']['quant']})",
        "",
        f"{report['data']['items']} items from `{report['data']['source']}`; matcher: "
        f"{report['settings']['matcher']}; KL on the reference's top-"
        f"{report['settings']['top_k'] or 'all'} + tail (mass covered: "
        f"{next(iter(report['candidates'].values()))['token']['ref_topk_mass']:.3f})."
        if report["candidates"]
        else "",
        "",
        *table_head(
            "model (quant, vision)",
            "size MB",
            "mean KL/token",
            "p95 KL",
            "top-1",
            "F1 vs ref",
            "severity r",
            "reward MAE",
            "JSON valid",
            "F1 loss vs human",
        ),
    ]
    for name, c in report["candidates"].items():
        t, j = c["token"], c["judgement"]
        loss = (c.get("human_loss") or {}).get("overall", {}).get("f1")
        vision = c["model"].get("vision", "mmproj")
        lines.append(
            f"| {name} ({c['model']['quant']}, {vision}) | {c['size_bytes'] / 1e6:.1f} | "
            f"{t['mean']:.3g} ± {t['stderr']:.1g} | {t['p95']:.3g} | "
            f"{t['top1_agreement']:.3f} | {j['f1']:.3f} | "
            f"{_fmt(j['severity_pearson'])} | {_fmt(j['reward_mae'])} | "
            f"{j['json_valid_rate']:.2f} | {_fmt(loss)} |"
        )
    if ref.get("human"):
        lines += [
            "",
            "Reference against the human labels:",
            "",
            *table_head("group", "items", "F1", "severity r"),
        ]
        for g, h in ref["human"].items():
            lines.append(f"| {g} | {h['items']} | {h['f1']:.3f} | {_fmt(h['severity_pearson'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Model size vs agreement loss: mean KL per token and 1 - F1 against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["candidates"])
    sizes = [report["candidates"][n]["size_bytes"] / 1e6 for n in names]
    kl = [max(report["candidates"][n]["token"]["mean"], 1e-12) for n in names]
    f1_loss = [1 - report["candidates"][n]["judgement"]["f1"] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, ys, label in (
        (axes[0], kl, "mean KL per token (nats, log)"),
        (axes[1], f1_loss, "1 - error-set F1 vs reference"),
    ):
        ax.scatter(sizes, ys)
        for x, y, n in zip(sizes, ys, names):
            ax.annotate(Path(n).name, (x, y), fontsize=8)
        ax.set_xlabel("model size on disk (MB)")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    fig.suptitle(
        f"agreement with {report['reference']['model']['quant']} ({report['data']['items']} items)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
