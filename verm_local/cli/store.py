"""The store: `verm-local pull`, `models`, `rm`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from ..stdio import stdout_to_stderr
from .app import DeviceOpt, JsonOpt, RepackOpt, app, fail, show_progress


@app.command("pull")
def pull_cmd(
    variant: Annotated[
        str,
        typer.Argument(
            help="A catalog variant (see `verm-local models --catalog`), auto: the plan's, or "
            "a GGUF repository of the hub: hf.co/USER/REPO[:QUANT] (QUANT: a file's tag, "
            "e.g. Q4_K_M; default: the plan's quant).",
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
    mmproj_quant: Annotated[
        Optional[str],
        typer.Option(
            "--mmproj-quant",
            help="hf.co/...: the projector's quant (default: f16, else bf16, else q8_0).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="hf.co/...: replace a variant of that name that came from another source.",
        ),
    ] = False,
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
    from ..runtime import plan_here
    from ..store import cache_key, check_variant, pull, pull_prompts

    if prompts_only:
        typer.echo(str(pull_prompts(required=True)))
        return
    from ..hub_gguf import parse_ref

    ref = parse_ref(variant)
    if ref is not None:
        if from_dir is not None or repo is not None or print_cache_key:
            fail(
                "--from, --repo and --cache-key go with catalog variants, not hf.co/...",
                ExitCode.INPUT,
            )
        _, plan = plan_here(device=device)
        from ..catalog import get_variant
        from ..hub_gguf import pull_gguf

        plan_quant = get_variant(plan.variant).quant
        with stdout_to_stderr():
            path = pull_gguf(
                ref, plan_quant=plan_quant, revision=revision, mmproj_quant=mmproj_quant,
                force=force,
            )  # fmt: skip
            pull_prompts(required=False)
            if check:
                check_variant(path.name, path, repack)
        typer.echo(str(path))
        return
    if mmproj_quant is not None or force:
        fail("--mmproj-quant and --force go with hf.co/USER/REPO[:QUANT]", ExitCode.INPUT)
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

    from ..catalog import catalog_rows
    from ..paths import home_dir
    from ..select import default_n_ctx
    from ..store import list_models

    rows = catalog_rows(default_n_ctx()) if catalog else list_models(verify=verify)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from ..report import print_rows

    title = "catalog (sizes of the real 8B model)" if catalog else f"store: {home_dir()}"
    print_rows(rows, title)


@app.command("rm")
def rm_cmd(
    variant: Annotated[str, typer.Argument(help="Variant to remove from the store.")],
) -> None:
    """Remove a variant from the store."""
    from ..store import remove

    typer.echo(f"removed {remove(variant)}")
