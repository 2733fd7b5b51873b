"""`verm-local bench latency`: per-stage latency and memory per model, side by side with
llama.cpp's own multimodal path on the same files, and a CI gate against a stored run.

Each model is measured in its own process (so peak RSS is that model's): load, then a
warm-up judgement, then --repeat judgements of the same pair; median and spread per
stage. For GGUF models a second process times llama-cpp-python's stock multimodal chat
path (MTMDChatHandler, the same images, prompt and JSON schema, greedy), so the report's
`overhead_ratio` = verm-local end-to-end / stock end-to-end is measured in one run.
Time to first token is vision + prefill + one mean decode step. With --predictions N, N
predictions against one ground truth are judged one at a time and as one batch, each in a
process of its own (greedy, or --rl-sampling), and `shared_ratio` = batched / independent."""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from verm_local.errors import VermError

STAGES = ("load_s", "vision_s", "text_prefill_s", "ttft_s", "decode_tok_s", "e2e_s")


def _peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _peak_gpu() -> int | None:
    if "torch" not in sys.modules:
        return None
    torch = sys.modules["torch"]
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _judge_once(judge: Any, gt: Any, pred: Any, task: str, sampling: Any) -> Any:
    """One judgement's raw generation. An answer cut at max_tokens (random weights ramble)
    still cost its tokens, so it counts; any other failure is raised."""
    from verm_local.errors import AnswerError

    try:
        judge.judge(gt, pred, task, sampling=sampling)
    except AnswerError:
        if judge.last_generation.finish_reason != "length":
            raise
    return judge.last_generation


def measure_verm(model: str, gt: str, pred: str, task: str, repeat: int, threads: int | None,
                 image_tokens: int, max_tokens: int) -> dict[str, Any]:
    from verm_local.backends.base import Sampling
    from verm_local.judge import Judge

    t0 = time.perf_counter()
    judge = Judge(model, threads=threads, image_token_budget=image_tokens, max_tokens=max_tokens)
    load_wall = time.perf_counter() - t0
    images = [judge.prepare(gt), judge.prepare(pred)]
    sampling = Sampling(max_tokens=max_tokens)
    _judge_once(judge, *images, task, sampling)  # warm-up
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        gen = _judge_once(judge, *images, task, sampling)
        e2e = time.perf_counter() - t
        n = max(1, gen.completion_tokens)
        runs.append({"vision_s": gen.vision_s, "text_prefill_s": gen.prefill_s - gen.vision_s,
                     "ttft_s": gen.prefill_s + gen.decode_s / n,
                     "decode_tok_s": n / gen.decode_s if gen.decode_s else 0.0,
                     "e2e_s": e2e, "completion_tokens": gen.completion_tokens,
                     "prompt_tokens": gen.prompt_tokens, "cut": gen.finish_reason == "length"})
    info = judge.backend.info.model_dump()
    judge.close()
    return {"model": info, "load_s": load_wall, "runs": runs, "peak_rss": _peak_rss(),
            "peak_gpu": _peak_gpu()}


def measure_stock(model: str, gt: str, pred: str, task: str, repeat: int, threads: int | None,
                  image_tokens: int, max_tokens: int) -> dict[str, Any]:
    """llama-cpp-python's own multimodal path: Llama + MTMDChatHandler + response_format."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from verm_local.images import load_image
    from verm_local.judge import context_size
    from verm_local.modelref import resolve_model
    from verm_local.prompts import load_prompt
    from verm_local.schema import answer_schema, MAX_ERRORS

    resolved = resolve_model(model)
    if resolved.format != "gguf":
        raise VermError(f"{model}: llama.cpp's own path needs a GGUF model")

    def data_url(path: str) -> str:
        buf = io.BytesIO()
        load_image(path, token_budget=image_tokens).image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    t0 = time.perf_counter()
    handler = MTMDChatHandler(clip_model_path=str(resolved.mmproj), verbose=False)
    llama = Llama(model_path=str(resolved.path), chat_handler=handler, verbose=False,
                  n_ctx=context_size(image_tokens, max_tokens), n_threads=threads,
                  n_gpu_layers=0, seed=0)
    load_s = time.perf_counter() - t0
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(gt)}},
        {"type": "image_url", "image_url": {"url": data_url(pred)}},
        {"type": "text", "text": load_prompt(task, None)}]}]
    fmt = {"type": "json_object", "schema": answer_schema(task, MAX_ERRORS)}

    def once() -> tuple[float, int]:
        t = time.perf_counter()
        out = llama.create_chat_completion(messages=messages, response_format=fmt,
                                           temperature=0.0, max_tokens=max_tokens)
        return time.perf_counter() - t, int(out["usage"]["completion_tokens"])

    once()  # warm-up
    runs = [dict(zip(("e2e_s", "completion_tokens"), once())) for _ in range(repeat)]
    return {"load_s": load_s, "runs": runs, "peak_rss": _peak_rss(), "peak_gpu": None}


def _variants(pred: str, n: int, image_tokens: int) -> list[Any]:
    """N distinct predictions from PRED: each with a small box drawn at its own place."""
    from PIL import ImageDraw

    from verm_local.images import load_image

    out = []
    for i in range(n):
        img = load_image(pred, token_budget=image_tokens)
        w, h = img.image.size
        d = ImageDraw.Draw(img.image)
        x, y = (i * 37) % max(w - 24, 1), (i * 53) % max(h - 24, 1)
        d.rectangle([x, y, x + 20, y + 20], fill=((i * 70) % 256, 40, 200 - i * 20 % 200))
        out.append(img)
    return out


def _shared_setup(pred: str, gt: str, predictions: int, image_tokens: int
                  ) -> tuple[list[Any], list[Any]]:
    return _variants(pred, predictions, image_tokens), _variants(gt, 2, image_tokens)


def _sampling(max_tokens: int, rl: bool) -> Any:
    """Greedy, or the authors' RL sampling (seeded, so both runs draw alike)."""
    from verm_local.backends.base import Sampling

    return Sampling.rl(max_tokens) if rl else Sampling(max_tokens=max_tokens)


def measure_independent(model: str, gt: str, pred: str, task: str, repeat: int,
                        threads: int | None, image_tokens: int, max_tokens: int,
                        predictions: int = 8, rl: bool = False) -> dict[str, Any]:
    """N predictions against one ground truth as N independent judge calls (one model, one
    request at a time), after a warm-up on other images; best of `repeat`."""
    from verm_local.judge import Judge

    preds, warm = _shared_setup(pred, gt, predictions, image_tokens)
    sampling = _sampling(max_tokens, rl)

    with Judge(model, threads=threads, image_token_budget=image_tokens,
               max_tokens=max_tokens) as j:
        gt_img = j.prepare(gt)
        _judge_once(j, warm[0], warm[1], task, sampling)
        runs = []
        for _ in range(repeat):
            t, tokens, decode_s = time.perf_counter(), 0, 0.0
            for p in preds:
                g = _judge_once(j, gt_img, p, task, sampling)
                tokens += g.completion_tokens
                decode_s += g.decode_s
            runs.append({"s": time.perf_counter() - t, "tokens": tokens, "decode_s": decode_s})
    return min(runs, key=lambda r: r["s"])


def measure_batched(model: str, gt: str, pred: str, task: str, repeat: int,
                    threads: int | None, image_tokens: int, max_tokens: int,
                    predictions: int = 8, rl: bool = False) -> dict[str, Any]:
    """The same N predictions as one `judge_many` batch (ground truth encoded once, answers
    decoded together), after a warm-up on other images; best of `repeat`. The ground
    truth's cached prefix is dropped before each run, so each run evaluates it once."""
    from verm_local.judge import Judge

    preds, warm = _shared_setup(pred, gt, predictions, image_tokens)
    sampling = _sampling(max_tokens, rl)
    with Judge(model, threads=threads, image_token_budget=image_tokens, max_tokens=max_tokens,
               parallel=predictions, prefix_cache=1) as j:
        gt_img = j.prepare(gt)
        j.judge_many([(warm[0], warm[1], task)])
        engine = j.backend.batch
        runs = []
        for _ in range(repeat):
            engine.reset()
            t = time.perf_counter()
            res = j.judge_many([(gt_img, p, task) for p in preds], sampling=sampling)
            runs.append({"s": time.perf_counter() - t, "tokens": engine.last_tokens,
                         "decode_s": engine.last_decode_s,
                         "failed": sum(isinstance(r, Exception) for r in res)})
    return min(runs, key=lambda r: r["s"])


def shared_summary(ind: dict[str, Any], bat: dict[str, Any], predictions: int,
                   rl: bool = False) -> dict[str, Any]:
    """The ratio, and where it comes from: the prompts' evaluation (vision, prefill; the
    ground truth's share is what reuse saves) and the decode rate (what batching buys:
    on a GPU an N-row step costs about one row's; on a small CPU about N rows')."""

    def rate(r: dict[str, Any]) -> float:
        return r["tokens"] / r["decode_s"] if r["decode_s"] > 0 else 0.0

    out = {"predictions": predictions, "sampling": "rl" if rl else "greedy",
           "independent_s": ind["s"], "batched_s": bat["s"],
           "ratio": bat["s"] / ind["s"], "independent_tokens": ind["tokens"],
           "batched_tokens": bat["tokens"], "failed": bat["failed"],
           "ratio_per_token": (bat["s"] / max(bat["tokens"], 1))
           / (ind["s"] / max(ind["tokens"], 1)),
           "independent_prompt_s": ind["s"] - ind["decode_s"],
           "batched_prompt_s": bat["s"] - bat["decode_s"],
           "independent_decode_tok_s": rate(ind), "batched_decode_tok_s": rate(bat)}
    out["prompt_ratio"] = out["batched_prompt_s"] / out["independent_prompt_s"]
    out["decode_speedup"] = (out["batched_decode_tok_s"] / out["independent_decode_tok_s"]
                             if out["independent_decode_tok_s"] else 0.0)
    return out


def _worker(kind: str, model: str, args: dict[str, Any]) -> dict[str, Any]:
    """Measure in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "verm_local.benchmarks.latency", kind, model,
           json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise VermError(f"latency worker for {model} ({kind}) failed: {tail[0]}")
    return json.loads(lines[-1])


def summarize_model(verm: dict[str, Any], stock: dict[str, Any] | None) -> dict[str, Any]:
    runs = verm["runs"]
    out: dict[str, Any] = {"model": verm["model"], "load_s": verm["load_s"],
                           "peak_rss": verm["peak_rss"], "peak_gpu": verm["peak_gpu"],
                           "completion_tokens": runs[-1]["completion_tokens"],
                           "prompt_tokens": runs[-1]["prompt_tokens"],
                           "cut_runs": sum(bool(r.get("cut")) for r in runs)}
    for key in STAGES[1:]:
        out[key] = _spread([r[key] for r in runs])
    if stock is not None:
        e2e = [r["e2e_s"] for r in stock["runs"]]
        out["llamacpp"] = {"load_s": stock["load_s"], "e2e_s": _spread(e2e),
                           "completion_tokens": stock["runs"][-1]["completion_tokens"],
                           "peak_rss": stock["peak_rss"]}
        out["overhead_ratio"] = out["e2e_s"]["median"] / statistics.median(e2e)
    return out


def run_latency(models: list[str], gt: str, pred: str, *, task: str = "chart", repeat: int = 3,
                threads: int | None = None, image_tokens: int = 1024, max_tokens: int = 1024,
                stock: bool = True, out: str | Path | None = None,
                predictions: int = 0, rl_sampling: bool = False) -> dict[str, Any]:
    from verm_local.modelref import resolve_model

    from .agreement import model_path

    args = {"gt": str(gt), "pred": str(pred), "task": task, "repeat": repeat,
            "threads": threads, "image_tokens": image_tokens, "max_tokens": max_tokens}
    report: dict[str, Any] = {"settings": args, "machine": _machine(), "models": {}}
    for name in models:
        path = model_path(name)
        print(f"latency: {name} ...", file=sys.stderr, flush=True)
        verm = _worker("verm", path, args)
        own = None
        if stock and resolve_model(path).format == "gguf":
            print(f"latency: {name} through llama.cpp's own path ...", file=sys.stderr, flush=True)
            own = _worker("stock", path, args)
        report["models"][name] = summarize_model(verm, own)
        if predictions > 1 and resolve_model(path).format == "gguf":
            print(f"latency: {name}: {predictions} predictions vs one ground truth, independent "
                  "and batched ...", file=sys.stderr, flush=True)
            extra = {**args, "predictions": predictions, "rl": rl_sampling}
            shared = shared_summary(_worker("independent", path, extra),
                                    _worker("batched", path, extra), predictions, rl_sampling)
            report["models"][name]["shared_prefix"] = shared
            report["models"][name]["shared_ratio"] = shared["ratio"]
    first = next(iter(report["models"].values()))["e2e_s"]["median"]
    for m in report["models"].values():
        m["relative_e2e"] = m["e2e_s"]["median"] / first
    if out:
        write_reports(report, Path(out))
    return report


def _machine() -> dict[str, Any]:
    from verm_local.hardware import probe

    hw = probe(with_torch=False)
    return {"cpu": hw.cpu_model, "threads": hw.cores_logical, "ram_gb": round(hw.ram_total / 1e9, 1),
            "cuda": [g.name for g in hw.cuda]}


def compare(report: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> list[str]:
    """Regressions of machine-independent ratios beyond the tolerance: each model's
    overhead against llama.cpp's own path, and its end-to-end time relative to the
    first model of the run."""
    found = []
    for name, cur in report["models"].items():
        old = baseline.get("models", {}).get(name)
        if old is None:
            continue
        for key in ("overhead_ratio", "relative_e2e", "shared_ratio"):
            if key in cur and key in old and old[key] > 0:
                change = cur[key] / old[key] - 1
                if change > tolerance:
                    found.append(f"{name}: {key} {cur[key]:.3f} vs baseline {old[key]:.3f} "
                                 f"(+{change:.0%} > {tolerance:.0%})")
    return found


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# Latency ({m['cpu']}, {m['threads']} threads; median of "
             f"{report['settings']['repeat']} after a warm-up)", "",
             "| model | load s | vision s | text prefill s | TTFT s | decode tok/s | "
             "end-to-end s | peak RSS MB | llama.cpp own path s | overhead ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        own = r.get("llamacpp")
        e2e = r["e2e_s"]
        row = (f"| {name} ({r['model']['quant']}) | {r['load_s']:.2f} | "
               f"{r['vision_s']['median']:.3f} | {r['text_prefill_s']['median']:.3f} | "
               f"{r['ttft_s']['median']:.3f} | {r['decode_tok_s']['median']:.1f} | ")
        if own:
            row += (f"{e2e['median']:.2f} ({e2e['min']:.2f}-{e2e['max']:.2f}) | "
                    f"{r['peak_rss'] / 1e6:.0f} | {own['e2e_s']['median']:.2f} "
                    f"({own['completion_tokens']} tok) | {r['overhead_ratio']:.2f} |")
        else:
            row += f"{e2e['median']:.2f} | {r['peak_rss'] / 1e6:.0f} | n/a | n/a |"
        lines.append(row)
    cut = [f"{n} ({r['cut_runs']} of {report['settings']['repeat']})"
           for n, r in report["models"].items() if r.get("cut_runs")]
    if cut:
        lines += ["", f"Answers cut at --max-tokens {report['settings']['max_tokens']} (timed "
                  f"as generated; random weights ramble): {', '.join(cut)}."]
    shared = {n: r["shared_prefix"] for n, r in report["models"].items() if r.get("shared_prefix")}
    if shared:
        how = next(iter(shared.values())).get("sampling", "greedy")
        lines += ["", "N predictions against one ground truth (best of "
                  f"{report['settings']['repeat']}, {how} decoding): independent judge calls "
                  "vs one batch (ground truth encoded once, answers decoded together):", "",
                  "| model | N | independent s (tokens) | batched s (tokens) | ratio | "
                  "ratio per generated token | prompts s, independent -> batched | "
                  "decode tok/s, alone -> batched |", "|---|---|---|---|---|---|---|---|"]
        for n, sp in shared.items():
            lines.append(f"| {n} | {sp['predictions']} | {sp['independent_s']:.2f} "
                         f"({sp['independent_tokens']}) | {sp['batched_s']:.2f} "
                         f"({sp['batched_tokens']}) | {sp['ratio']:.2f} | "
                         f"{sp['ratio_per_token']:.2f} | {sp['independent_prompt_s']:.2f} -> "
                         f"{sp['batched_prompt_s']:.2f} ({sp['prompt_ratio']:.2f}x) | "
                         f"{sp['independent_decode_tok_s']:.1f} -> "
                         f"{sp['batched_decode_tok_s']:.1f} ({sp['decode_speedup']:.2f}x) |")
        lines += ["", "Prompts: vision, prefill and parsing, everything but decoding (reuse "
                  "evaluates the ground truth once). Decode: generated tokens per second of "
                  "the decode loops (batching runs the N answers in one step each)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Stacked bars per model: vision, text prefill, decode; a mark at llama.cpp's own path.
    With a shared-prefix run, a second panel: N independent calls against one batch, each
    split into prompts and decoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    shared = [n for n in names if report["models"][n].get("shared_prefix")]
    rows = [len(names)] + ([2 * len(shared)] if shared else [])
    fig, axes = plt.subplots(len(rows), 1, squeeze=False, height_ratios=rows,
                             figsize=(8, 1.6 + 0.6 * sum(rows)))
    ax = axes[0][0]
    for i, n in enumerate(names):
        r = report["models"][n]
        vision, text = r["vision_s"]["median"], r["text_prefill_s"]["median"]
        decode = r["e2e_s"]["median"] - vision - text
        _stack(ax, i, ((vision, "vision", "#1f77b4"), (text, "text prefill", "#ff7f0e"),
                       (decode, "decode + parse", "#2ca02c")), labels=i == 0)
        if r.get("llamacpp"):
            ax.plot(r["llamacpp"]["e2e_s"]["median"], i, "k|", markersize=22,
                    label="llama.cpp own path" if i == 0 else None)
    ax.set_yticks(range(len(names)), [Path(n).name for n in names])
    ax.set_xlabel("seconds per judgement (median)")
    ax.legend(loc="best", fontsize=8)
    if shared:
        ax = axes[1][0]
        ticks = []
        for i, n in enumerate(shared):
            sp = report["models"][n]["shared_prefix"]
            for k, kind in enumerate(("independent", "batched")):
                y = 2 * i + k
                total, prompt = sp[f"{kind}_s"], sp[f"{kind}_prompt_s"]
                _stack(ax, y, ((prompt, "prompts (vision, prefill, parse)", "#9467bd"),
                               (total - prompt, "decode", "#2ca02c")), labels=y == 0)
                ticks.append(f"{Path(n).name}: {kind}")
            ax.text(sp["batched_s"], 2 * i + 1, f"  {sp['ratio']:.2f}x", va="center",
                    fontsize=8)
        ax.set_yticks(range(len(ticks)), ticks)
        ax.set_xlabel(f"seconds for {report['models'][shared[0]]['shared_prefix']['predictions']}"
                      " predictions against one ground truth (best run)")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _stack(ax: Any, y: int, parts: tuple, labels: bool) -> None:
    left = 0.0
    for value, label, colour in parts:
        ax.barh(y, value, left=left, color=colour, label=label if labels else None)
        left += value


def write_reports(report: dict[str, Any], out: Path) -> Path:
    """`out` is the JSON file (FILE.json; FILE.md and FILE.png beside it) or a directory
    (latency.json, .md, .png in it). Returns the JSON path."""
    from verm_local.fileio import write_json_atomic

    json_path = out if out.suffix == ".json" else out / "latency.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, report)
    json_path.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    plot(report, json_path.with_suffix(".png"))
    return json_path


def _main(argv: list[str]) -> None:
    kind, model, raw = argv
    args = json.loads(raw)
    fn = {"verm": measure_verm, "stock": measure_stock, "independent": measure_independent,
          "batched": measure_batched}[kind]
    extra = ({"predictions": args["predictions"], "rl": args.get("rl", False)}
             if "predictions" in args else {})
    from verm_local.cli import stdout_to_stderr

    with stdout_to_stderr():
        result = fn(model, args["gt"], args["pred"], args["task"], args["repeat"],
                    args["threads"], args["image_tokens"], args["max_tokens"], **extra)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main(sys.argv[1:])
