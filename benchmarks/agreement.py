"""`verm-local bench agreement`: what each quantized form loses against the reference.

1. The reference judges every item once (greedy). Its answer tokens, with the reference's
   top-k log-probs and tail mass at each, are cached with a manifest (model, data, seed,
   top-k, vocabulary) so later runs reuse them.
2. Each candidate is teacher-forced on those tokens (KL per token, top-1 agreement) and
   judges every item itself; its discrepancies are scored against the reference's as
   labels with the authors' matcher and formulas (`score.py`: F1-hard, F1-soft, severity
   r), beside reward differences, count agreement and JSON validity.
3. Where the data has human labels: the authors' figures (per task and overall) for the
   reference and each candidate, and each candidate minus the reference with a 95% paired
   bootstrap interval over items, so a loss is told apart from noise.
Outputs under --out: agreement.json, agreement.md, agreement.png, and results/<model>.json
(the authors' evaluation input: the rows with pred_json; `bench score` scores it)."""

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
CACHE_VERSION = 3  # 2: the task profiles' requests; 3: int32 ids, the whole vocabulary in id order


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
    # Uncompressed: a whole-vocabulary cache (--top-k 0) took longer to compress than to
    # compute; a local cache's size matters less than its time.
    np.savez(cache / "topk.npz", **arrays)
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
        # Judged on the path `judge` takes: deterministic where the build allows it.
        info["deterministic"] = judge.backend.deterministic.on
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


def _label(e: dict[str, Any]) -> dict[str, Any]:
    """A judged error as a label (keyed `type`, as VC-RewardBench's labels are)."""
    return {
        "type": e.get("category"),
        "severity": e.get("severity"),
        "location": e.get("location", ""),
        "description": e.get("description", ""),
    }


def predicted_rows(items: list[Item], rows: list[dict], labels: Any = None) -> list[dict]:
    """The authors' evaluation input for one model: each item's row with the model's
    answer as `pred_json` (the trained format; null when unreadable). `labels`: other
    labels in place of the human ones (the reference's answers), None where there are
    none (that item is left out)."""
    from verm_local.answer import trained_answer
    from verm_local.tasks import profile

    out = []
    for i, (item, row) in enumerate(zip(items, rows)):
        base = dict(item.row or {"id": item.id, "category": item.task})
        base["category"] = item.task
        if labels is not None:
            if labels[i] is None:
                continue
            base["human_errors"] = labels[i]
        base["pred_json"] = (
            trained_answer(profile(item.task), row["errors"]) if row["valid"] else None
        )
        out.append(base)
    return out


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row.get("id"), row.get("idx")])


def scored(rows: list[dict], matcher: Any, workers: int) -> dict[str, Any]:
    """The authors' scoring of rows: summary, the paper's table, per-item results by key."""
    from .score import score_rows

    result = score_rows(rows, matcher, workers=workers)
    return {
        "summary": result["summary"],
        "table": result["table"],
        "failed": len(result["failed_items"]),
        "by_item": {_key(r): r for r in result["per_item_results"]},
    }


def compare(ref: dict[str, Any], cand: dict[str, Any], seed: int) -> dict[str, Any]:
    """Candidate minus reference on the items both have scored, with paired bootstrap
    intervals (`score.paired_difference`)."""
    from .score import paired_difference

    keys = [k for k in ref["by_item"] if k in cand["by_item"]]
    return paired_difference(
        [ref["by_item"][k] for k in keys], [cand["by_item"][k] for k in keys], seed=seed
    )


def _overall(s: dict[str, Any]) -> dict[str, Any]:
    """The paper's overall figures of a scoring (x100), items and failed."""
    row = next(r for r in s["table"] if r["group"] == "overall")
    return {
        k: metrics.finite(row[k]) for k in ("f1_hard", "f1_soft", "severity_r", "items", "failed")
    }


def judgement_agreement(
    cand: list[dict], ref: list[dict], items: list[Item], matcher: Any, workers: int
) -> dict[str, Any]:
    """A candidate against the reference's answers as labels: the authors' figures (the
    same matcher and formulas as against the human labels), reward differences, count
    agreement, JSON validity."""
    labels = [[_label(e) for e in r["errors"]] if r["valid"] else None for r in ref]
    vs_ref = scored(predicted_rows(items, cand, labels), matcher, workers)
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
        **_overall(vs_ref),
        "reward_mae": float(np.mean([abs(a - b) for a, b in rewards])) if rewards else None,
        "count_agreement": counts,
        "json_valid_rate": float(np.mean([c["valid"] for c in cand])),
    }


def run_agreement(
    reference: str,
    candidates: list[str],
    data: str,
    *,
    limit: int | None = None,
    out: str | Path = "bench-agreement",
    free: bool = False,
    matcher: Any = None,
    workers: int = 8,
    top_k: int = 32,
    seed: int = 0,
    image_tokens: int | None = None,
    max_tokens: int | None = None,
    threads: int | None = None,
    max_errors: int | None = None,
) -> dict[str, Any]:
    from .matcher import LexicalMatcher

    out = Path(out)
    items = load_items(data, limit)
    if not items:
        raise InputError(f"{data}: no items")
    matcher = matcher or LexicalMatcher()
    if not matcher.comparable:
        log.warning(
            "matching with the %s: the figures against the human labels are not comparable "
            "with the paper's (--matcher-url URL --matcher-model NAME for the authors' LLM "
            "matching)",
            "lexical matcher" if matcher.kind == "lexical" else "built-in matcher prompt",
        )
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
    ref_human = (
        scored(predicted_rows(items, ref["items"]), matcher, workers) if has_labels else None
    )
    report: dict[str, Any] = {
        "data": {"source": str(data), "items": len(items), "sha256": ref["key"]["data_sha256"]},
        "settings": {
            "free": free,
            "top_k": top_k,
            "seed": seed,
            "image_tokens": image_tokens,
            "max_tokens": max_tokens,
            "max_errors": max_errors,
            "matcher": matcher.describe(),
            "comparable": bool(matcher.comparable),
        },
        "reference": {
            "name": reference,
            "model": ref["model"],
            "size_bytes": ref["size_bytes"],
            "human": _human(ref_human),
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
            "judgement": judgement_agreement(c["items"], ref["items"], items, matcher, workers),
        }
        if ref_human is not None:
            human = scored(predicted_rows(items, c["items"]), matcher, workers)
            entry["human"] = _human(human)
            entry["human_loss"] = compare(ref_human, human, seed)
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
    from .score import json_safe

    write_json_atomic(out / "agreement.json", json_safe(report))
    (out / "agreement.md").write_text(markdown(report), encoding="utf-8")
    plot(report, out / "agreement.png")
    return report


def _human(s: dict[str, Any] | None) -> dict[str, Any] | None:
    """A model against the human labels: the paper's table (per task and overall, x100)
    and the authors' summary."""
    if s is None:
        return None
    return {"table": s["table"], "summary": s["summary"], "failed": s["failed"]}


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[-80:]


def _write_results(out: Path, name: str, items: list[Item], rows: list[dict]) -> None:
    """A model's predictions as the authors' evaluation reads them (`bench score` takes
    the file too): a JSON list of the rows with `pred_json`."""
    (out / "results").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results" / f"{_safe(name)}.json", predicted_rows(items, rows))


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    from .score import difference_line, markdown_table

    ref = report["reference"]
    settings = report["settings"]
    matcher = settings["matcher"]
    lines = [
        f"# Agreement with the reference `{ref['name']}` ({ref['model']['quant']})",
        "",
        f"{report['data']['items']} items from `{report['data']['source']}`; matcher: "
        f"{matcher.get('model') or matcher['kind']} ("
        + ("comparable with the paper" if settings["comparable"] else "comparable: false")
        + f"); KL on the reference's top-{settings['top_k'] or 'all'} + tail"
        + (
            f" (mass covered: "
            f"{next(iter(report['candidates'].values()))['token']['ref_topk_mass']:.3f})."
            if report["candidates"]
            else "."
        ),
        "",
        *table_head(
            "model (quant, vision)",
            "size MB",
            "mean KL/token",
            "p95 KL",
            "top-1",
            "F1-hard vs ref",
            "F1-soft vs ref",
            "severity r vs ref",
            "reward MAE",
            "JSON valid",
        ),
    ]
    for name, c in report["candidates"].items():
        t, j = c["token"], c["judgement"]
        vision = c["model"].get("vision", "mmproj")
        lines.append(
            f"| {name} ({c['model']['quant']}, {vision}) | {c['size_bytes'] / 1e6:.1f} | "
            f"{t['mean']:.3g} ± {t['stderr']:.1g} | {t['p95']:.3g} | "
            f"{t['top1_agreement']:.3f} | {_fmt(j['f1_hard'], '.1f')} | "
            f"{_fmt(j['f1_soft'], '.1f')} | {_fmt(j['severity_r'], '.1f')} | "
            f"{_fmt(j['reward_mae'])} | {j['json_valid_rate']:.2f} |"
        )
    if ref.get("human"):
        lines += [
            "",
            markdown_table(
                ref["human"]["table"], "## The reference against the human labels (x100)"
            ),
        ]
        for name, c in report["candidates"].items():
            lines += [
                markdown_table(c["human"]["table"], f"## {name} against the human labels (x100)")
            ]
        lines += [
            "## What each candidate loses against the reference (points; 95% paired bootstrap)",
            "",
            *(f"- {difference_line(n, c['human_loss'])}" for n, c in report["candidates"].items()),
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Model size vs agreement loss: mean KL per token and 100 - F1-hard against the
    reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["candidates"])
    sizes = [report["candidates"][n]["size_bytes"] / 1e6 for n in names]
    kl = [max(report["candidates"][n]["token"]["mean"], 1e-12) for n in names]
    f1_loss = [100 - (report["candidates"][n]["judgement"]["f1_hard"] or 0) for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, ys, label in (
        (axes[0], kl, "mean KL per token (nats, log)"),
        (axes[1], f1_loss, "100 - F1-hard vs reference"),
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
