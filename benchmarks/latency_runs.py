"""`bench latency`'s workload and its runners: verm-local's judge and llama.cpp's own
multimodal path on the same request, one-shot memory, the served worker, N predictions
against one ground truth, and the worker process each measurement runs in
(`python -m verm_local.benchmarks.latency_runs KIND MODEL ARGS LOG`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from verm_local import net
from verm_local.errors import VermError
from verm_local.tasks import TaskProfile, decoding, profile

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
    # Checking the gate only: verm-local's judgement made this fraction slower (a delay
    # inside the timed call), as a build that slow would be.
    slowdown: float | None = None
    gate: dict[str, Any] | None = None  # a gate.Plan: rounds until decided (sequential)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Workload:
        return cls(**{f.name: args.get(f.name) for f in dataclasses.fields(cls)})

    @property
    def profile(self) -> TaskProfile:
        """The task's profile: the workload is where a measurement's request enters."""
        return profile(self.task)

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
    from verm_local.images import data_url
    from verm_local.pixels import png_bytes

    return data_url(png_bytes(img.image))


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


def _judge_once(judge: Any, gt: Any, pred: Any, task: TaskProfile, sampling: Any) -> Any:
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
        self.task = w.profile
        self.images = [
            self.judge.prepare(w.gt, self.task, "gt"),
            self.judge.prepare(w.pred, self.task, "pred"),
        ]
        self.sampling = self.judge.sampling(self.task)
        self.slowdown = w.slowdown or 0.0
        self.gguf = self.judge.resolved.format == "gguf"

    def once(self) -> dict[str, Any]:
        t = time.perf_counter()
        gen = _judge_once(self.judge, *self.images, self.task, self.sampling)
        if self.slowdown:
            time.sleep(self.slowdown * (time.perf_counter() - t))
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


def rounds(w: Workload) -> Any:
    """Round numbers for a measurement: `repeat` of them, or with a gate plan as many as
    its sequential decision asks for (`gate.Sequential`); returns (the rounds, the
    Sequential or None)."""
    from .gate import Plan, Sequential

    if not w.gate:
        return iter(range(1, w.repeat + 1)), None
    plan = Plan(**w.gate)
    return iter(range(1, plan.max_repeat + 1)), Sequential(plan)


def measure_timed(models: list[str], w: Workload, stock: bool = True) -> dict[str, Any]:
    """Every model (and, for GGUF ones, llama.cpp's own path on it) loaded in this process,
    a warm-up each, then rounds, each judging once on every one of them in turn (A, B, A,
    B ...): a slow spell of the machine falls on both sides of a ratio. `repeat` rounds,
    or with a gate plan until each gated ratio is decided (`rounds`)."""
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
    order, seq = rounds(w)
    for n in order:
        for model, verm, own in runners:
            runs[model]["verm"].append(verm.once())
            if own is not None:
                runs[model]["stock"].append(own.once())
        if seq is not None and seq.after_round(n, _timed_pairs(runs, runners)):
            break
    out: dict[str, Any] = {}
    for model, verm, own in runners:
        out[model] = {
            "verm": verm.result(runs[model]["verm"]),
            "stock": own.result(runs[model]["stock"]) if own is not None else None,
        }
        verm.close()
    if seq is not None:
        out["_sequential"] = {k: seq.result(k) for k in _timed_pairs(runs, runners)}
    return out


def _timed_pairs(runs: dict[str, Any], runners: list) -> dict[str, tuple[list, list]]:
    """The gated ratios of a timed run, as (candidate, reference) end-to-end times:
    `MODEL|overhead_ratio` (verm-local / llama.cpp's path), `MODEL|relative_e2e` (a model
    / the first)."""
    e2e = {m: [r["e2e_s"] for r in runs[m]["verm"]] for m, _, _ in runners}
    pairs = {
        f"{m}|overhead_ratio": (e2e[m], [r["e2e_s"] for r in runs[m]["stock"]])
        for m, _, own in runners
        if own is not None
    }
    first = runners[0][0]
    pairs.update({f"{m}|relative_e2e": (e2e[m], e2e[first]) for m, _, _ in runners[1:]})
    return pairs


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
        p = w.profile
        sampling = judge.sampling(p)
        result = judge.judge(w.gt, w.pred, p, sampling=sampling, unreadable="score")
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
    from verm_local.images import data_url

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
        pid = net.get_json(server.base + "/health", policy=net.NO_RETRY)["worker_pid"]
        preds = _variants(w.pred, parallel, w.image_tokens, w.profile)
        gt_url = data_url(Path(w.gt))

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
        p = w.profile
        jr = build_request(w.gt, w.pred, p, image_tokens=w.image_tokens, warn=False)
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
                n_ctx=task_context(p, w.image_tokens, self.sampling.max_tokens),
                n_threads=w.threads,
                n_gpu_layers=0,
                seed=0,
            )
        self.load_s = time.perf_counter() - t0
        self.format = {
            "type": "json_object",
            "schema": answer_schema(p, self.sampling.max_tokens),
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
    pred: str, n: int, image_tokens: int | None, task: TaskProfile, role: str = "pred"
) -> list[Any]:
    """N distinct predictions from PRED: each with a small box drawn at its own place."""
    from PIL import ImageDraw

    from verm_local.images import prepare_image

    prep = task.pred if role == "pred" else task.gt
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
    pred: str, gt: str, predictions: int, image_tokens: int | None, task: TaskProfile
) -> tuple[list[Any], list[Any]]:
    return (
        _variants(pred, predictions, image_tokens, task),
        _variants(gt, 2, image_tokens, task, "gt"),
    )


def _sampling(task: TaskProfile, max_tokens: int | None, rl: bool) -> Any:
    """The task's judging decoding, or the authors' RL sampling (seeded, so both runs draw
    alike)."""
    return decoding(task, "rl" if rl else "default", max_tokens)


def measure_shared(
    model: str, w: Workload, predictions: int = 8, rl: bool = False
) -> dict[str, Any]:
    """N predictions against one ground truth, two ways, interleaved over `repeat` rounds
    after a warm-up on other images: N independent judge calls (the cache emptied before
    each, so each evaluates the ground truth itself) and one `judge_many` batch (ground
    truth encoded once, answers decoded together). Best round of each, and every round."""
    task = w.profile
    preds, warm = _shared_setup(w.pred, w.gt, predictions, w.image_tokens, task)
    sampling = _sampling(task, w.max_tokens, rl)
    with w.judge(model, parallel=predictions, prefix_cache=1) as j:
        gt_img = j.prepare(w.gt, task)
        engine = j.backend.batch
        _judge_once(j, warm[0], warm[1], task, sampling)
        j.judge_many([(warm[0], warm[1], task)])
        independent, batched = [], []
        order, seq = rounds(w)
        for n in order:
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
            key = f"{model}|shared_ratio"
            pairs = {key: ([r["s"] for r in batched], [r["s"] for r in independent])}
            if seq is not None and seq.after_round(n, pairs):
                break
    best = {k: min(v, key=lambda r: r["s"]) for k, v in (("i", independent), ("b", batched))}
    out = {
        "independent": {**best["i"], "runs": independent},
        "batched": {**best["b"], "runs": batched},
    }
    if seq is not None:
        out["_sequential"] = {key: seq.result(key)}
    return out


def run_worker(kind: str, model: str, args: dict[str, Any]) -> dict[str, Any]:
    """Measure in a fresh process; its last stdout line is the JSON result. A native crash
    there becomes NativeCrash with the stage it died in and its crash log."""
    from verm_local.crash import crash_report, new_log_path
    from verm_local.errors import NativeCrash

    log = new_log_path(f"bench-{kind}")
    cmd = [
        sys.executable,
        "-m",
        "verm_local.benchmarks.latency_runs",
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
            r = run_worker("oneshot", path, {**args, **setting})
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
