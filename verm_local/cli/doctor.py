"""`verm-local doctor` and `verm-local version`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import DeterministicOpt, DeviceOpt, JsonOpt, RepackOpt, VariantOpt, app


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
    deterministic: DeterministicOpt = None,
) -> None:
    """What this machine has, the plan for it and why, and verm-local's settings."""
    import json

    from ..doctor import doctor
    from ..hardware import Hardware

    report = doctor(device, variant, hardware, repack, deterministic)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from ..report import print_doctor
    from ..select import Plan

    path = report["store"]["path"]
    print_doctor(
        Hardware.from_dict(report["hardware"]),
        Plan.from_dict(report["plan"]),
        Path(path) if path else None,
        report["settings"],
        sandbox=report["sandbox"],
        build=report["decisions"]["deterministic"]["build"],
    )


@app.command("version")
def version_cmd() -> None:
    """Print versions of verm-local and llama-cpp-python."""
    from .. import __version__
    from ..convert.llama_sources import runtime_version

    typer.echo(f"verm-local {__version__}; llama-cpp-python {runtime_version()}")
