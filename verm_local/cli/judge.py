"""`verm-local judge`: one pair, or a file of pairs grouped by ground truth."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from ..stdio import stdout_to_stderr
from .app import (
    DECODING,
    MODEL,
    OUTPUT,
    REQUEST,
    DeterministicOpt,
    DeviceOpt,
    GpuLayersOpt,
    ImageTokensOpt,
    KvTypeOpt,
    MaxTokensOpt,
    ModelOpt,
    QuantOpt,
    RayActorsOpt,
    RayAddressOpt,
    RayOpt,
    RepackOpt,
    SpeculateOpt,
    TaskOpt,
    ThreadsOpt,
    VariantOpt,
    VisionOpt,
    app,
    fail,
    kv_type_choice,
    ray_target,
    verbosity,
)


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
        typer.Option(
            "--out",
            rich_help_panel=OUTPUT,
            help="--pairs: write the judgements here (written as they come; resumed).",
        ),
    ] = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 1,
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
    speculate: SpeculateOpt = None,
    deterministic: DeterministicOpt = None,
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
    from ..judge import Judge, build_request
    from ..pairs import read_pairs
    from ..tasks import TaskProfile, decoding, profile

    p = profile(task)
    on_ray = ray_target(ray, ray_address)
    _check_inputs(gt, pred, pairs, out, prompt_file, dry_run, backend, on_ray)
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

    def sampling_for(prof: TaskProfile):
        return decoding(prof, mode, max_tokens).with_(**overrides)

    if pairs is not None:
        batch = read_pairs(pairs, task)  # a bad file fails before the model loads
        for prof in {row["task"].name: row["task"] for row in batch}.values():
            sampling_for(prof)
    else:
        # The request is built (images checked) before the model loads: bad input fails fast.
        request = build_request(
            gt,
            pred,
            p,
            sampling=sampling_for(p),
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
        else (verbosity() >= 0 and sys.stderr.isatty() and (not as_json or sys.stdout.isatty()))
    )
    options = dict(
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
        kv_type=kv_type_choice(kv_type),
        speculate=speculate,
        deterministic=deterministic,
    )
    if pairs is not None and on_ray is not None:
        from ..raydata import ray_stream

        picklable = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
        call = dict(
            free=free,
            max_errors=max_errors,
            sampling_mode=mode,
            max_tokens=max_tokens,
            overrides=overrides,
        )
        stream = ray_stream(
            {"model": str(model) if model else None, **picklable},
            call,
            address=on_ray,
            actors=ray_actors,
            batch_size=max(4, 2 * parallel),
        )
        with stdout_to_stderr():
            done = _judge_pairs(stream, batch, out)
        _report_pairs(done, batch, out)  # stdout is the terminal's again
        return
    with (
        _Progress(show, live=progress is None),
        stdout_to_stderr(),
        Judge(model, **options) as j,
    ):
        if pairs is not None:
            from ..pairs import local_stream

            stream = local_stream(j, free=free, max_errors=max_errors, sampling=sampling_for)
            done = _judge_pairs(stream, batch, out)
        else:
            images = request.request.images
            result = j.judge(
                images[0],
                images[1],
                p,
                free=free,
                sampling=request.request.sampling,
                prompt_file=prompt_file,
                max_errors=max_errors,
            )
    if pairs is not None:
        _report_pairs(done, batch, out)  # stdout is the terminal's again
        return
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        from ..report import print_judgement

        print_judgement(result)
    if not result.complete:
        fail(
            f"incomplete judgement: {result.problem}; raise --max-tokens or lower --max-errors",
            ExitCode.INCOMPLETE,
        )


def _check_inputs(
    gt: Optional[Path],
    pred: Optional[Path],
    pairs: Optional[Path],
    out: Optional[Path],
    prompt_file: Optional[Path],
    dry_run: bool,
    backend: str,
    ray: Optional[str],
) -> None:
    """Arguments that go together (one pair or a file of pairs), checked before anything
    loads."""
    if pairs is not None and (gt is not None or pred is not None):
        fail("give GT PRED or --pairs FILE, not both", ExitCode.INPUT)
    if pairs is None and (gt is None or pred is None):
        fail("give GT and PRED images (or --pairs FILE.jsonl)", ExitCode.INPUT)
    if pairs is None and out is not None:
        fail("--out goes with --pairs", ExitCode.INPUT)
    if pairs is None and ray is not None:
        fail("--ray and --ray-address go with --pairs", ExitCode.INPUT)
    if pairs is not None and (prompt_file is not None or dry_run):
        fail("--prompt-file and --dry-run go with one pair, not --pairs", ExitCode.INPUT)
    if backend not in ("auto", "llamacpp", "transformers"):
        fail(f"unknown backend {backend!r}; choose auto, llamacpp or transformers", ExitCode.INPUT)


class _Progress:
    """Long work's stages on stderr: a live status line on a terminal, or a plain line per
    stage (`--progress` to a pipe). Listens to `events.stage`."""

    def __init__(self, enabled: bool, live: bool = True):
        self.enabled, self.live = enabled, live
        self.status = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from .. import events

            if self.live:
                from rich.console import Console

                self.status = Console(stderr=True).status("starting ...")
                self.status.start()
            events.add_listener(self)
        return self

    def __call__(self, name: str, detail: dict) -> None:
        from ..events import describe

        line = describe(name, detail)
        if self.status is not None:
            self.status.update(line)
        else:
            print(f"verm-local: {line}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            from .. import events

            events.remove_listener(self)
        if self.status is not None:
            self.status.stop()


def _judge_pairs(stream, batch, out: Optional[Path]) -> tuple[str, int, int]:
    """Judge every pair (grouped by ground truth) with a progress line on stderr; the
    JSONL, and how many failed and came back incomplete."""
    import time

    from ..pairs import judge_file

    t0 = time.perf_counter()
    quiet = verbosity() < 0

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

    text, failed, incomplete = judge_file(stream, batch, out, progress=progress)
    if not quiet:
        print(file=sys.stderr)
    return text, failed, incomplete


def _report_pairs(done: tuple[str, int, int], batch, out: Optional[Path]) -> None:
    """Without --out the judgements are the result, on stdout (with -q too); with --out
    they are in the file only, and stderr gets one summary line (with -q: only when some
    failed). The exit code says whether any failed or came back incomplete."""
    text, failed, incomplete = done
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    elif verbosity() >= 0 or failed:
        typer.echo(
            f"{len(batch) - failed} judged ({incomplete} incomplete), {failed} failed -> {out}",
            err=True,
        )
    if failed:
        raise typer.Exit(ExitCode.ANSWER)
    if incomplete:
        raise typer.Exit(ExitCode.INCOMPLETE)


def _print_request(described: dict, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(described, indent=2, ensure_ascii=False))
        return
    from ..report import print_request

    print_request(described)
