"""The visual critic: `verm-local render` (code as the authors' pipeline renders it, in the
sandbox) and `verm-local refine` (a policy model revises its code with the judge's
discrepancies)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from ..stdio import stdout_to_stderr
from .app import (
    ImageTokensOpt,
    MaxTokensOpt,
    ModelOpt,
    QuantOpt,
    RepackOpt,
    TaskOpt,
    ThreadsOpt,
    VariantOpt,
    VisionOpt,
    app,
    fail,
    show_progress,
)

UnsafeRenderOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--unsafe-render",
        help="Render model-written code even where no sandbox is available "
        "(VERM_LOCAL_UNSAFE_RENDER; see `verm-local doctor`).",
    ),
]


def _read_code(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        fail(f"{path}: no such file", ExitCode.INPUT)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read ({exc.__class__.__name__})", ExitCode.INPUT)
    raise AssertionError("unreachable")


@app.command("render")
def render_cmd(
    source: Annotated[
        str, typer.Argument(help="The code (a file, or - for stdin): Python, SVG or HTML.")
    ],
    task: TaskOpt = "chart",
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")] = Path(
        "render.png"
    ),
    timeout: Annotated[
        Optional[float], typer.Option("--timeout", min=1.0, help="Seconds (default: the task's).")
    ] = None,
    unsafe_render: UnsafeRenderOpt = None,
) -> None:
    """Render code as the authors' pipeline does (matplotlib, cairosvg 336x336, Chromium),
    in the sandbox."""
    from ..fileio import atomic_output
    from ..render import render_code
    from ..tasks import profile

    p = profile(task)
    code = _read_code(source)
    png = render_code(code, p.name, timeout, unsafe_render)
    with atomic_output(out) as tmp:
        tmp.write_bytes(png)
    typer.echo(str(out))


@app.command("refine")
def refine_cmd(
    gt: Annotated[Path, typer.Argument(help="The ground-truth image to reproduce.")],
    task: TaskOpt = "chart",
    policy_url: Annotated[
        str,
        typer.Option(
            "--policy-url",
            help="OpenAI-compatible base URL of the policy (Ollama, llama-server, vLLM, a "
            "cloud API; key: VERM_LOCAL_POLICY_API_KEY or OPENAI_API_KEY).",
        ),
    ] = "",
    policy_model: Annotated[str, typer.Option("--policy-model", help="The policy's model.")] = "",
    code: Annotated[
        Optional[Path], typer.Option("--code", help="Start from this code (round 1).")
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100)] = 3,
    patience: Annotated[
        int,
        typer.Option("--patience", min=0, help="Stop when the reward has not improved this long."),
    ] = 2,
    out: Annotated[
        Path, typer.Option("--out", help="Rounds, best.*, report.html (resumed when it exists).")
    ] = Path("refine-out"),
    model: ModelOpt = None,
    variant: VariantOpt = None,
    quant: QuantOpt = None,
    vision: VisionOpt = "auto",
    image_tokens: ImageTokensOpt = None,
    max_tokens: MaxTokensOpt = None,
    threads: ThreadsOpt = None,
    repack: RepackOpt = None,
    unsafe_render: UnsafeRenderOpt = None,
) -> None:
    """Revise code for GT with a policy model, the judge's discrepancies its critique."""
    if not policy_url or not policy_model:
        fail("refine needs --policy-url URL and --policy-model NAME", ExitCode.INPUT)
    if code is not None and not code.is_file():
        fail(f"{code}: no such file", ExitCode.INPUT)
    show_progress()
    import logging

    from ..judge import Judge
    from ..refine import refine
    from ..settings import settings

    log = logging.getLogger("verm_local")

    def progress(r: dict) -> None:
        n_err = len(r["errors"]) if r.get("errors") is not None else "-"
        log.info(
            "refine: round %d: reward %s, %s discrepancies%s",
            r["round"],
            r.get("reward"),
            n_err,
            f" ({'; '.join(r['problems'])})" if r["problems"] else "",
        )

    s = settings()
    with stdout_to_stderr():
        judge = Judge(
            model,
            variant=variant,
            quant=quant,
            vision=vision,
            image_tokens=image_tokens,
            max_tokens=max_tokens,
            threads=threads,
            repack=repack,
        )
        with judge:
            result = refine(
                gt,
                task,
                policy_url=policy_url,
                policy_model=policy_model,
                api_key=s.policy_api_key or s.openai_api_key,
                code=code,
                rounds=rounds,
                patience=patience,
                out=out,
                judge=judge,
                unsafe_render=unsafe_render,
                progress=progress,
            )
    best = result.best_round
    for r in result.rounds:
        n_err = len(r["errors"]) if r.get("errors") is not None else "-"
        typer.echo(f"round {r['round']}: reward {r.get('reward')}, {n_err} discrepancies")
    typer.echo(
        f"stopped: {result.stopped}; best: round {result.best} (reward "
        f"{best['reward'] if best else None}) -> {out}/best.*, {result.report}"
    )
