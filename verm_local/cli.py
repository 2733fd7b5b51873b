"""`verm-local` command line. Thin: options are parsed here (the ones verbs share are
defined once, below), the work is a function of the module named for the verb (`judge`,
`server`, `store`, `doctor`, `convert.*`, `benchmarks.*`), and only this module writes to
the terminal: results on stdout, one-line errors and progress on stderr."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import ExitCode, VermError
from .stdio import stdout_to_stderr

app = typer.Typer(
    name="verm-local",
    help="Quantized, verified local inference for the Visual-ERM reward model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
convert_app = typer.Typer(
    help="Build models: tiny test model, GGUF conversion and quants, GPTQ, ONNX vision.",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")
bench_app = typer.Typer(
    help="Benchmarks: labelled data, agreement with the reference, latency.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
bench_data_app = typer.Typer(
    help="Benchmark data in VC-RewardBench's layout.", no_args_is_help=True
)
bench_app.add_typer(bench_data_app, name="data")

# ---------------------------------------------------------------- shared options

MODEL, REQUEST, DECODING, MACHINE, OUTPUT = "Model", "Request", "Decoding", "Machine", "Output"

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        rich_help_panel=MODEL,
        help="A .gguf file, a `convert` directory or an HF checkpoint (default: the planned "
        "variant from the store; VERM_LOCAL_MODEL).",
    ),
]
VariantOpt = Annotated[
    Optional[str],
    typer.Option(
        "--variant", rich_help_panel=MODEL, help="Store variant to use instead of the plan's."
    ),
]
QuantOpt = Annotated[
    Optional[str],
    typer.Option("--quant", rich_help_panel=MODEL, help="Quant to use from a model directory."),
]
VisionOpt = Annotated[
    str,
    typer.Option(
        "--vision",
        rich_help_panel=MODEL,
        help="GGUF: auto | gguf (mmproj) | onnx (ONNX Runtime tower).",
    ),
]
TaskOpt = Annotated[
    str, typer.Option("--task", "-t", rich_help_panel=REQUEST, help="chart | table | svg")
]
ImageTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--image-tokens",
        min=1,
        rich_help_panel=REQUEST,
        help="Cap visual tokens per image below the task's trained size (less memory, less "
        "fidelity).",
    ),
]
MaxTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-tokens",
        min=1,
        rich_help_panel=DECODING,
        help="Answer cap (default: the trained one, 4096 chart/svg, 8192 table).",
    ),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads", min=1, rich_help_panel=MACHINE, help="CPU threads (default: physical cores)."
    ),
]
GpuLayersOpt = Annotated[
    Optional[int],
    typer.Option(
        "--gpu-layers",
        rich_help_panel=MACHINE,
        help="Layers to offload (-1 = all; default: planned).",
    ),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device", rich_help_panel=MACHINE, help="cuda | metal | cpu (default: planned)."
    ),
]
RepackOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--repack/--no-repack",
        rich_help_panel=MACHINE,
        help="llama.cpp weight repacking / AMX buffers (default: decided from the CPU; "
        "VERM_LOCAL_REPACK).",
    ),
]
KvTypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--kv-type",
        rich_help_panel=MACHINE,
        help="llama.cpp KV cache type: f16 | q8_0 (less memory, slower prefill on a CPU; "
        "needs flash attention) (default: the plan's).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print JSON.")]

# ---------------------------------------------------------------- verbosity

_verbosity = {"level": 0}


@app.callback()
def _options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="More on stderr: -v progress and details, -vv llama.cpp's own log too.",
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only on stderr.")] = False,
) -> None:
    """Quantized, verified local inference for the Visual-ERM reward model."""
    _verbosity["level"] = -1 if quiet else verbose
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        _verbosity["level"], logging.DEBUG
    )
    logging.getLogger("verm_local").setLevel(level)
    if _verbosity["level"] >= 2:
        logging.getLogger("verm_local.llama_cpp").setLevel(logging.DEBUG)


def show_progress() -> None:
    """Long work (pull, convert, bench, serve) reports its steps unless -q."""
    if _verbosity["level"] == 0:
        logging.getLogger("verm_local").setLevel(logging.INFO)


def fail(message: str, code: int) -> None:
    """One clear line on stderr and a non-zero exit; never a traceback."""
    typer.echo(f"verm-local: error: {message}", err=True)
    raise typer.Exit(code)


def _kv_type(value: str | None) -> str | None:
    """--kv-type checked: f16 or q8_0 (q8_0 turns flash attention on: llama.cpp needs it
    for a quantized V cache)."""
    if value is None:
        return None
    if value not in ("f16", "q8_0"):
        fail(f"--kv-type must be f16 or q8_0, not {value!r}", ExitCode.INPUT)
    return value


def _split(spec: str) -> list[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


# ---------------------------------------------------------------- judge


@app.command("judge")
def judge_cmd(
    gt: Annotated[
        Optional[Path], typer.Argument(help="Ground-truth image (shown to the model first).")
    ] = None,
    pred: Annotated[
        Optional[Path], typer.Argument(help="Image rendered from the prediction.")
    ] = None,
    task: TaskOpt = "chart",
    pairs: Annotated[
        Optional[Path],
        typer.Option(
            "--pairs",
            rich_help_panel=REQUEST,
            help="Batch mode: a JSONL file of {gt, pred, task[, id]} (or VC-RewardBench's "
            "gt_img_path, pred_img_path, category).",
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", rich_help_panel=OUTPUT, help="--pairs: write the judgements here."),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            min=1,
            rich_help_panel=REQUEST,
            help="--pairs: predictions judged at once per ground truth.",
        ),
    ] = 4,
    prompt_file: Annotated[
        Optional[Path],
        typer.Option(
            "--prompt-file",
            rich_help_panel=REQUEST,
            help="Prompt text, or JSON keyed by task (default: the training prompts).",
        ),
    ] = None,
    image_tokens: ImageTokensOpt = None,
    model: ModelOpt = None,
    variant: VariantOpt = None,
    quant: QuantOpt = None,
    mmproj: Annotated[
        Optional[Path],
        typer.Option("--mmproj", rich_help_panel=MODEL, help="Vision projector GGUF."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            rich_help_panel=MODEL,
            help="auto | llamacpp | transformers (auto: by model format).",
        ),
    ] = "auto",
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype", rich_help_panel=MODEL, help="transformers: auto | float32 | bfloat16."
        ),
    ] = None,
    vision: VisionOpt = "auto",
    vision_model: Annotated[
        Optional[Path],
        typer.Option(
            "--vision-model",
            rich_help_panel=MODEL,
            help="`convert onnx` output (default: <model>/onnx).",
        ),
    ] = None,
    vision_precision: Annotated[
        Optional[str],
        typer.Option(
            "--vision-precision",
            rich_help_panel=MODEL,
            help="fp32 | fp16 | int8 (default: first found).",
        ),
    ] = None,
    sampling_mode: Annotated[
        str,
        typer.Option(
            "--sampling",
            rich_help_panel=DECODING,
            help="default (greedy; table with its repetition penalty 1.05) | greedy | rl (the "
            "authors' RL decoding per task).",
        ),
    ] = "default",
    rl_sampling: Annotated[
        bool, typer.Option("--rl-sampling", hidden=True, help="Same as --sampling rl.")
    ] = False,
    temperature: Annotated[
        Optional[float],
        typer.Option(
            "--temperature",
            min=0.0,
            rich_help_panel=DECODING,
            help="Override the temperature (0 = greedy).",
        ),
    ] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", rich_help_panel=DECODING)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", rich_help_panel=DECODING)] = None,
    presence_penalty: Annotated[
        Optional[float], typer.Option("--presence-penalty", rich_help_panel=DECODING)
    ] = None,
    repetition_penalty: Annotated[
        Optional[float], typer.Option("--repetition-penalty", rich_help_panel=DECODING)
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", rich_help_panel=DECODING)] = None,
    max_tokens: MaxTokensOpt = None,
    max_errors: Annotated[
        Optional[int],
        typer.Option(
            "--max-errors",
            min=0,
            rich_help_panel=DECODING,
            help="Cap the constrained error list (default: what fits the token cap).",
        ),
    ] = None,
    free: Annotated[
        bool,
        typer.Option(
            "--free",
            rich_help_panel=DECODING,
            help="Do not constrain the answer to the JSON schema.",
        ),
    ] = False,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    repack: RepackOpt = None,
    kv_type: KvTypeOpt = None,
    reward_scale: Annotated[
        Optional[float],
        typer.Option(
            "--reward-scale", rich_help_panel=OUTPUT, help="S divisor of the reward (default 50)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print the Judgement as JSON.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            rich_help_panel=OUTPUT,
            help="Print the exact request (messages, image sizes and encoding, schema, decoding, "
            "prompt source) without loading a model.",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", rich_help_panel=OUTPUT, help="Show llama.cpp's own logs.")
    ] = False,
    progress: Annotated[
        Optional[bool],
        typer.Option(
            "--progress/--no-progress",
            rich_help_panel=OUTPUT,
            help="Stages on stderr (loading, encoding image 1/2, prefill, tokens decoded); "
            "default: on a terminal, unless -q or --json to a pipe.",
        ),
    ] = None,
) -> None:
    """Judge PRED against GT: structured discrepancies and the task's reward."""
    from .judge import Judge, build_request, read_pairs
    from .tasks import decoding, profile

    profile(task)
    if pairs is not None and (gt is not None or pred is not None):
        fail("give GT PRED or --pairs FILE, not both", ExitCode.INPUT)
    if pairs is None and (gt is None or pred is None):
        fail("give GT and PRED images (or --pairs FILE.jsonl)", ExitCode.INPUT)
    if pairs is None and out is not None:
        fail("--out goes with --pairs", ExitCode.INPUT)
    if pairs is not None and (prompt_file is not None or dry_run):
        fail("--prompt-file and --dry-run go with one pair, not --pairs", ExitCode.INPUT)
    if backend not in ("auto", "llamacpp", "transformers"):
        fail(f"unknown backend {backend!r}; choose auto, llamacpp or transformers", ExitCode.INPUT)
    if verbose:
        logging.getLogger("verm_local.llama_cpp").setLevel(logging.DEBUG)
    mode = "rl" if rl_sampling else sampling_mode
    overrides = dict(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        presence_penalty=presence_penalty,
        repeat_penalty=repetition_penalty,
        seed=seed,
    )

    def sampling_for(t: str):
        return decoding(t, mode, max_tokens).with_(**overrides)

    if pairs is not None:
        batch = read_pairs(pairs, task)  # a bad file fails before the model loads
        for t in {p["task"] for p in batch}:
            sampling_for(t)
    else:
        # The request is built (images checked) before the model loads: bad input fails fast.
        request = build_request(
            gt,
            pred,
            task,
            sampling=sampling_for(task),
            free=free,
            prompt_file=prompt_file,
            max_errors=max_errors,
            image_tokens=image_tokens,
            warn=dry_run,
        )
        if dry_run:
            _print_request(request.describe(), as_json)
            return
    show = (
        progress
        if progress is not None
        else (
            _verbosity["level"] >= 0
            and sys.stderr.isatty()
            and (not as_json or sys.stdout.isatty())
        )
    )
    with (
        _Progress(show, live=progress is None),
        stdout_to_stderr(),
        Judge(
            model,
            mmproj=mmproj,
            quant=quant,
            threads=threads,
            gpu_layers=gpu_layers,
            variant=variant,
            backend_name=backend,
            device=device,
            dtype=dtype,
            vision=vision,
            vision_model=vision_model,
            vision_precision=vision_precision,
            image_tokens=image_tokens,
            max_tokens=max_tokens,
            reward_scale=reward_scale,
            verbose=verbose,
            parallel=parallel if pairs is not None else 1,
            prefix_cache=2 if pairs is not None else 0,
            repack=repack,
            one_shot=pairs is None,
            kv_type=_kv_type(kv_type),
        ) as j,
    ):
        if pairs is not None:
            _judge_pairs(j, batch, out, free=free, max_errors=max_errors, sampling=sampling_for)
            return
        images = request.request.images
        result = j.judge(
            images[0],
            images[1],
            task,
            free=free,
            sampling=request.request.sampling,
            prompt_file=prompt_file,
            max_errors=max_errors,
        )
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        from .report import print_judgement

        print_judgement(result)
    if not result.complete:
        fail(
            f"incomplete judgement: {result.problem}; raise --max-tokens or lower --max-errors",
            ExitCode.INCOMPLETE,
        )


class _Progress:
    """Long work's stages on stderr: a live status line on a terminal, or a plain line per
    stage (`--progress` to a pipe). Listens to `events.stage`."""

    def __init__(self, enabled: bool, live: bool = True):
        self.enabled, self.live = enabled, live
        self.status = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from . import events

            if self.live:
                from rich.console import Console

                self.status = Console(stderr=True).status("starting ...")
                self.status.start()
            events.add_listener(self)
        return self

    def __call__(self, name: str, detail: dict) -> None:
        from .events import describe

        line = describe(name, detail)
        if self.status is not None:
            self.status.update(line)
        else:
            print(f"verm-local: {line}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            from . import events

            events.remove_listener(self)
        if self.status is not None:
            self.status.stop()


def _judge_pairs(j, batch, out: Optional[Path], **kwargs) -> None:
    """Judge every pair (grouped by ground truth) with a progress line; JSONL out."""
    import time

    from .judge import judge_file

    t0 = time.perf_counter()
    quiet = _verbosity["level"] < 0

    def progress(done: int, total: int) -> None:
        if quiet:
            return
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(
            f"\rjudged {done}/{total} pairs, {rate:.2f} pairs/s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    text, failed, incomplete = judge_file(j, batch, out, progress=progress, **kwargs)
    if not quiet:
        print(file=sys.stderr)
    if out is not None and (not quiet or failed):
        typer.echo(
            f"{len(batch) - failed} judged ({incomplete} incomplete), {failed} failed -> {out}",
            err=True,
        )
    else:
        sys.stdout.write(text)
    if failed:
        raise typer.Exit(ExitCode.ANSWER)
    if incomplete:
        raise typer.Exit(ExitCode.INCOMPLETE)


def _print_request(described: dict, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(described, indent=2, ensure_ascii=False))
        return
    from .report import print_request

    print_request(described)


# ---------------------------------------------------------------- serve


@app.command("serve")
def serve_cmd(
    model: ModelOpt = None,
    variant: VariantOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind (loopback unless told otherwise).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    parallel: Annotated[
        int,
        typer.Option("--parallel", min=1, max=64, help="Requests run at once in the loaded model."),
    ] = 4,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            help="Require `Authorization: Bearer KEY` on /v1 (default: VERM_LOCAL_API_KEY).",
        ),
    ] = None,
    max_image_bytes: Annotated[int, typer.Option("--max-image-bytes", min=1)] = 20 << 20,
    max_request_bytes: Annotated[int, typer.Option("--max-request-bytes", min=1)] = 64 << 20,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds per request.")
    ] = 300.0,
    queue_size: Annotated[
        int, typer.Option("--queue", min=1, help="Requests that may wait; more are answered 429.")
    ] = 64,
    prefix_cache: Annotated[
        int, typer.Option("--prefix-cache", min=0, help="Ground-truth prefixes kept evaluated.")
    ] = 4,
    image_tokens: ImageTokensOpt = None,
    max_tokens: Annotated[
        Optional[int],
        typer.Option("--max-tokens", min=1, help="Cap on answer tokens (default 8192)."),
    ] = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    repack: RepackOpt = None,
    vision: VisionOpt = "auto",
    allow_remote_images: Annotated[bool, typer.Option("--allow-remote-images")] = False,
    allow_local_images: Annotated[bool, typer.Option("--allow-local-images")] = False,
    served_name: Annotated[Optional[str], typer.Option("--served-model-name")] = None,
    engine: Annotated[
        str,
        typer.Option("--engine", help="llamacpp (in-process batches) | vllm (bf16/GPTQ on CUDA)"),
    ] = "llamacpp",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="--engine vllm: print the command.")
    ] = False,
) -> None:
    """OpenAI-compatible reward endpoint: /v1/chat/completions, /v1/judge, /health, /metrics."""
    from .server import ServeConfig, serve
    from .server.vllm import vllm_for
    from .settings import settings

    cfg = ServeConfig(
        model=model,
        variant=variant,
        host=host,
        port=port,
        parallel=parallel,
        api_key=api_key or settings().api_key,
        max_image_bytes=max_image_bytes,
        max_request_bytes=max_request_bytes,
        timeout=timeout,
        queue_size=queue_size,
        prefix_cache=prefix_cache,
        image_tokens=image_tokens,
        max_tokens=max_tokens,
        threads=threads,
        gpu_layers=gpu_layers,
        vision=vision,
        repack=repack,
        allow_remote_images=allow_remote_images,
        allow_local_images=allow_local_images,
        served_name=served_name,
    )
    if engine == "vllm":
        import shlex
        import shutil

        cmd = vllm_for(model, variant, cfg)
        if dry_run:
            typer.echo(shlex.join(cmd))
            return
        if shutil.which("vllm") is None:
            fail(
                "vLLM is not installed (pip install vllm, on a CUDA machine); --dry-run "
                "prints the command",
                ExitCode.PLAN,
            )
        os.execvp(cmd[0], cmd)
    if engine != "llamacpp":
        fail(f"unknown engine {engine!r}; choose llamacpp or vllm", ExitCode.INPUT)
    if dry_run:
        fail("--dry-run goes with --engine vllm", ExitCode.INPUT)
    show_progress()
    serve(cfg)


# ---------------------------------------------------------------- the store


@app.command("pull")
def pull_cmd(
    variant: Annotated[
        str,
        typer.Argument(
            help="A catalog variant (see `verm-local models --catalog`), or auto: the plan's."
        ),
    ] = "auto",
    repo: Annotated[
        Optional[str],
        typer.Option(
            "--repo", help="Repository of prebuilt quantized variants (default: $VERM_LOCAL_REPO)."
        ),
    ] = None,
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Branch, tag or commit.")
    ] = None,
    from_dir: Annotated[
        Optional[Path], typer.Option("--from", help="Import files you have (a `convert` output).")
    ] = None,
    device: DeviceOpt = None,
    prompts_only: Annotated[
        bool, typer.Option("--prompts-only", help="Only fetch the authors' training prompts.")
    ] = False,
    check: Annotated[
        bool,
        typer.Option("--check/--no-check", help="Load a pulled GGUF variant and run a few tokens."),
    ] = True,
    repack: RepackOpt = None,
    print_cache_key: Annotated[
        bool,
        typer.Option(
            "--cache-key",
            help="Print a CI cache key for the store (variant + its manifest's sha256) "
            "and pull nothing.",
        ),
    ] = False,
) -> None:
    """Fetch, build or import a variant into the store, verified, and the training
    prompts; print the variant's directory."""
    show_progress()
    from .runtime import plan_here
    from .store import cache_key, check_variant, pull, pull_prompts

    if prompts_only:
        typer.echo(str(pull_prompts(required=True)))
        return
    if variant == "auto":
        _, plan = plan_here(device=device)
        variant = plan.variant
        logging.getLogger("verm_local").info(
            "plan for this machine: %s on %s (%s)",
            plan.variant,
            plan.device,
            plan.reasons[-1] if plan.reasons else "",
        )
    if print_cache_key:
        typer.echo(cache_key(variant, repo=repo, revision=revision, from_dir=from_dir))
        return
    with stdout_to_stderr():
        path = pull(variant, repo=repo, revision=revision, from_dir=from_dir)
        pull_prompts(required=False)
        if check:
            check_variant(variant, path, repack)
    typer.echo(str(path))


@app.command("models")
def models_cmd(
    as_json: JsonOpt = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check every sha256 now.")] = False,
    catalog: Annotated[
        bool, typer.Option("--catalog", help="List every variant there is.")
    ] = False,
) -> None:
    """The variants in the store (VERM_LOCAL_HOME): size, path, verification state."""
    import json

    from .catalog import catalog_rows
    from .paths import home_dir
    from .select import default_n_ctx
    from .store import list_models

    rows = catalog_rows(default_n_ctx()) if catalog else list_models(verify=verify)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from .report import print_rows

    title = "catalog (sizes of the real 8B model)" if catalog else f"store: {home_dir()}"
    print_rows(rows, title)


@app.command("rm")
def rm_cmd(
    variant: Annotated[str, typer.Argument(help="Variant to remove from the store.")],
) -> None:
    """Remove a variant from the store."""
    from .store import remove

    typer.echo(f"removed {remove(variant)}")


@app.command("doctor")
def doctor_cmd(
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    variant: VariantOpt = None,
    hardware: Annotated[
        Optional[Path],
        typer.Option(
            "--hardware",
            help="Plan for a recorded machine (doctor --json output or its 'hardware' part).",
        ),
    ] = None,
    repack: RepackOpt = None,
) -> None:
    """What this machine has, the plan for it and why, and verm-local's settings."""
    import json

    from .doctor import doctor
    from .hardware import Hardware

    report = doctor(device, variant, hardware, repack)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from .report import print_doctor
    from .select import Plan

    path = report["store"]["path"]
    print_doctor(
        Hardware.from_dict(report["hardware"]),
        Plan.from_dict(report["plan"]),
        Path(path) if path else None,
        report["settings"],
    )


# ---------------------------------------------------------------- benchmarks


@bench_data_app.command("synthetic")
def bench_data_synthetic_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Where to write data.jsonl and images/.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Pairs to draw.")] = 12,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    tasks: Annotated[str, typer.Option("--tasks")] = "chart,table,svg",
) -> None:
    """Labelled pairs drawn offline with known injected errors (deterministic per seed)."""
    show_progress()
    from .benchmarks.data import synthetic

    typer.echo(str(synthetic(out_dir, n=n, seed=seed, tasks=tuple(_split(tasks)))))


@bench_app.command("agreement")
def bench_agreement_cmd(
    reference: Annotated[str, typer.Option("--reference", help="Variant name or path (bf16).")],
    candidates: Annotated[
        str,
        typer.Option(
            "--candidates",
            help="Comma-separated variants/paths; MODEL#onnx-int8 (or #onnx, "
            "#onnx-fp32, #onnx-fp16, #gguf) picks the vision path a GGUF "
            "candidate runs with.",
        ),
    ],
    data: Annotated[
        str, typer.Option("--data", help="VC-RewardBench-layout dir or hub dataset id.")
    ],
    limit: Annotated[Optional[int], typer.Option("--limit", min=1)] = None,
    out: Annotated[Path, typer.Option("--out")] = Path("bench-agreement"),
    free: Annotated[
        bool, typer.Option("--free", help="Unconstrained answers (JSON validity).")
    ] = False,
    matcher_url: Annotated[
        Optional[str],
        typer.Option("--matcher-url", help="OpenAI-compatible base URL for LLM matching."),
    ] = None,
    matcher_model: Annotated[str, typer.Option("--matcher-model")] = "default",
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k", min=0, help="Reference log-probs kept per token (0 = all: exact KL)."
        ),
    ] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    image_tokens: ImageTokensOpt = None,
    max_tokens: MaxTokensOpt = None,
    max_errors: Annotated[
        Optional[int],
        typer.Option("--max-errors", min=0, help="Cap each constrained answer's error list."),
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Token- and judgement-level agreement of candidates with the reference (and humans)."""
    show_progress()
    from .benchmarks.agreement import markdown, run_agreement

    with stdout_to_stderr():
        report = run_agreement(
            reference,
            _split(candidates),
            data,
            limit=limit,
            out=out,
            free=free,
            matcher_url=matcher_url,
            matcher_model=matcher_model,
            top_k=top_k,
            seed=seed,
            image_tokens=image_tokens,
            max_tokens=max_tokens,
            threads=threads,
            max_errors=max_errors,
        )
    typer.echo(markdown(report))
    typer.echo(f"reports: {out}/agreement.json, agreement.md, agreement.png, results/")


@bench_app.command("latency")
def bench_latency_cmd(
    models: Annotated[str, typer.Option("--models", help="Comma-separated variants/paths.")],
    images: Annotated[tuple[Path, Path], typer.Option("--images", help="GT PRED")],
    task: TaskOpt = "chart",
    repeat: Annotated[int, typer.Option("--repeat", min=1)] = 3,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="FILE.json (or a directory).")
    ] = None,
    baseline: Annotated[
        Optional[Path],
        typer.Option(
            "--baseline",
            help="A stored latency.json to gate against: each ratio's interval against "
            "baseline x (1 + tolerance).",
            rich_help_panel="CI gate",
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance", min=0.0, help="Allowed slowdown of a ratio.", rich_help_panel="CI gate"
        ),
    ] = 0.10,
    update_baseline: Annotated[
        bool,
        typer.Option(
            "--update-baseline",
            help="Write this run as the new --baseline file (on purpose: no gate is run).",
            rich_help_panel="CI gate",
        ),
    ] = False,
    junit: Annotated[
        Optional[Path],
        typer.Option(
            "--junit",
            help="Write the gate as JUnit XML (one test case per gated ratio).",
            rich_help_panel="CI gate",
        ),
    ] = None,
    fail_inconclusive: Annotated[
        bool,
        typer.Option(
            "--fail-inconclusive",
            help="Exit 1 when the gate is inconclusive (default: exit 8, not a failure).",
            rich_help_panel="CI gate",
        ),
    ] = False,
    threads: ThreadsOpt = None,
    image_tokens: ImageTokensOpt = None,
    max_tokens: MaxTokensOpt = None,
    no_llamacpp: Annotated[
        bool, typer.Option("--no-llamacpp", help="Skip timing llama.cpp's own path.")
    ] = False,
    predictions: Annotated[
        int,
        typer.Option(
            "--predictions",
            min=0,
            max=64,
            help="Also time N predictions against GT: N independent judge calls vs one "
            "shared-prefix batch.",
        ),
    ] = 0,
    rl_sampling: Annotated[
        bool,
        typer.Option(
            "--rl-sampling",
            help="--predictions: sample as the authors' RL does for the task "
            "(seeded), not the judging default.",
        ),
    ] = False,
    repack: RepackOpt = None,
    compare_repack: Annotated[
        bool,
        typer.Option(
            "--compare-repack",
            help="Also time each GGUF model with and without repacked weights, side by side.",
        ),
    ] = False,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="One default judgement per GGUF model in a fresh process: peak RSS and its "
            "parts, RSS at each stage, TTFT.",
        ),
    ] = True,
    serve_parallel: Annotated[
        int,
        typer.Option(
            "--serve-parallel",
            min=0,
            max=64,
            help="Also the model worker's peak RSS under `serve --parallel N` (0: not).",
        ),
    ] = 0,
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep",
            help="The prefill settings side by side (n_ubatch, flash attention, KV type, "
            "vision path), one default judgement each.",
        ),
    ] = False,
    timed: Annotated[
        bool, typer.Option("--timed/--no-timed", help="The repeated timing runs.")
    ] = True,
) -> None:
    """Per-stage latency and memory, with llama.cpp's own path as a ratio; a CI gate.

    Exit codes of the gate: 0 pass, 1 regression, 8 inconclusive (the noise is wider than
    the tolerance; 1 with --fail-inconclusive), 2 bad input."""
    show_progress()
    from .benchmarks.latency import load_baseline, markdown, run_latency, write_reports
    from .images import check_image
    from .tasks import profile

    profile(task)
    for p in images:
        check_image(p)  # a bad image (or an SVG file) fails here, in one line
    base = None
    if update_baseline:
        if baseline is None:
            fail("--update-baseline needs --baseline FILE: the file to write", ExitCode.INPUT)
        if not timed:
            fail("--update-baseline needs the timed runs (not --no-timed)", ExitCode.INPUT)
    elif baseline is not None:
        if not baseline.is_file():
            fail(
                f"{baseline}: no such baseline; make one on purpose with "
                f"--baseline {baseline} --update-baseline",
                ExitCode.INPUT,
            )
        base = load_baseline(baseline)
        if out is not None and out.resolve() in (baseline.resolve(), baseline.resolve().parent):
            fail("--out would overwrite the --baseline file; use --update-baseline", ExitCode.INPUT)
    report = run_latency(
        _split(models),
        str(images[0]),
        str(images[1]),
        task=task,
        repeat=repeat,
        threads=threads,
        image_tokens=image_tokens,
        max_tokens=max_tokens,
        stock=not no_llamacpp,
        predictions=predictions,
        rl_sampling=rl_sampling,
        repack=repack,
        compare_repack=compare_repack,
        memory=memory,
        serve_parallel=serve_parallel,
        sweep=sweep,
        timed=timed,
    )
    from .fileio import write_json_atomic

    table = markdown(report)
    typer.echo(table)
    if out is not None:
        typer.echo(f"report: {write_reports(report, out)}")
    if update_baseline:
        assert baseline is not None
        baseline.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(baseline, report)
        typer.echo(f"baseline written: {baseline}")
        return
    if base is None:
        return
    _latency_gate(report, base, baseline, tolerance, table, junit, fail_inconclusive)


def _latency_gate(
    report: dict,
    base: dict,
    baseline: Path,
    tolerance: float,
    table: str,
    junit: Optional[Path],
    fail_inconclusive: bool,
) -> None:
    """Gate `report` against `base`: the verdict on stdout and stderr, in the JUnit file
    and the GitHub step summary when asked; the exit code says which."""
    from .benchmarks.gate import INCONCLUSIVE, REGRESSION, evaluate, junit_xml, summary_markdown
    from .settings import settings

    result = evaluate(report, base, tolerance)
    report["gate"] = result.to_dict()
    for check in result.checks:
        typer.echo(f"{check.verdict}: {check.line()}", err=check.verdict != "pass")
    for missing in result.missing:
        typer.echo(f"inconclusive: {missing}: in the baseline, not measured", err=True)
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(result), encoding="utf-8")
    summary = settings().github_step_summary
    if summary is not None:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(table + "\n" + summary_markdown(result, baseline) + "\n")
    if result.verdict == REGRESSION:
        n = sum(c.verdict == REGRESSION for c in result.checks)
        fail(
            f"{n} latency regression(s) beyond {tolerance:.0%} against {baseline}",
            ExitCode.REGRESSION,
        )
    if result.verdict == INCONCLUSIVE:
        fail(
            f"inconclusive against {baseline}: the noise is wider than the tolerance "
            f"{tolerance:.0%} allows to decide (more --repeat, or a quieter machine)",
            ExitCode.REGRESSION if fail_inconclusive else ExitCode.INCONCLUSIVE,
        )
    typer.echo(f"pass: no regression beyond {tolerance:.0%} against {baseline}")


@bench_app.command("serve")
def bench_serve_cmd(
    model: Annotated[
        str, typer.Option("--model", "-m", help="A GGUF model (file or `convert gguf` directory).")
    ],
    workloads: Annotated[
        str,
        typer.Option(
            "--workloads",
            help="Comma-separated: shared (one ground truth per round), "
            "independent, schema (the answer schema, natural lengths).",
        ),
    ] = "shared,independent",
    clients: Annotated[int, typer.Option("--clients", min=1)] = 8,
    requests: Annotated[int, typer.Option("--requests", min=1)] = 32,
    answer_tokens: Annotated[
        int,
        typer.Option("--answer-tokens", min=1, help="Answer length, forced alike on both engines."),
    ] = 128,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64)] = 8,
    image_size: Annotated[
        tuple[int, int], typer.Option("--image-size", help="W H of the drawn charts.")
    ] = (512, 384),
    llama_server: Annotated[
        Optional[Path],
        typer.Option(
            "--llama-server",
            help="A llama-server binary (default: built once from the runtime's sdist).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    repack: RepackOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="FILE.json.")] = None,
) -> None:
    """verm-local's serving engine against llama.cpp's llama-server: same model, same load."""
    show_progress()
    from .benchmarks.serve import markdown, run_serve_bench
    from .fileio import write_json_atomic

    report = run_serve_bench(
        model,
        workloads=_split(workloads),
        clients=clients,
        requests=requests,
        answer_tokens=answer_tokens,
        parallel=parallel,
        threads=threads,
        image_size=image_size,
        llama_server=llama_server,
        repack=repack,
    )
    typer.echo(markdown(report))
    if out is not None:
        write_json_atomic(out, report)
        out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
        typer.echo(f"report: {out}")


# ---------------------------------------------------------------- convert


def _echo_files(out_dir: Path, entries: list[dict], label) -> None:
    """One line per file a converter wrote: label, size, sha256 prefix, path."""
    for e in entries:
        typer.echo(
            f"{label(e)}  {e['size'] / 1e6:8.1f} MB  {e['sha256'][:12]}  {out_dir / e['file']}"
        )


@convert_app.command("tiny-model")
def tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the HF checkpoint.")],
    seed: Annotated[int, typer.Option("--seed", help="Weights are deterministic for a seed.")] = 0,
    shape: Annotated[
        str,
        typer.Option(
            "--shape",
            help="tiny (tests) | 8b-vision | 8b | 8b-text4 (real shapes, for speed work).",
        ),
    ] = "tiny",
) -> None:
    """Write a tiny random-weight Qwen3-VL checkpoint with the real Qwen2 tokenizer."""
    show_progress()
    from .convert.tiny_model import build_tiny_model

    typer.echo(str(build_tiny_model(out_dir, seed=seed, shape=shape)))


@convert_app.command("gguf")
def gguf_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face Qwen3-VL checkpoint.")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory.")],
    quant: Annotated[
        str,
        typer.Option(
            "--quant", help="Comma-separated quants beside F16 (Q8_0,Q6_K,Q5_K_M,Q4_K_M)."
        ),
    ] = "Q8_0,Q4_K_M",
    mmproj_type: Annotated[
        str, typer.Option("--mmproj-type", help="f16 | bf16 | q8_0 | f32")
    ] = "f16",
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check", help="Load each written model and run a few tokens here."
        ),
    ] = True,
    repack: RepackOpt = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the converter's own output.")
    ] = False,
) -> None:
    """Convert to GGUF (F16 + quants) and mmproj, with a sha256 manifest."""
    show_progress()
    from .convert.gguf import convert_gguf, parse_quants

    manifest = convert_gguf(
        hf_dir,
        out_dir,
        parse_quants(quant),
        mmproj_type,
        verbose=verbose,
        check=check,
        repack=repack,
    )
    _echo_files(out_dir, manifest["files"], lambda e: f"{e['quant']:>7}")


@convert_app.command("gptq")
def gptq_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face Qwen3-VL checkpoint (bf16).")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory.")],
    bits: Annotated[int, typer.Option("--bits", help="4 or 8.")] = 4,
    group_size: Annotated[
        int, typer.Option("--group-size", help="Columns per scale (-1 = per row).")
    ] = 128,
    calibration: Annotated[
        str,
        typer.Option(
            "--calibration",
            help="'synthetic' (drawn chart/table/SVG pairs) or a directory in "
            "VC-RewardBench layout.",
        ),
    ] = "synthetic",
    samples: Annotated[int, typer.Option("--samples", help="Calibration conversations.")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Quantize the language model to GPTQ int4/int8 with GPTQModel, with a manifest."""
    show_progress()
    from .convert.gptq import convert_gptq

    manifest = convert_gptq(
        hf_dir,
        out_dir,
        bits=bits,
        group_size=group_size,
        calibration=calibration,
        samples=samples,
        seed=seed,
    )
    _echo_files(
        out_dir, [e for e in manifest["files"] if e["kind"] == "weights"], lambda e: e["quant"]
    )


@convert_app.command("onnx")
def onnx_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face Qwen3-VL checkpoint.")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory (e.g. <gguf dir>/onnx).")],
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | int8")] = "fp32",
) -> None:
    """Export the vision tower (with deepstack outputs) to ONNX for ONNX Runtime."""
    show_progress()
    from .convert.onnx import convert_onnx

    manifest = convert_onnx(hf_dir, out_dir, precision)
    _echo_files(
        out_dir, [e for e in manifest["files"] if e["file"].endswith(".onnx")], lambda e: precision
    )


@app.command("version")
def version_cmd() -> None:
    """Print versions of verm-local and llama-cpp-python."""
    from . import __version__
    from .convert.llama_sources import runtime_version

    typer.echo(f"verm-local {__version__}; llama-cpp-python {runtime_version()}")


# ---------------------------------------------------------------- entry point

# Commands that run their own processes and signal handling (uvicorn, model workers):
# not run under the crash supervisor.
UNSUPERVISED = {"serve"}


class _LineFormatter(logging.Formatter):
    """`verm-local: message` for information, `verm-local: warning: message` and up."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"verm-local: {record.levelname.lower()}: {msg}"
        return f"verm-local: {msg}"


def setup_logging(level: int | None = None) -> None:
    """The CLI alone decides what reaches the terminal: the `verm_local` logger's records
    as one line each on stderr (warnings and up by default, more with -v or for long
    work); llama.cpp's own log only with -vv or judge --verbose."""
    root = logging.getLogger("verm_local")
    if not any(isinstance(h.formatter, _LineFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LineFormatter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level or logging.WARNING)
    # llama.cpp's errors reach the user inside verm-local's one-line errors.
    logging.getLogger("verm_local.llama_cpp").setLevel(logging.CRITICAL)


def hoist_quiet(argv: list[str]) -> list[str]:
    """`-q`/`--quiet` belong to the app, but people type them after the verb too
    (`verm-local judge gt.png pred.png -q`); no verb has an option of that name, so move
    them in front of it. Arguments after `--` stay as they are."""
    end = argv.index("--") if "--" in argv else len(argv)
    quiet = [a for a in argv[:end] if a in ("-q", "--quiet")]
    rest = [a for a in argv[:end] if a not in ("-q", "--quiet")]
    return quiet + rest + argv[end:]


def run() -> int:
    """Run the app in this process; user errors become one line and their exit code."""
    from .settings import settings

    setup_logging()
    try:
        app(args=hoist_quiet(sys.argv[1:]))
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except VermError as exc:
        typer.echo(f"verm-local: error: {exc}", err=True)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("verm-local: interrupted", err=True)
        return int(ExitCode.INTERRUPTED)
    except MemoryError:
        typer.echo(
            "verm-local: error: out of memory; try a smaller quant or --image-tokens", err=True
        )
        return int(ExitCode.MODEL)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        try:
            debug = settings().debug
        except VermError:
            debug = False
        if debug:
            raise
        typer.echo(
            f"verm-local: internal error: {exc.__class__.__name__}: {exc} "
            "(set VERM_LOCAL_DEBUG=1 for a traceback)",
            err=True,
        )
        return int(ExitCode.INTERNAL)
    return 0


def main() -> None:
    """Entry point. Each command runs in a supervised child, so a native crash (llama.cpp,
    ONNX Runtime, torch) ends as one line and `ExitCode.NATIVE_CRASH`, not a silent 139."""
    from .crash import supervise

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    verb = " ".join(args[:2] if args[:1] in (["convert"], ["bench"]) else args[:1])
    if not args or args[0] in UNSUPERVISED:
        sys.exit(run())
    sys.exit(supervise(run, f"verm-local {verb}"))


if __name__ == "__main__":
    main()
