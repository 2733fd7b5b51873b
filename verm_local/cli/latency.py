"""`verm-local bench latency`: per-stage latency and memory, and its CI gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from .app import (
    ImageTokensOpt,
    MaxTokensOpt,
    RepackOpt,
    TaskOpt,
    ThreadsOpt,
    bench_app,
    fail,
    show_progress,
    split_list,
)

GATE = "CI gate"
ToleranceOpt = Annotated[
    float,
    typer.Option("--tolerance", min=0.0, help="Allowed slowdown of a ratio.", rich_help_panel=GATE),
]
JunitOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--junit",
        help="Write the gate as JUnit XML (one test case per gated ratio).",
        rich_help_panel=GATE,
    ),
]
FailInconclusiveOpt = Annotated[
    bool,
    typer.Option(
        "--fail-inconclusive",
        help="Exit 1 when the gate is inconclusive (default: exit 8, not a failure).",
        rich_help_panel=GATE,
    ),
]


@bench_app.command("latency")
def bench_latency_cmd(
    models: Annotated[str, typer.Option("--models", help="Comma-separated variants/paths.")],
    images: Annotated[tuple[Path, Path], typer.Option("--images", help="GT PRED")],
    task: TaskOpt = "chart",
    repeat: Annotated[
        int,
        typer.Option(
            "--repeat",
            min=1,
            help="Rounds without a gate; with --baseline or --update-baseline the rounds "
            "before the first look.",
        ),
    ] = 3,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="FILE.json (or a directory).")
    ] = None,
    baseline: Annotated[
        Optional[Path],
        typer.Option(
            "--baseline",
            help="A stored latency.json to gate against: each ratio's interval against "
            "baseline x (1 + tolerance).",
            rich_help_panel=GATE,
        ),
    ] = None,
    tolerance: ToleranceOpt = 0.10,
    update_baseline: Annotated[
        bool,
        typer.Option(
            "--update-baseline",
            help="Write this run as the new --baseline file (on purpose: no gate is run).",
            rich_help_panel=GATE,
        ),
    ] = False,
    junit: JunitOpt = None,
    budget_s: Annotated[
        float,
        typer.Option(
            "--budget-s",
            min=1.0,
            help="With --baseline (or --update-baseline): interleaved rounds go on until "
            "every gated ratio is decided, or this many seconds have passed.",
            rich_help_panel=GATE,
        ),
    ] = 300.0,
    max_repeat: Annotated[
        int,
        typer.Option(
            "--max-repeat",
            min=1,
            max=1000,
            help="... or this many rounds.",
            rich_help_panel=GATE,
        ),
    ] = 64,
    slowdown: Annotated[
        Optional[float],
        typer.Option(
            "--slowdown",
            min=0.0,
            hidden=True,
            help="Checking the gate only: verm-local's judgement made this fraction slower.",
        ),
    ] = None,
    fail_inconclusive: FailInconclusiveOpt = False,
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
    from ..benchmarks.latency import run_latency
    from ..benchmarks.latency_report import markdown, write_reports
    from ..images import check_image
    from ..tasks import profile

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
        base = _stored_baseline(baseline)
        if out is not None and out.resolve() in (baseline.resolve(), baseline.resolve().parent):
            fail("--out would overwrite the --baseline file; use --update-baseline", ExitCode.INPUT)
    plan = None
    if base is not None or update_baseline:
        from ..benchmarks.gate import gate_plan

        plan = gate_plan(
            base,
            tolerance,
            budget_s=budget_s,
            max_repeat=max_repeat,
            first=min(repeat, max_repeat),
        )
    report = run_latency(
        split_list(models),
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
        plan=plan,
        slowdown=slowdown,
    )
    from ..fileio import write_json_atomic

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


@bench_app.command("gate")
def bench_gate_cmd(
    report: Annotated[
        Path,
        typer.Argument(
            help="A report of `bench latency --out` (FILE.json, or its directory).",
            show_default=False,
        ),
    ],
    baseline: Annotated[
        Path, typer.Option("--baseline", help="The stored latency.json to gate against.")
    ],
    tolerance: ToleranceOpt = 0.10,
    junit: JunitOpt = None,
    fail_inconclusive: FailInconclusiveOpt = False,
) -> None:
    """Gate a latency report measured earlier against a baseline, without measuring again.

    For a CI that measures in one step (or job) and gates in another, or to check one run
    against another baseline or tolerance. Each gated ratio's interval is taken again from
    the run's stored rounds against the baseline's, as one look (a run gated while it
    measures, `bench latency --baseline`, also decides when to stop). Exit codes as
    `bench latency --baseline`: 0 pass, 1 regression, 8 inconclusive, 2 bad input."""
    from ..benchmarks.gate import gate_plan, regate
    from ..benchmarks.latency_report import markdown
    from ..benchmarks.latency_summary import load_baseline

    base = _stored_baseline(baseline)
    path = report / "latency.json" if report.is_dir() else report
    if not path.is_file():
        fail(f"{path}: no such latency report (`bench latency --out` writes one)", ExitCode.INPUT)
    measured = regate(load_baseline(path), gate_plan(base, tolerance))
    _latency_gate(measured, base, baseline, tolerance, markdown(measured), junit, fail_inconclusive)


def _stored_baseline(baseline: Path) -> dict:
    """The --baseline file, which must be there: a gate never makes its own."""
    from ..benchmarks.latency_summary import load_baseline

    if not baseline.is_file():
        fail(
            f"{baseline}: no such baseline; make one on purpose with "
            f"`bench latency --baseline {baseline} --update-baseline`",
            ExitCode.INPUT,
        )
    return load_baseline(baseline)


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
    from ..benchmarks.gate import INCONCLUSIVE, REGRESSION, evaluate, junit_xml, summary_markdown
    from ..settings import settings

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
            f"inconclusive against {baseline}: the noise stayed wider than the tolerance "
            f"{tolerance:.0%} allows to decide within the run's budget (more --budget-s or "
            "--max-repeat, or a quieter machine)",
            ExitCode.REGRESSION if fail_inconclusive else ExitCode.INCONCLUSIVE,
        )
    typer.echo(f"pass: no regression beyond {tolerance:.0%} against {baseline}")
