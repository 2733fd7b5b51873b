"""`verm-local bench`: labelled data, VC-RewardBench predictions and scoring as the authors
score it, agreement with the reference, serving against llama-server (latency and its CI
gate: `latency.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from ..stdio import stdout_to_stderr
from .app import (
    DeterministicOpt,
    ImageTokensOpt,
    MaxTokensOpt,
    ModelOpt,
    QuantOpt,
    RayActorsOpt,
    RayAddressOpt,
    RayOpt,
    RepackOpt,
    ThreadsOpt,
    VariantOpt,
    VisionOpt,
    bench_app,
    bench_data_app,
    fail,
    ray_target,
    show_progress,
    split_list,
)


@bench_data_app.command("synthetic")
def bench_data_synthetic_cmd(
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write VC-RewardBench.jsonl and images/.")
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Pairs to draw.")] = 12,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    tasks: Annotated[str, typer.Option("--tasks")] = "chart,table,svg",
) -> None:
    """Labelled pairs drawn offline with known injected errors (deterministic per seed)."""
    show_progress()
    from ..benchmarks.data import synthetic

    typer.echo(str(synthetic(out_dir, n=n, seed=seed, tasks=tuple(split_list(tasks)))))


MatcherOpt = Annotated[
    str,
    typer.Option(
        "--matcher",
        rich_help_panel="Matcher",
        help="llm (the authors' protocol: an LLM behind --matcher-url) | lexical (no LLM; "
        "figures not comparable with the paper's).",
    ),
]
MatcherUrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--matcher-url",
        rich_help_panel="Matcher",
        help="OpenAI-compatible base URL of the matcher (llama-server, Ollama, vLLM, a "
        "cloud API; key: OPENAI_API_KEY).",
    ),
]
MatcherModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--matcher-model",
        rich_help_panel="Matcher",
        help="The matcher's model (the authors': gpt-5-mini).",
    ),
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", min=1, max=256, rich_help_panel="Matcher", help="Matcher calls at once."
    ),
]


def _matcher(kind: str, url: Optional[str], model: Optional[str]):
    from ..benchmarks.matcher import make_matcher
    from ..paths import cache_dir

    return make_matcher(kind, url, model, cache_dir=cache_dir() / "matcher")


@bench_app.command("predict")
def bench_predict_cmd(
    data: Annotated[
        str,
        typer.Argument(
            help="A folder or hub dataset holding VC-RewardBench.jsonl, or a rows file "
            "(JSONL, or the JSON list the authors' evaluation reads)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Predictions FILE (JSON list; resumed when it exists).")
    ],
    model: ModelOpt = None,
    variant: VariantOpt = None,
    quant: QuantOpt = None,
    vision: VisionOpt = "auto",
    image_tokens: ImageTokensOpt = None,
    max_tokens: MaxTokensOpt = None,
    max_errors: Annotated[
        Optional[int], typer.Option("--max-errors", min=0, help="Cap each answer's error list.")
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel", min=1, max=64, help="Predictions judged at once per ground truth."
        ),
    ] = 4,
    threads: ThreadsOpt = None,
    repack: RepackOpt = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="The first N rows.")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="A missing or unreadable image stops the run.")
    ] = False,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 1,
) -> None:
    """Judge a VC-RewardBench-layout dataset; write the authors' evaluation input."""
    show_progress()
    from contextlib import ExitStack

    on_ray = ray_target(ray, ray_address)

    from ..benchmarks.predict import predict
    from ..judge import Judge
    from ..pairs import local_stream

    options = dict(
        variant=variant,
        quant=quant,
        vision=vision,
        image_tokens=image_tokens,
        max_tokens=max_tokens,
        parallel=parallel,
        prefix_cache=2,
        threads=threads,
        repack=repack,
    )
    with ExitStack() as stack:

        def stream():
            """The judging stream, made when there is work: a local Judge, or Ray's pool."""
            if on_ray is not None:
                from ..raydata import ray_stream

                call = {"max_errors": max_errors, "unreadable": "score"}
                return ray_stream(
                    {"model": model, **options}, call, address=on_ray, actors=ray_actors,
                    batch_size=max(4, 2 * parallel),
                )  # fmt: skip
            j = stack.enter_context(Judge(model, **options))
            return local_stream(j, max_errors=max_errors, unreadable="score")

        with stdout_to_stderr():
            summary = predict(data, out, stream, strict=strict, limit=limit)
    skipped = summary["skipped"]
    typer.echo(
        f"{summary['judged']} judged ({summary['unreadable']} without a readable answer), "
        f"{summary['resumed']} already in {out}, {len(skipped)} skipped -> {out}"
    )
    for s in skipped:
        typer.echo(f"skipped {s['id']}: {s['path']}: {s['problem']}", err=True)


@bench_app.command("score")
def bench_score_cmd(
    predictions: Annotated[
        Path, typer.Argument(help="`bench predict` output (or any rows with pred_json).")
    ],
    matcher: MatcherOpt = "llm",
    matcher_url: MatcherUrlOpt = None,
    matcher_model: MatcherModelOpt = None,
    workers: WorkersOpt = 8,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="SCORE.json (default: FILE_score.json beside FILE)."),
    ] = None,
) -> None:
    """Score predictions exactly as the authors' VC-RewardBench evaluation does."""
    show_progress()
    from ..benchmarks.score import run_score

    m = _matcher(matcher, matcher_url, matcher_model)
    target = out or predictions.with_name(predictions.stem + "_score.json")
    _, table = run_score(predictions, m, target, workers=workers)
    typer.echo(table)
    typer.echo(f"score: {target} (and {target.with_suffix('.md').name})")


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
    matcher: Annotated[
        str,
        typer.Option(
            "--matcher",
            rich_help_panel="Matcher",
            help="auto (llm with --matcher-url, else lexical) | llm | lexical.",
        ),
    ] = "auto",
    matcher_url: MatcherUrlOpt = None,
    matcher_model: MatcherModelOpt = None,
    workers: WorkersOpt = 8,
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
    from ..benchmarks.agreement import markdown, run_agreement

    if matcher == "auto":
        matcher = "llm" if matcher_url else "lexical"
    m = _matcher(matcher, matcher_url, matcher_model)
    with stdout_to_stderr():
        report = run_agreement(
            reference,
            split_list(candidates),
            data,
            limit=limit,
            out=out,
            free=free,
            matcher=m,
            workers=workers,
            top_k=top_k,
            seed=seed,
            image_tokens=image_tokens,
            max_tokens=max_tokens,
            threads=threads,
            max_errors=max_errors,
        )
    typer.echo(markdown(report))
    typer.echo(f"reports: {out}/agreement.json, agreement.md, agreement.png, results/")


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
    deterministic: DeterministicOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="FILE.json.")] = None,
    replicas: Annotated[
        int,
        typer.Option(
            "--replicas",
            min=1,
            help="N > 1: serve --replicas N with ground-truth affinity against Ray's own "
            "routing (instead of llama-server).",
        ),
    ] = 1,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address")] = None,
) -> None:
    """verm-local's serving engine against llama.cpp's llama-server: same model, same load
    (or, with --replicas, ground-truth affinity against Ray's own routing)."""
    show_progress()
    from ..benchmarks.serve import markdown, run_serve_bench

    report = run_serve_bench(
        model,
        deterministic=deterministic,
        workloads=split_list(workloads),
        clients=clients,
        requests=requests,
        answer_tokens=answer_tokens,
        parallel=parallel,
        threads=threads,
        image_size=image_size,
        llama_server=llama_server,
        repack=repack,
        replicas=replicas,
        ray_address=ray_address,
    )
    _report(report, out, markdown)


@bench_app.command("llama-server")
def bench_llama_server_cmd(
    cmake_args: Annotated[
        str,
        typer.Option("--cmake-args", help='llama.cpp build flags, e.g. "-DGGML_CUDA=on".'),
    ] = "",
) -> None:
    """Build llama.cpp's own llama-server once from the runtime's sdist (the baseline of
    `bench serve`), cached by version, flags and CPU; print its path. scripts/install.sh
    runs it, so no benchmark or test waits for the build."""
    show_progress()
    from ..convert.llama_sources import llama_server

    with stdout_to_stderr():
        path = llama_server(cmake_args)
    typer.echo(str(path))


def _report(report: dict, out: Optional[Path], markdown, plot=None) -> None:
    """A bench's Markdown on stdout; with --out the JSON (the source), the Markdown and
    the plot (when there is one) beside it."""
    from ..fileio import write_json_atomic

    typer.echo(markdown(report))
    if out is None:
        return
    write_json_atomic(out, report)
    out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    if plot is not None:
        plot(report, out.with_suffix(".png"))
    typer.echo(f"report: {out}" + (" (.md, .png)" if plot is not None else ""))


@bench_app.command("speculate")
def bench_speculate_cmd(
    model: ModelOpt = None,
    items: Annotated[int, typer.Option("--items", min=1, help="Labelled pairs.")] = 6,
    tasks: Annotated[
        str, typer.Option("--tasks", help="Comma-separated: chart, table, svg.")
    ] = "chart",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    free: Annotated[
        bool,
        typer.Option(
            "--free/--replay-only",
            help="Also judge each pair as the model judges it (identical judgements?).",
        ),
    ] = True,
    max_errors: Annotated[
        int, typer.Option("--max-errors", min=1, help="Errors a free judgement may list.")
    ] = 3,
    image_tokens: ImageTokensOpt = None,
    threads: ThreadsOpt = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="FILE.json (.md, .png beside).")
    ] = None,
) -> None:
    """Decoding with drafts of the grammar-dictated text against without, side by side:
    trained-format answers replayed (the ceiling) and the model's own judgements."""
    show_progress()
    from ..benchmarks.speculate import markdown, plot, run_speculate
    from ..tasks import profile

    chosen = tuple(profile(t).name for t in split_list(tasks))  # an unknown one: exit 2
    if not chosen:
        fail("--tasks: name at least one task", ExitCode.INPUT)
    with stdout_to_stderr():
        report = run_speculate(
            model or "",
            items=items,
            tasks=chosen,
            seed=seed,
            free=free,
            max_errors=max_errors,
            image_tokens=image_tokens,
            threads=threads,
        )
    _report(report, out, markdown, plot)


@bench_app.command("determinism")
def bench_determinism_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="A GGUF text model (mmproj beside).")],
    task: Annotated[str, typer.Option("--task", "-t", help="chart | table | svg")] = "chart",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="Cost runs per side (the median).")
    ] = 3,
    cost: Annotated[
        bool, typer.Option("--cost/--no-cost", help="Also time judgements on each side.")
    ] = True,
    compare_lib: Annotated[
        Optional[Path],
        typer.Option(
            "--compare-lib",
            help="Another llama.cpp build's library folder (e.g. an unpatched wheel's "
            "llama_cpp/lib) to time as well, in a child process.",
        ),
    ] = None,
    image_tokens: ImageTokensOpt = None,
    threads: ThreadsOpt = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="FILE.json (.md, .png beside).")
    ] = None,
) -> None:
    """One pair, one answer: the largest |difference| of logits on each path a judgement
    can take (drafted, batched, prefix-cached, other prompt chunks), deterministic on and
    off, and what it costs, side by side in one run."""
    show_progress()
    from ..benchmarks.determinism import markdown, plot, run_determinism
    from ..tasks import profile

    if compare_lib is not None and not compare_lib.is_dir():
        fail(f"--compare-lib {compare_lib}: not a folder of llama.cpp libraries", ExitCode.INPUT)
    with stdout_to_stderr():
        report = run_determinism(
            model,
            task=profile(task).name,
            seed=seed,
            repeats=repeats,
            threads=threads,
            image_tokens=image_tokens,
            compare_lib=compare_lib,
            measure_cost=cost,
        )
    _report(report, out, markdown, plot)
