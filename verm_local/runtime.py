"""From this machine to a model: probe, plan, and find the planned variant in the store."""

from __future__ import annotations

from pathlib import Path

from .catalog import get_variant
from .errors import ModelError
from .hardware import Hardware, probe
from .paths import installed
from .select import Plan, select_plan


def plan_here(
    device: str | None = None,
    variant: str | None = None,
    n_ctx: int | None = None,
    hardware: Hardware | None = None,
    repack: str | bool | None = None,
    deterministic: str | bool | None = None,
) -> tuple[Hardware, Plan]:
    """Probe (torch only when a transformers variant is asked for) and plan."""
    from .settings import settings

    if hardware is None:
        with_torch = bool(variant) and get_variant(variant).backend == "transformers"
        hardware = probe(with_torch=with_torch)
    return hardware, select_plan(
        hardware,
        device=device,
        variant=variant,
        n_ctx=n_ctx,
        repack=repack if repack is not None else settings().repack,
        deterministic=deterministic if deterministic is not None else settings().deterministic,
    )


def planned_model(
    device: str | None = None, variant: str | None = None, n_ctx: int | None = None
) -> tuple[Plan, Path]:
    """The planned variant's directory in the store, or the exact command that fetches it."""
    _, plan = plan_here(device, variant, n_ctx)
    path = installed(plan.variant)
    if path is None:
        why = "" if variant else " (planned for this machine)"
        raise ModelError(
            f"{plan.variant}{why} is not in the store; run: verm-local pull {plan.variant}"
        )
    return plan, path


def torch_device(device: str | None) -> str | None:
    """The plan's device names in torch's words (Metal is "mps")."""
    return {"metal": "mps"}.get(device or "", device)
