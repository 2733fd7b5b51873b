"""`verm-local` command line. Thin: each verb's logic lives in its own module."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import ExitCode, VermError
from .stdio import stdout_to_stderr

app = typer.Typer(
    name="verm-local",
    help="Quantized, verified local inference for the Visual-ERM reward model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
convert_app = typer.Typer(
    help="Build models: tiny test model, GGUF conversion and quants.", no_args_is_help=True
)
app.add_typer(convert_app, name="convert")
bench_app = typer.Typer(
    help="Benchmarks: labelled data, agreement with the reference, latency.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")

_verbosity = {"level": 0}


@app.callback()
def _options(
    verbose: int = typer.Option(
        0,
        "--verbose",
        "-v",
        count=True,
        help="More on stderr: -v progress and details, -vv llama.cpp's own log too.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only on stderr."),
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


bench_data_app = typer.Typer(
    help="Benchmark data in VC-RewardBench's layout.", no_args_is_help=True
)
bench_app.add_typer(bench_data_app, name="data")


def fail(message: str, code: int) -> None:
    """One clear line on stderr and a non-zero exit; never a traceback."""
    typer.echo(f"verm-local: error: {message}", err=True)
    raise typer.Exit(code)


@app.command("judge")
def judge_cmd(
    gt: Optional[Path] = typer.Argument(
        None, help="Ground-truth image (shown to the model first)."
    ),
    pred: Optional[Path] = typer.Argument(None, help="Image rendered from the prediction."),
    pairs: Optional[Path] = typer.Option(
        None,
        "--pairs",
        help="Batch mode: a JSONL file of {gt, pred, task[, id]} (or "
        "VC-RewardBench's gt_img_path, pred_img_path, category).",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="--pairs: write the judgements here (JSONL)."
    ),
    parallel: int = typer.Option(
        4, "--parallel", min=1, help="--pairs: predictions judged at once per ground truth."
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="A .gguf file, a `convert` directory or an HF "
        "checkpoint (default: the planned variant "
        "from the store).",
    ),
    variant: Optional[str] = typer.Option(
        None, "--variant", help="Store variant to use instead of the plan's."
    ),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Vision projector GGUF."),
    quant: Optional[str] = typer.Option(
        None, "--quant", help="Quant to use from a model directory."
    ),
    task: str = typer.Option("chart", "--task", "-t", help="chart | table | svg"),
    as_json: bool = typer.Option(False, "--json", help="Print the Judgement as JSON."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the exact request (messages, image sizes and "
        "encoding, schema, decoding, prompt source) without "
        "loading a model.",
    ),
    free: bool = typer.Option(
        False, "--free", help="Do not constrain the answer to the JSON schema."
    ),
    max_tokens: Optional[int] = typer.Option(
        None,
        "--max-tokens",
        min=1,
        help="Answer cap (default: the trained one, 4096 chart/svg, 8192 table).",
    ),
    max_errors: Optional[int] = typer.Option(
        None,
        "--max-errors",
        min=0,
        help="Cap the constrained error list (default: what fits the token cap).",
    ),
    backend: str = typer.Option(
        "auto", "--backend", help="auto | llamacpp | transformers (auto: by model format)."
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="cuda | metal | cpu (default: planned)."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="transformers: auto | float32 | bfloat16."
    ),
    vision: str = typer.Option(
        "auto", "--vision", help="GGUF: auto | gguf (mmproj) | onnx (ONNX Runtime tower)."
    ),
    vision_model: Optional[Path] = typer.Option(
        None, "--vision-model", help="`convert onnx` output (default: <model>/onnx)."
    ),
    vision_precision: Optional[str] = typer.Option(
        None, "--vision-precision", help="fp32 | fp16 | int8 (default: first found)."
    ),
    sampling_mode: str = typer.Option(
        "default",
        "--sampling",
        help="default (greedy; table with its repetition "
        "penalty 1.05) | greedy | rl (the authors' RL "
        "decoding per task).",
    ),
    rl_sampling: bool = typer.Option(
        False, "--rl-sampling", hidden=True, help="Same as --sampling rl."
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", min=0.0, help="Override the decoding's temperature (0 = greedy)."
    ),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    presence_penalty: Optional[float] = typer.Option(None, "--presence-penalty"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    gpu_layers: Optional[int] = typer.Option(
        None, "--gpu-layers", help="Layers to offload (-1 = all; default: planned)."
    ),
    repack: Optional[bool] = typer.Option(
        None,
        "--repack/--no-repack",
        help="llama.cpp weight repacking / AMX buffers "
        "(default: off on AMX CPUs, else on; "
        "VERM_LOCAL_REPACK).",
    ),
    image_tokens: Optional[int] = typer.Option(
        None,
        "--image-tokens",
        min=1,
        help="Cap visual tokens per image below the task's trained size (costs fidelity).",
    ),
    reward_scale: Optional[float] = typer.Option(
        None, "--reward-scale", help="S divisor of the reward (default 50)."
    ),
    prompt_file: Optional[Path] = typer.Option(
        None, "--prompt-file", help="Prompt text, or JSON keyed by task."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own logs."),
) -> None:
    """Judge PRED against GT: structured discrepancies and a reward."""
    from .judge import Judge, build_request, read_pairs
    from .tasks import decoding, profile

    profile(task)
    if pairs is not None and (gt is not None or pred is not None):
        fail("give GT PRED or --pairs FILE, not both", 2)
    if pairs is None and (gt is None or pred is None):
        fail("give GT and PRED images (or --pairs FILE.jsonl)", 2)
    if pairs is None and out is not None:
        fail("--out goes with --pairs", 2)
    if pairs is not None and (prompt_file is not None or dry_run):
        fail("--prompt-file and --dry-run go with one pair, not --pairs", 2)
    if backend not in ("auto", "llamacpp", "transformers"):
        fail(f"unknown backend {backend!r}; choose auto, llamacpp or transformers", 2)
    if verbose:
        _verbose_native()
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
        for p in {p["task"] for p in batch}:
            sampling_for(p)
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
            image_token_budget=image_tokens,
            warn=dry_run,
        )
        if dry_run:
            _print_request(request.describe(), as_json)
            return
    with (
        stdout_to_stderr(),
        Judge(
            model,
            mmproj=mmproj,
            quant=quant,
            threads=threads,
            n_gpu_layers=gpu_layers,
            variant=variant,
            backend_name=backend,
            device=device,
            dtype=dtype,
            vision=vision,
            vision_model=vision_model,
            vision_precision=vision_precision,
            image_token_budget=image_tokens,
            max_tokens=max_tokens,
            reward_scale=reward_scale,
            verbose=verbose,
            parallel=parallel if pairs is not None else 1,
            prefix_cache=2 if pairs is not None else 0,
            repack=repack,
        ) as j,
    ):
        if pairs is not None:
            _judge_pairs(j, batch, out, free=free, max_errors=max_errors, sampling_for=sampling_for)
            return
        result = j.judge(
            request.request.images[0],
            request.request.images[1],
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


def _print_request(described: dict, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(described, indent=2, ensure_ascii=False))
        return
    from .report import print_request

    print_request(described)


def _verbose_native() -> None:
    """--verbose: llama.cpp's own logs on stderr."""
    import logging

    logging.getLogger("verm_local.llama_cpp").setLevel(logging.DEBUG)


def _judge_pairs(j, batch, out: Optional[Path], sampling_for, **kwargs) -> None:
    """Judge every pair (grouped by ground truth), with a progress line; JSONL out."""
    import json
    import time

    from .fileio import atomic_output

    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(
            f"\rjudged {done}/{total} pairs, {rate:.2f} pairs/s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    results = j.judge_many(
        [(p["gt"], p["pred"], p["task"]) for p in batch],
        progress=progress,
        sampling=sampling_for,
        **kwargs,
    )
    print(file=sys.stderr)
    lines, failed = [], 0
    for p, r in zip(batch, results):
        if isinstance(r, Exception):
            failed += 1
            row = {"id": p["id"], "task": p["task"], "error": str(r)}
        else:
            row = {"id": p["id"], **r.model_dump(mode="json")}
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(text, encoding="utf-8")
        typer.echo(f"{len(batch) - failed} judged, {failed} failed -> {out}", err=True)
    else:
        sys.stdout.write(text)
    if failed:
        raise typer.Exit(4)


@app.command("serve")
def serve_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Model to serve (default: the planned variant)."
    ),
    variant: Optional[str] = typer.Option(None, "--variant", help="Store variant to serve."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind (loopback unless told otherwise)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    parallel: int = typer.Option(
        4, "--parallel", min=1, max=64, help="Requests run at once in the loaded model."
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        help="Require `Authorization: Bearer KEY` on /v1 (default: VERM_LOCAL_API_KEY).",
    ),
    max_image_bytes: int = typer.Option(20 << 20, "--max-image-bytes", min=1),
    max_request_bytes: int = typer.Option(64 << 20, "--max-request-bytes", min=1),
    timeout: float = typer.Option(300.0, "--timeout", min=0.1, help="Seconds per request."),
    queue_size: int = typer.Option(
        64, "--queue", min=1, help="Requests that may wait; more are answered 429."
    ),
    prefix_cache: int = typer.Option(
        4, "--prefix-cache", min=0, help="Ground-truth prefixes kept evaluated."
    ),
    image_tokens: Optional[int] = typer.Option(
        None,
        "--image-tokens",
        min=1,
        help="Cap on visual tokens per image (chat images: 1024 when unset).",
    ),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help="Cap on answer tokens (default 8192)."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers"),
    repack: Optional[bool] = typer.Option(
        None, "--repack/--no-repack", help="llama.cpp weight repacking / AMX buffers."
    ),
    vision: str = typer.Option("auto", "--vision", help="auto | gguf | onnx"),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images"),
    allow_local_images: bool = typer.Option(False, "--allow-local-images"),
    served_name: Optional[str] = typer.Option(None, "--served-model-name"),
    engine: str = typer.Option(
        "llamacpp", "--engine", help="llamacpp (in-process batches) | vllm (bf16/GPTQ on CUDA)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="--engine vllm: print the command."),
) -> None:
    """OpenAI-compatible reward endpoint: /v1/chat/completions, /v1/judge, /health, /metrics."""

    from .server import ServeConfig, serve, vllm_command
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
        import shutil

        from .modelref import resolve_model

        if model is None:
            from .paths import installed

            name = variant or "bf16"
            path = installed(name)
            if path is None:
                fail(f"{name} is not in the store; run: verm-local pull {name} (or --model DIR)", 3)
            model = str(path)
        resolved = resolve_model(model)
        if resolved.format == "gguf":
            fail(
                f"{model}: vLLM serves the bf16 or GPTQ checkpoint, not GGUF "
                "(use --engine llamacpp)",
                2,
            )
        cmd = vllm_command(
            resolved.path, cfg, resolved.quant if resolved.format == "gptq" else None
        )
        if dry_run:
            import shlex

            typer.echo(shlex.join(cmd))
            return
        if shutil.which("vllm") is None:
            fail(
                "vLLM is not installed (pip install vllm, on a CUDA machine); "
                "--dry-run prints the command",
                5,
            )
        os.execvp(cmd[0], cmd)
    if engine != "llamacpp":
        fail(f"unknown engine {engine!r}; choose llamacpp or vllm", 2)
    if dry_run:
        fail("--dry-run goes with --engine vllm", 2)
    show_progress()
    serve(cfg)


@app.command("pull")
def pull_cmd(
    variant: str = typer.Argument(
        "auto", help="A catalog variant (see `verm-local models --catalog`), or auto: the plan's."
    ),
    repo: Optional[str] = typer.Option(
        None,
        "--repo",
        help="Repository of prebuilt quantized variants (default: $VERM_LOCAL_REPO).",
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit."),
    from_dir: Optional[Path] = typer.Option(
        None, "--from", help="Import files you have (a `convert` output)."
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="Plan for cuda | metal | cpu (with auto)."
    ),
    prompts_only: bool = typer.Option(
        False, "--prompts-only", help="Only fetch the authors' training prompts."
    ),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Load a pulled GGUF variant and run a few tokens."
    ),
    repack: Optional[bool] = typer.Option(
        None, "--repack/--no-repack", help="llama.cpp weight repacking for the check."
    ),
) -> None:
    """Fetch, build or import a variant into the store, verified, and the training prompts;
    print the variant's directory."""
    show_progress()
    from .runtime import plan_here
    from .store import pull, pull_prompts

    if prompts_only:
        typer.echo(str(pull_prompts(required=True)))
        return
    if variant == "auto":
        _, plan = plan_here(device=device)
        variant = plan.variant
        typer.echo(
            f"verm-local: plan for this machine: {plan.variant} on {plan.device} "
            f"({plan.reasons[-1] if plan.reasons else ''})",
            err=True,
        )
    with stdout_to_stderr():
        path = pull(variant, repo=repo, revision=revision, from_dir=from_dir)
        pull_prompts(required=False)
        if check:
            from .store import check_variant

            check_variant(variant, path, repack)
    typer.echo(str(path))


@app.command("models")
def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(False, "--verify", help="Check every sha256 now."),
    catalog: bool = typer.Option(False, "--catalog", help="List every variant there is."),
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
def rm_cmd(variant: str = typer.Argument(..., help="Variant to remove from the store.")) -> None:
    """Remove a variant from the store."""
    from .store import remove

    typer.echo(f"removed {remove(variant)}")


@app.command("doctor")
def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda | metal | cpu"),
    variant: Optional[str] = typer.Option(None, "--variant"),
    hardware: Optional[Path] = typer.Option(
        None,
        "--hardware",
        help="Plan for a recorded machine (doctor --json output or its 'hardware' part).",
    ),
    repack: Optional[bool] = typer.Option(
        None, "--repack/--no-repack", help="Plan with llama.cpp weight repacking forced on or off."
    ),
) -> None:
    """What this machine has, the plan for it and why, and verm-local's settings."""
    import json

    from .hardware import Hardware, probe
    from .paths import installed
    from .runtime import plan_here
    from .settings import describe, settings

    if hardware is not None:
        try:
            data = json.loads(hardware.read_text(encoding="utf-8"))
            hw = Hardware.from_dict(data.get("hardware", data))
        except (OSError, ValueError, TypeError) as exc:
            fail(f"{hardware}: not a hardware record ({exc.__class__.__name__})", 2)
    else:
        hw = probe(with_torch=True)
    _, plan = plan_here(
        device, variant, hardware=hw, repack=repack if repack is not None else settings().repack
    )
    path = installed(plan.variant)
    out = {
        "hardware": hw.to_dict(),
        "plan": plan.to_dict(),
        "decisions": {"repack": {"enabled": plan.repack, "reason": plan.repack_reason}},
        "store": {"variant": plan.variant, "path": str(path) if path else None},
        "settings": describe(),
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    from .report import print_doctor

    print_doctor(hw, plan, path, out["settings"])


def _split(spec: str) -> list[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


@bench_data_app.command("synthetic")
def bench_data_synthetic_cmd(
    out_dir: Path = typer.Argument(..., help="Where to write data.jsonl and images/."),
    n: int = typer.Option(12, "--n", min=1, help="Pairs to draw."),
    seed: int = typer.Option(0, "--seed"),
    tasks: str = typer.Option("chart,table,svg", "--tasks"),
) -> None:
    """Labelled pairs drawn offline with known injected errors (deterministic per seed)."""
    show_progress()
    from .benchmarks.data import synthetic

    typer.echo(str(synthetic(out_dir, n=n, seed=seed, tasks=tuple(_split(tasks)))))


@bench_app.command("agreement")
def bench_agreement_cmd(
    reference: str = typer.Option(..., "--reference", help="Variant name or path (bf16)."),
    candidates: str = typer.Option(
        ...,
        "--candidates",
        help="Comma-separated variants/paths; MODEL#onnx-int8 (or #onnx, #onnx-fp32, "
        "#onnx-fp16, #gguf) picks the vision path a GGUF candidate runs with.",
    ),
    data: str = typer.Option(..., "--data", help="VC-RewardBench-layout dir or hub dataset id."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1),
    out: Path = typer.Option(Path("bench-agreement"), "--out"),
    free: bool = typer.Option(False, "--free", help="Unconstrained answers (JSON validity)."),
    matcher_url: Optional[str] = typer.Option(
        None, "--matcher-url", help="OpenAI-compatible base URL for LLM matching."
    ),
    matcher_model: str = typer.Option("default", "--matcher-model"),
    top_k: int = typer.Option(
        32, "--top-k", min=0, help="Reference log-probs kept per token (0 = all: exact KL)."
    ),
    seed: int = typer.Option(0, "--seed"),
    image_tokens: Optional[int] = typer.Option(
        None,
        "--image-tokens",
        min=1,
        help="Cap visual tokens per image (default: the task's trained size).",
    ),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help="Answer cap (default: the task's)."
    ),
    max_errors: Optional[int] = typer.Option(
        None, "--max-errors", min=0, help="Cap each constrained answer's error list."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
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
    models: str = typer.Option(..., "--models", help="Comma-separated variants/paths."),
    images: tuple[Path, Path] = typer.Option(..., "--images", help="GT PRED"),
    task: str = typer.Option("chart", "--task"),
    repeat: int = typer.Option(3, "--repeat", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="FILE.json (or a directory)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="A stored latency.json."),
    tolerance: float = typer.Option(0.10, "--tolerance", min=0.0),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    image_tokens: Optional[int] = typer.Option(
        None,
        "--image-tokens",
        min=1,
        help="Cap visual tokens per image (default: the task's trained size).",
    ),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help="Answer cap (default: the task's)."
    ),
    no_llamacpp: bool = typer.Option(
        False, "--no-llamacpp", help="Skip timing llama.cpp's own path."
    ),
    predictions: int = typer.Option(
        0,
        "--predictions",
        min=0,
        max=64,
        help="Also time N predictions against GT: N independent "
        "judge calls vs one shared-prefix batch.",
    ),
    rl_sampling: bool = typer.Option(
        False,
        "--rl-sampling",
        help="--predictions: sample as the authors' RL does for "
        "the task (seeded), not the judging default.",
    ),
    repack: Optional[bool] = typer.Option(
        None,
        "--repack/--no-repack",
        help="llama.cpp weight repacking for every run (default: decided from the CPU).",
    ),
    compare_repack: bool = typer.Option(
        False,
        "--compare-repack",
        help="Also time each GGUF model with and without repacked weights, side by side.",
    ),
) -> None:
    """Per-stage latency and memory, with llama.cpp's own path as a ratio; a CI gate."""
    show_progress()
    import json

    from .benchmarks.latency import compare, markdown, run_latency, write_reports
    from .images import load_image
    from .tasks import profile

    profile(task)
    for p in images:
        load_image(p)  # a bad image fails here, in one line
    base = None
    if baseline is not None:
        try:
            base = json.loads(baseline.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            fail(f"{baseline}: not a latency report", 2)
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
    )
    typer.echo(markdown(report))
    if out is not None:
        typer.echo(f"report: {write_reports(report, out)}")
    if base is not None:
        regressions = compare(report, base, tolerance)
        for line in regressions:
            typer.echo(f"regression: {line}", err=True)
        if regressions:
            fail(
                f"{len(regressions)} latency regression(s) beyond {tolerance:.0%} "
                f"against {baseline}",
                ExitCode.REGRESSION,
            )
        typer.echo(f"no regression beyond {tolerance:.0%} against {baseline}")


def _echo_files(out_dir: Path, entries: list[dict], label) -> None:
    """One line per file a converter wrote: label, size, sha256 prefix, path."""
    for e in entries:
        typer.echo(
            f"{label(e)}  {e['size'] / 1e6:8.1f} MB  {e['sha256'][:12]}  {out_dir / e['file']}"
        )


@convert_app.command("tiny-model")
def tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="Where to write the HF checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Weights are deterministic for a seed."),
    shape: str = typer.Option(
        "tiny",
        "--shape",
        help="tiny (tests) | 8b-vision | 8b | 8b-text4 (real shapes, for speed work).",
    ),
) -> None:
    """Write a tiny random-weight Qwen3-VL checkpoint with the real Qwen2 tokenizer."""
    show_progress()
    from .convert.tiny_model import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed, shape=shape)
    typer.echo(str(path))


@convert_app.command("gguf")
def gguf_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face Qwen3-VL checkpoint."),
    out_dir: Path = typer.Argument(..., help="Output directory."),
    quant: str = typer.Option(
        "Q8_0,Q4_K_M",
        "--quant",
        help="Comma-separated quants beside F16 (Q8_0,Q6_K,Q5_K_M,Q4_K_M).",
    ),
    mmproj_type: str = typer.Option("f16", "--mmproj-type", help="f16 | bf16 | q8_0 | f32"),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Load each written model and run a few tokens here."
    ),
    repack: Optional[bool] = typer.Option(
        None, "--repack/--no-repack", help="llama.cpp weight repacking for the check."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show the converter's own output."),
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
    hf_dir: Path = typer.Argument(..., help="Hugging Face Qwen3-VL checkpoint (bf16)."),
    out_dir: Path = typer.Argument(..., help="Output directory."),
    bits: int = typer.Option(4, "--bits", help="4 or 8."),
    group_size: int = typer.Option(128, "--group-size", help="Columns per scale (-1 = per row)."),
    calibration: str = typer.Option(
        "synthetic",
        "--calibration",
        help="'synthetic' (drawn chart/table/SVG pairs) or a directory in VC-RewardBench layout.",
    ),
    samples: int = typer.Option(8, "--samples", help="Calibration conversations."),
    seed: int = typer.Option(0, "--seed"),
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
    hf_dir: Path = typer.Argument(..., help="Hugging Face Qwen3-VL checkpoint."),
    out_dir: Path = typer.Argument(..., help="Output directory (e.g. <gguf dir>/onnx)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8"),
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
    as one `verm-local: <level>: message` line each on stderr (warnings and up by default,
    more with VERM_LOCAL_LOG_LEVEL or --verbose)."""
    import logging

    root = logging.getLogger("verm_local")
    if not any(getattr(h, "_verm", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LineFormatter())
        handler._verm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level or logging.WARNING)
    # llama.cpp's own log is about its internals (token types, grounding notes); its errors
    # reach the user inside verm-local's one-line errors, and --verbose shows it all.
    logging.getLogger("verm_local.llama_cpp").setLevel(logging.CRITICAL)
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")
    logging.addLevelName(logging.INFO, "info")
    logging.addLevelName(logging.DEBUG, "debug")


def run() -> int:
    """Run the app in this process; user errors become one line and their exit code."""
    from .settings import settings

    setup_logging()
    try:
        app()
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
