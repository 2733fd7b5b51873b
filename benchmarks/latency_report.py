"""`bench latency`'s report: the Markdown tables (latency, memory, sweep, shared prefix,
repack) and the plot, written beside the JSON."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .markdown import table_head

log = logging.getLogger(__name__)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    rounds = next(
        (r["rounds"] for r in report["models"].values() if "rounds" in r),
        report["settings"]["repeat"],
    )
    lines = [
        f"# Latency ({m['cpu']}, {m['threads']} threads; median of {rounds} rounds after a "
        "warm-up)",
    ]
    if any("e2e_s" in r for r in report["models"].values()):
        lines += [
            "",
            *table_head(
                "model",
                "load s",
                "vision s",
                "text prefill s",
                "TTFT s",
                "decode tok/s",
                "end-to-end s",
                "llama.cpp own path s",
                "overhead ratio (95% interval)",
                "relative end-to-end (95% interval)",
            ),
        ]
    timed = [(n, r) for n, r in report["models"].items() if "e2e_s" in r]
    for name, r in timed:
        own = r.get("llamacpp")
        e2e = r["e2e_s"]
        ivs = r.get("intervals", {})
        row = (
            f"| {name} ({r['model']['quant']}) | {r['load_s']:.2f} | "
            f"{r['vision_s']['median']:.3f} | {r['text_prefill_s']['median']:.3f} | "
            f"{r['ttft_s']['median']:.3f} | {r['decode_tok_s']['median']:.1f} | "
            f"{e2e['median']:.2f} ({e2e['min']:.2f}-{e2e['max']:.2f}) | "
        )
        if own:
            row += (
                f"{own['e2e_s']['median']:.2f} ({own['completion_tokens']} tok) | "
                f"{_interval(ivs.get('overhead_ratio'))} | "
            )
        else:
            row += "n/a | n/a | "
        rel = "reference" if name == timed[0][0] else _interval(ivs.get("relative_e2e"))
        row += f"{rel} |"
        lines.append(row)
    cut = [
        f"{n} ({r['cut_runs']} of {r.get('rounds', rounds)})"
        for n, r in report["models"].items()
        if r.get("cut_runs")
    ]
    if cut:
        lines += [
            "",
            f"Answers cut at --max-tokens {report['settings']['max_tokens']} (timed "
            f"as generated; random weights ramble): {', '.join(cut)}.",
        ]
    shared = {n: r["shared_prefix"] for n, r in report["models"].items() if r.get("shared_prefix")}
    if shared:
        how = next(iter(shared.values())).get("sampling", "greedy")
        lines += [
            "",
            "N predictions against one ground truth (best of "
            f"{next(iter(shared.values())).get('rounds', rounds)}, {how} decoding): "
            "independent judge calls "
            "vs one batch (ground truth encoded once, answers decoded together):",
            "",
            *table_head(
                "model",
                "N",
                "independent s (tokens)",
                "batched s (tokens)",
                "ratio",
                "ratio per generated token",
                "prompts s, independent -> batched",
                "decode tok/s, alone -> batched",
            ),
        ]
        for n, sp in shared.items():
            lines.append(
                f"| {n} | {sp['predictions']} | {sp['independent_s']:.2f} "
                f"({sp['independent_tokens']}) | {sp['batched_s']:.2f} "
                f"({sp['batched_tokens']}) | {sp['ratio']:.2f} | "
                f"{sp['ratio_per_token']:.2f} | {sp['independent_prompt_s']:.2f} -> "
                f"{sp['batched_prompt_s']:.2f} ({sp['prompt_ratio']:.2f}x) | "
                f"{sp['independent_decode_tok_s']:.1f} -> "
                f"{sp['batched_decode_tok_s']:.1f} ({sp['decode_speedup']:.2f}x) |"
            )
        lines += [
            "",
            "Prompts: vision, prefill and parsing, everything but decoding (reuse "
            "evaluates the ground truth once). Decode: generated tokens per second of "
            "the decode loops (batching runs the N answers in one step each).",
        ]
    repack = {n: r["repack"] for n, r in report["models"].items() if r.get("repack")}
    if repack:
        lines += [
            "",
            "Weights repacked (llama.cpp's extra buffer types) and not, same model, "
            "one run (median of the repeats):",
            "",
            *table_head(
                "model",
                "end-to-end s, repacked -> plain",
                "text prefill s",
                "decode tok/s",
                "load s",
                "plain / repacked end-to-end",
                "faster",
            ),
        ]
        for n, rp in repack.items():
            on, off = rp["on"], rp["off"]
            lines.append(
                f"| {n} | {on['e2e_s']:.3f} -> {off['e2e_s']:.3f} | "
                f"{on['text_prefill_s']:.3f} -> {off['text_prefill_s']:.3f} | "
                f"{on['decode_tok_s']:.1f} -> {off['decode_tok_s']:.1f} | "
                f"{on['load_s']:.2f} -> {off['load_s']:.2f} | "
                f"{rp['e2e_ratio_off_on']:.3f} | {rp['faster']} |"
            )
    lines += _memory_markdown(report)
    return "\n".join(lines) + "\n"


def _interval(iv: dict[str, Any] | None) -> str:
    if not iv:
        return "n/a"
    if iv["high"] is None or iv["n"] < 2:
        return f"{iv['value']:.3f} (n={iv['n']}, no interval)"
    return f"{iv['value']:.3f} ({iv['low']:.3f}-{iv['high']:.3f})"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def _memory_markdown(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    shots = {n: r["oneshot"] for n, r in report["models"].items() if r.get("oneshot")}
    if shots:
        lines += [
            "",
            "One default judgement (`verm-local judge`: one-shot, the context sized for "
            "the request), in a fresh process:",
            "",
            *table_head(
                "model",
                "peak RSS MB",
                "Python MB",
                "text weights MB",
                "vision weights MB",
                "KV cache MB (n_ctx, type)",
                "rest MB",
                "doctor's estimate MB (measured / estimate)",
                "TTFT s",
                "vision s",
                "prefill s",
                "decode s (tokens)",
            ),
        ]
        for n, o in shots.items():
            p, t = o["parts"], o["timings"]
            rest = o["peak_rss"] - o["python_rss"] - p["text_weights"] - p["kv_cache"]
            est = o.get("estimate", {}).get("peak", 0)
            ratio = f"{o['peak_rss'] / est:.2f}" if est else "n/a"
            lines.append(
                f"| {Path(n).name} | {_mb(o['peak_rss'])} | {_mb(o['python_rss'])} | "
                f"{_mb(p['text_weights'])} | {_mb(p['vision_weights'])} | {_mb(p['kv_cache'])} "
                f"({p['n_ctx']}, {p['kv_type']}) | {_mb(rest)} | {_mb(est)} ({ratio}) | "
                f"{t['ttft_s']:.2f} | {t['vision_s']:.2f} | {t['prefill_s']:.2f} | "
                f"{t['decode_s']:.2f} ({t['completion_tokens']}) |"
            )
        lines += [
            "",
            "Rest: compute buffers, the vision encoder's activations, image "
            "embeddings, allocator slack (peak minus Python, text weights and KV; the "
            "vision weights are let go before the text prefill). RSS at each stage:",
            "",
        ]
        for n, o in shots.items():
            steps = ", ".join(f"{e['stage']} {e['rss_mb']:,.0f}" for e in o["timeline"])
            lines.append(f"- {Path(n).name}: {steps} (MB)")
    served = {n: r["served"] for n, r in report["models"].items() if r.get("served")}
    for n, sv in served.items():
        lines += [
            "",
            f"`serve --parallel {sv['parallel']}` ({Path(n).name}): the model "
            f"worker's peak RSS {_mb(sv['worker_peak_rss'])} MB over {sv['parallel']} "
            f"concurrent judgements of one ground truth ({sv['round_s']:.1f} s).",
        ]
    sweeps = {n: r["sweep"] for n, r in report["models"].items() if r.get("sweep")}
    for n, rows in sweeps.items():
        lines += [
            "",
            f"Prefill settings side by side ({Path(n).name}, one default judgement each):",
            "",
            *table_head(
                "setting",
                "vision",
                "vision s",
                "text prefill s",
                "TTFT s",
                "decode tok/s",
                "KV MB (n_ctx)",
                "peak RSS MB",
            ),
        ]
        for r in rows:
            setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
            lines.append(
                f"| {setting} | {r['vision']} | {r['vision_s']:.2f} | "
                f"{r['text_prefill_s']:.2f} | {r['ttft_s']:.2f} | "
                f"{r['decode_tok_s']:.1f} | {_mb(r.get('kv_cache', 0))} ({r.get('n_ctx', '?')}) | "
                f"{_mb(r['peak_rss'])} |"
            )
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """Stacked bars per model: vision, text prefill, decode; a mark at llama.cpp's own path.
    With a shared-prefix run, a second panel: N independent calls against one batch, each
    split into prompts and decoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report["models"] if "e2e_s" in report["models"][n]]
    shared = [n for n in names if report["models"][n].get("shared_prefix")]
    shots = [n for n in report["models"] if report["models"][n].get("oneshot")]
    rows = (
        ([len(names)] if names else [])
        + ([2 * len(shared)] if shared else [])
        + ([3] if shots else [])
    )
    if not rows:
        return
    fig, axes = plt.subplots(
        len(rows), 1, squeeze=False, height_ratios=rows, figsize=(8, 1.6 + 0.6 * sum(rows))
    )
    if shots:
        ax = axes[-1][0]
        for n in shots:
            tl = report["models"][n]["oneshot"]["timeline"]
            ax.step(
                [e["s"] for e in tl],
                [e["rss_mb"] / 1000 for e in tl],
                where="post",
                label=Path(n).name,
            )
            for e in tl:
                ax.annotate(
                    e["stage"].split(" (")[0], (e["s"], e["rss_mb"] / 1000), fontsize=6, rotation=30
                )
        ax.set_xlabel("seconds into one default judgement")
        ax.set_ylabel("RSS GB")
        ax.legend(loc="best", fontsize=8)
    if not names:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    ax = axes[0][0]
    for i, n in enumerate(names):
        r = report["models"][n]
        vision, text = r["vision_s"]["median"], r["text_prefill_s"]["median"]
        decode = r["e2e_s"]["median"] - vision - text
        _stack(
            ax,
            i,
            (
                (vision, "vision", "#1f77b4"),
                (text, "text prefill", "#ff7f0e"),
                (decode, "decode + parse", "#2ca02c"),
            ),
            labels=i == 0,
        )
        if r.get("llamacpp"):
            ax.plot(
                r["llamacpp"]["e2e_s"]["median"],
                i,
                "k|",
                markersize=22,
                label="llama.cpp own path" if i == 0 else None,
            )
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
                _stack(
                    ax,
                    y,
                    (
                        (prompt, "prompts (vision, prefill, parse)", "#9467bd"),
                        (total - prompt, "decode", "#2ca02c"),
                    ),
                    labels=y == 0,
                )
                ticks.append(f"{Path(n).name}: {kind}")
            ax.text(sp["batched_s"], 2 * i + 1, f"  {sp['ratio']:.2f}x", va="center", fontsize=8)
        ax.set_yticks(range(len(ticks)), ticks)
        ax.set_xlabel(
            f"seconds for {report['models'][shared[0]]['shared_prefix']['predictions']}"
            " predictions against one ground truth (best run)"
        )
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
