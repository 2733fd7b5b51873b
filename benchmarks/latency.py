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

import base64
import contextlib
import dataclasses
import io
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from verm_local.errors import VermError

from .gate import ratio_interval
from .markdown import table_head

log = logging.getLogger(__name__)

STAGES = ("load_s", "vision_s", "text_prefill_s", "ttft_s", "decode_tok_s", "e2e_s")


@dataclass(frozen=True)
class Workload:
    """What every measurement judges, and how: the pair, its task, the rounds and the
    settings a run passes to its workers (a worker's JSON arguments carry the same keys)."""

    gt: str
    pred: str
    task: str
    repeat: int
    threads: int | None
    image_tokens: int | None
    max_tokens: int | None
    repack: bool | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Workload:
        return cls(**{f.name: args.get(f.name) for f in dataclasses.fields(cls)})

    def judge(self, model: str, **more: Any) -> Any:
        """verm-local's Judge on `model` with this workload's settings."""
        from verm_local.judge import Judge

        return Judge(
            model,
            threads=self.threads,
            image_tokens=self.image_tokens,
            max_tokens=self.max_tokens,
            repack=self.repack,
            **more,
        )


def _png_data_url(img: Any) -> str:
    """A prepared image's pixels as a PNG data URL (lossless: the server or llama.cpp's
    own path sees what verm-local's judge sees)."""
    buf = io.BytesIO()
    img.image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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
    still cost its tokens, so it counts (the judgement says it is incomplete)."""
    judge.judge(gt, pred, task, sampling=sampling)
    return judge.last_generation


class _VermRunner:
    """verm-local's judge on one model, loaded, the pair prepared: `once()` is one timed
    judgement."""

    def __init__(
        self,
        model: str,
        w: Workload,
    ) -> None:
        t0 = time.perf_counter()
        self.judge = w.judge(model)
        self.load_s = time.perf_counter() - t0
        self.task = w.task
        self.images = [
            self.judge.prepare(w.gt, w.task, "gt"),
            self.judge.prepare(w.pred, w.task, "pred"),
        ]
        self.sampling = self.judge.sampling(w.task)
        self.gguf = self.judge.resolved.format == "gguf"

    def once(self) -> dict[str, Any]:
        t = time.perf_counter()
        gen = _judge_once(self.judge, *self.images, self.task, self.sampling)
        e2e = time.perf_counter() - t
        n = max(1, gen.completion_tokens)
        return {
            "vision_s": gen.vision_s,
            "text_prefill_s": gen.prefill_s - gen.vision_s,
            "ttft_s": gen.prefill_s + gen.decode_s / n,
            "decode_tok_s": n / gen.decode_s if gen.decode_s else 0.0,
            "e2e_s": e2e,
            "completion_tokens": gen.completion_tokens,
            "prompt_tokens": gen.prompt_tokens,
            "cut": gen.finish_reason == "length",
        }

    def result(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.judge.backend.info.model_dump(),
            "load_s": self.load_s,
            "runs": runs,
            "peak_rss": _peak_rss(),
            "peak_gpu": _peak_gpu(),
            "repack": self.judge.backend.info.repack,
        }

    def close(self) -> None:
        self.judge.close()


def measure_verm(model: str, w: Workload) -> dict[str, Any]:
    """One model alone in this process: load, a warm-up, `repeat` judgements."""
    runner = _VermRunner(model, w)
    runner.once()  # warm-up
    out = runner.result([runner.once() for _ in range(w.repeat)])
    runner.close()
    return out


def measure_timed(models: list[str], w: Workload, stock: bool = True) -> dict[str, Any]:
    """Every model (and, for GGUF ones, llama.cpp's own path on it) loaded in this process,
    a warm-up each, then `repeat` rounds, each judging once on every one of them in turn
    (A, B, A, B ...): a slow spell of the machine falls on both sides of a ratio."""
    runners = []
    for model in models:
        verm = _VermRunner(model, w)
        own = _StockRunner(model, w) if stock and verm.gguf else None
        runners.append((model, verm, own))
    for _, verm, own in runners:  # warm-ups
        verm.once()
        if own is not None:
            own.once()
    runs: dict[str, dict[str, list]] = {m: {"verm": [], "stock": []} for m in models}
    for _ in range(w.repeat):
        for model, verm, own in runners:
            runs[model]["verm"].append(verm.once())
            if own is not None:
                runs[model]["stock"].append(own.once())
    out = {}
    for model, verm, own in runners:
        out[model] = {
            "verm": verm.result(runs[model]["verm"]),
            "stock": own.result(runs[model]["stock"]) if own is not None else None,
        }
        verm.close()
    return out


def _rss() -> int:
    """This process's resident memory now, bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def model_shape(gguf: Path) -> Any:
    """The text model's shape (memory.Shape) from the GGUF's own metadata."""
    from verm_local.gguf_meta import read_metadata
    from verm_local.memory import Shape

    meta = read_metadata(gguf)
    arch = meta["general.architecture"]
    heads = int(meta[f"{arch}.attention.head_count"])
    return Shape(
        layers=int(meta[f"{arch}.block_count"]),
        kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        heads=heads,
        head_dim=int(meta.get(f"{arch}.attention.key_length", 128)),
    )


def measure_oneshot(
    model: str,
    w: Workload,
    kv_type: str | None = None,
    flash_attn: bool | None = None,
    n_ubatch: int | None = None,
    vision: str = "auto",
) -> dict[str, Any]:
    """One judgement as `verm-local judge` makes it (one-shot: the vision model let go
    before the text model's buffers, the context sized for the request), in a fresh
    process: peak RSS, RSS at each stage, the analytic sizes of its parts, the timings."""
    from verm_local import events

    base = _rss()
    timeline: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def note(name: str, detail: dict[str, Any]) -> None:
        timeline.append(
            {
                "stage": events.describe(name, detail),
                "s": round(time.perf_counter() - t_start, 3),
                "rss_mb": round(_rss() / 1e6, 1),
            }
        )

    with events.listening(note):
        judge = w.judge(
            model,
            one_shot=True,
            kv_type=kv_type,
            flash_attn=flash_attn,
            n_ubatch=n_ubatch,
            vision=vision,
        )
        sampling = judge.sampling(w.task)
        result = judge.judge(w.gt, w.pred, w.task, sampling=sampling, unreadable="score")
        note("done", {})
    from verm_local.memory import estimate_llamacpp, kv_bytes
    from verm_local.select import default_n_ctx

    gen = judge.last_generation
    resolved = judge.resolved
    n_ctx = judge.backend.batch.n_ctx
    shape = model_shape(resolved.path)
    used = judge.backend.batch.settings
    kv = kv_bytes(n_ctx, used["kv_type"], shape)
    vision_file = judge.backend.weight_files()[-1]

    def estimate(ctx: int) -> dict[str, int]:
        return estimate_llamacpp(
            resolved.path.stat().st_size,
            vision_file.stat().st_size,
            ctx,
            image_tokens=max(gen.image_tokens // 2, 1),
            kv_type=used["kv_type"],
            flash_attn=used["flash_attn"],
            n_ubatch=used["n_ubatch"],
            shape=shape,
        ).to_dict()

    out = {
        "model": judge.backend.info.model_dump(),
        "peak_rss": _peak_rss(),
        "python_rss": base,
        "timeline": timeline,
        "parts": {
            "text_weights": resolved.path.stat().st_size,
            "vision_weights": vision_file.stat().st_size,
            "kv_cache": kv,
            "n_ctx": n_ctx,
            "kv_type": used["kv_type"],
            "context_grew": judge.backend.batch.grown,
        },
        # doctor's model (verm_local.memory) for this judgement, and at the plan's context
        # (what `doctor` reports for a default judgement).
        "estimate": estimate(n_ctx),
        "estimate_at_plan_ctx": estimate(default_n_ctx()),
        "timings": result.timings.model_dump(),
        "complete": result.complete,
        "settings": {
            **used,
            "vision": judge.backend.info.vision,
            "repack": judge.backend.info.repack,
        },
        "completion_tokens": gen.completion_tokens,
        "e2e_s": time.perf_counter() - t_start,
    }
    judge.close()
    return out


def measure_served(model: str, w: Workload, parallel: int = 8) -> dict[str, Any]:
    """`verm-local serve --parallel N` under N concurrent /v1/judge requests against one
    ground truth: the model worker's peak RSS (VmHWM) and the wall time of the round."""
    import urllib.request

    from .serve import ServerProcess, concurrently, free_port, post_json

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "verm_local.cli",
        "serve",
        "-m",
        model,
        "--parallel",
        str(parallel),
        "--port",
        str(port),
    ]
    for flag, value in (
        ("--threads", w.threads),
        ("--image-tokens", w.image_tokens),
        ("--max-tokens", w.max_tokens),
    ):
        if value:
            cmd += [flag, str(value)]
    if w.repack is not None:
        cmd.append("--repack" if w.repack else "--no-repack")
    server = ServerProcess(cmd, port, "/health", "verm-local serve")
    try:
        pid = json.loads(urllib.request.urlopen(server.base + "/health").read())["worker_pid"]
        preds = _variants(w.pred, parallel, w.image_tokens, w.task)
        gt_url = "data:image/png;base64," + base64.b64encode(Path(w.gt).read_bytes()).decode()

        def one(p: Any) -> None:
            body = {"gt": gt_url, "pred": _png_data_url(p), "task": w.task}
            post_json(server.base + "/v1/judge", body, 3600)

        wall = concurrently(one, preds)
        status = Path(f"/proc/{pid}/status").read_text()
        hwm = next(
            int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmHWM:")
        )
    finally:
        server.stop()
    return {"parallel": parallel, "worker_peak_rss": hwm, "round_s": wall}


class _StockRunner:
    """llama-cpp-python's own multimodal path: Llama + MTMDChatHandler + response_format,
    on the same request (messages, prepared images, answer schema, greedy decoding)."""

    def __init__(
        self,
        model: str,
        w: Workload,
    ) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import MTMDChatHandler

        from verm_local.answer import answer_schema
        from verm_local.backends.llamacpp import repack_choice
        from verm_local.judge import build_request
        from verm_local.modelref import resolve_model
        from verm_local.select import task_context

        resolved = resolve_model(model)
        if resolved.format != "gguf":
            raise VermError(f"{model}: llama.cpp's own path needs a GGUF model")
        jr = build_request(w.gt, w.pred, w.task, image_tokens=w.image_tokens, warn=False)
        self.sampling = jr.request.sampling.with_(max_tokens=w.max_tokens)

        self.messages = jr.messages_with(
            lambda img: {"type": "image_url", "image_url": {"url": _png_data_url(img)}}
        )
        use_repack, _ = repack_choice(w.repack, resolved.quant)
        t0 = time.perf_counter()
        handler = MTMDChatHandler(clip_model_path=str(resolved.mmproj), verbose=False)
        with _model_params(use_extra_bufts=use_repack):
            self.llama = Llama(
                model_path=str(resolved.path),
                chat_handler=handler,
                verbose=False,
                n_ctx=task_context(w.task, w.image_tokens, self.sampling.max_tokens),
                n_threads=w.threads,
                n_gpu_layers=0,
                seed=0,
            )
        self.load_s = time.perf_counter() - t0
        self.format = {
            "type": "json_object",
            "schema": answer_schema(w.task, self.sampling.max_tokens),
        }

    def once(self) -> dict[str, Any]:
        t = time.perf_counter()
        out = self.llama.create_chat_completion(
            messages=self.messages,
            response_format=self.format,
            temperature=0.0,
            max_tokens=self.sampling.max_tokens,
            repeat_penalty=self.sampling.repeat_penalty,
        )
        return {
            "e2e_s": time.perf_counter() - t,
            "completion_tokens": int(out["usage"]["completion_tokens"]),
        }

    def result(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"load_s": self.load_s, "runs": runs, "peak_rss": _peak_rss(), "peak_gpu": None}


@contextlib.contextmanager
def _model_params(**fields: Any) -> Iterator[None]:
    """llama-cpp-python's `Llama` builds its model parameters from llama.cpp's defaults and
    has no argument for some of them (`use_extra_bufts`): give it defaults with `fields`
    set while one model loads, so its own path runs as verm-local's does on this CPU."""
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def params() -> Any:
        p = original()
        for k, v in fields.items():
            setattr(p, k, v)
        return p

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


def _variants(
    pred: str, n: int, image_tokens: int | None, task: str = "chart", role: str = "pred"
) -> list[Any]:
    """N distinct predictions from PRED: each with a small box drawn at its own place."""
    from PIL import ImageDraw

    from verm_local.images import prepare_image
    from verm_local.tasks import profile

    prep = profile(task).pred if role == "pred" else profile(task).gt
    out = []
    for i in range(n):
        img = prepare_image(pred, prep, image_tokens=image_tokens)
        w, h = img.image.size
        d = ImageDraw.Draw(img.image)
        x, y = (i * 37) % max(w - 24, 1), (i * 53) % max(h - 24, 1)
        d.rectangle([x, y, x + 20, y + 20], fill=((i * 70) % 256, 40, 200 - i * 20 % 200))
        out.append(img)
    return out


def _shared_setup(
    pred: str, gt: str, predictions: int, image_tokens: int | None, task: str = "chart"
) -> tuple[list[Any], list[Any]]:
    return (
        _variants(pred, predictions, image_tokens, task),
        _variants(gt, 2, image_tokens, task, "gt"),
    )


def _sampling(task: str, max_tokens: int | None, rl: bool) -> Any:
    """The task's judging decoding, or the authors' RL sampling (seeded, so both runs draw
    alike)."""
    from verm_local.tasks import decoding

    return decoding(task, "rl" if rl else "default", max_tokens)


def measure_shared(
    model: str, w: Workload, predictions: int = 8, rl: bool = False
) -> dict[str, Any]:
    """N predictions against one ground truth, two ways, interleaved over `repeat` rounds
    after a warm-up on other images: N independent judge calls (the cache emptied before
    each, so each evaluates the ground truth itself) and one `judge_many` batch (ground
    truth encoded once, answers decoded together). Best round of each, and every round."""
    task = w.task
    preds, warm = _shared_setup(w.pred, w.gt, predictions, w.image_tokens, task)
    sampling = _sampling(task, w.max_tokens, rl)
    with w.judge(model, parallel=predictions, prefix_cache=1) as j:
        gt_img = j.prepare(w.gt, task)
        engine = j.backend.batch
        _judge_once(j, warm[0], warm[1], task, sampling)
        j.judge_many([(warm[0], warm[1], task)])
        independent, batched = [], []
        for _ in range(w.repeat):
            t, tokens, decode_s = time.perf_counter(), 0, 0.0
            for p in preds:
                engine.reset()
                g = _judge_once(j, gt_img, p, task, sampling)
                tokens += g.completion_tokens
                decode_s += g.decode_s
            independent.append(
                {"s": time.perf_counter() - t, "tokens": tokens, "decode_s": decode_s}
            )
            engine.reset()
            t = time.perf_counter()
            res = j.judge_many([(gt_img, p, task) for p in preds], sampling=sampling)
            batched.append(
                {
                    "s": time.perf_counter() - t,
                    "tokens": engine.last_tokens,
                    "decode_s": engine.last_decode_s,
                    "failed": sum(isinstance(r, Exception) for r in res),
                }
            )
    best = {k: min(v, key=lambda r: r["s"]) for k, v in (("i", independent), ("b", batched))}
    return {
        "independent": {**best["i"], "runs": independent},
        "batched": {**best["b"], "runs": batched},
    }


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


def _worker(kind: str, model: str, args: dict[str, Any]) -> dict[str, Any]:
    """Measure in a fresh process; its last stdout line is the JSON result. A native crash
    there becomes NativeCrash with the stage it died in and its crash log."""
    from verm_local.crash import crash_report, new_log_path
    from verm_local.errors import NativeCrash

    log = new_log_path(f"bench-{kind}")
    cmd = [
        sys.executable,
        "-m",
        "verm_local.benchmarks.latency",
        kind,
        model,
        json.dumps(args),
        str(log),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0:
        raise NativeCrash(
            crash_report(f"the latency worker for {model} ({kind})", -proc.returncode, log)
        )
    log.unlink(missing_ok=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise VermError(f"latency worker for {model} ({kind}) failed: {tail[0]}")
    return json.loads(lines[-1])


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


# The settings that move prefill and memory on a CPU, tried side by side on one default
# judgement: each row names every setting, so the table does not depend on the defaults.
SWEEP = (
    {"n_ubatch": 512, "flash_attn": False, "vision": "gguf"},
    {"n_ubatch": 256, "flash_attn": False, "vision": "gguf"},
    {"n_ubatch": 1024, "flash_attn": False, "vision": "gguf"},
    {"n_ubatch": 512, "flash_attn": True, "vision": "gguf"},
    {"n_ubatch": 256, "flash_attn": True, "vision": "gguf"},
    {"n_ubatch": 256, "flash_attn": True, "kv_type": "q8_0", "vision": "gguf"},
    {"n_ubatch": 256, "flash_attn": True, "vision": "onnx"},
)


def prefill_sweep(path: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """One default judgement per setting, each in its own process: prefill, vision, TTFT,
    peak RSS. A vision path that is not there (no ONNX tower) is left out."""
    rows = []
    for setting in SWEEP:
        log.info("latency: prefill sweep %s ...", setting)
        try:
            r = _worker("oneshot", path, {**args, **setting})
        except VermError as exc:
            if setting.get("vision") == "onnx":
                continue
            raise exc
        t = r["timings"]
        rows.append(
            {
                "setting": setting,
                "vision": r["settings"]["vision"],
                "vision_s": t["vision_s"],
                "text_prefill_s": t["prefill_s"] - t["vision_s"],
                "ttft_s": t["ttft_s"],
                "peak_rss": r["peak_rss"],
                "n_ctx": r["parts"]["n_ctx"],
                "kv_cache": r["parts"]["kv_cache"],
                "decode_tok_s": (t["completion_tokens"] / t["decode_s"] if t["decode_s"] else 0.0),
            }
        )
    return rows


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
) -> dict[str, Any]:
    """Latency per model (and llama.cpp's own path), and for GGUF models: one default
    judgement's memory (`memory`), the served worker's (`serve_parallel`), the prefill
    settings side by side (`sweep`); `timed=False` skips the repeated timing runs."""
    from verm_local.modelref import resolve_model

    from .agreement import model_path

    args = {
        "gt": str(gt),
        "pred": str(pred),
        "task": task,
        "repeat": repeat,
        "threads": threads,
        "image_tokens": image_tokens,
        "max_tokens": max_tokens,
        "repack": repack,
    }
    report: dict[str, Any] = {"settings": args, "machine": _machine(), "models": {}}
    paths = {name: model_path(name) for name in models}
    measured: dict[str, Any] = {}
    if timed:
        log.info(
            "latency: %s%s, %d interleaved rounds ...",
            ", ".join(models),
            " and llama.cpp's own path" if stock else "",
            repeat,
        )
        measured = _worker(
            "timed", "", {**args, "models": [paths[n] for n in models], "stock": stock}
        )
    for name in models:
        path = paths[name]
        gguf = resolve_model(path).format == "gguf"
        entry: dict[str, Any] = {}
        if timed:
            verm = measured[path]["verm"]
            entry = summarize_model(verm, measured[path]["stock"])
        report["models"][name] = entry
        if memory and gguf:
            log.info("latency: %s: one default judgement, its memory ...", name)
            entry["oneshot"] = _worker("oneshot", path, args)
        if serve_parallel and gguf:
            log.info("latency: %s: serve --parallel %d, its memory ...", name, serve_parallel)
            entry["served"] = _worker("served", path, {**args, "serve_parallel": serve_parallel})
        if sweep and gguf:
            entry["sweep"] = prefill_sweep(path, args)
        if compare_repack and gguf and timed:
            log.info("latency: %s: weights repacked and not, side by side ...", name)
            both = {}
            for setting in (True, False):  # the default run above is one of the two
                both[setting] = (
                    verm
                    if verm.get("repack") is setting
                    else _worker("verm", path, {**args, "repack": setting})
                )
            report["models"][name]["repack"] = repack_summary(both[True], both[False])
        if predictions > 1 and gguf:
            log.info(
                "latency: %s: %d predictions vs one ground truth, independent and batched ...",
                name,
                predictions,
            )
            extra = {**args, "predictions": predictions, "rl": rl_sampling}
            both = _worker("shared", path, extra)
            shared = shared_summary(both["independent"], both["batched"], predictions, rl_sampling)
            entry.setdefault("intervals", {})["shared_ratio"] = ratio_interval(
                [r["s"] for r in both["batched"]["runs"]],
                [r["s"] for r in both["independent"]["runs"]],
            ).to_dict()
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
    if out:
        write_reports(report, Path(out))
    return report


def _machine() -> dict[str, Any]:
    from verm_local.hardware import probe

    hw = probe(with_torch=False)
    return {
        "cpu": hw.cpu_model,
        "threads": hw.cores_logical,
        "ram_gb": round(hw.ram_total / 1e9, 1),
        "cuda": [g.name for g in hw.cuda],
    }


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


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Latency ({m['cpu']}, {m['threads']} threads; median of "
        f"{report['settings']['repeat']} after a warm-up)",
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
        f"{n} ({r['cut_runs']} of {report['settings']['repeat']})"
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
            f"{report['settings']['repeat']}, {how} decoding): independent judge calls "
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


def _main(argv: list[str]) -> None:
    from verm_local.crash import Recorder

    kind, model, raw, log = argv
    args = json.loads(raw)
    recorder = Recorder(Path(log), f"bench latency worker ({kind})")
    fn = {
        "verm": measure_verm,
        "timed": measure_timed,
        "shared": measure_shared,
        "oneshot": measure_oneshot,
        "served": measure_served,
    }[kind]
    extra = (
        {"predictions": args["predictions"], "rl": args.get("rl", False)}
        if "predictions" in args
        else {}
    )
    if kind == "oneshot":
        extra.update(
            {
                k: args[k]
                for k in ("kv_type", "flash_attn", "n_ubatch", "vision")
                if args.get(k) is not None
            }
        )
    if kind == "served":
        extra["parallel"] = args.get("serve_parallel", 8)
    if kind == "timed":
        extra["stock"] = args.get("stock", True)
    from verm_local.stdio import stdout_to_stderr

    with stdout_to_stderr():
        result = fn(args["models"] if kind == "timed" else model, Workload.from_args(args), **extra)
    recorder.close()
    print(json.dumps(result))


if __name__ == "__main__":
    from verm_local.settings import export_default

    export_default("TOKENIZERS_PARALLELISM", "false")
    _main(sys.argv[1:])
