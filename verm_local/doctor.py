"""`verm-local doctor`: what this machine has, the plan for it and why (variant, device,
threads, the repack decision), the store, and every setting with its current value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .catalog import CATALOG
from .errors import InputError
from .fileio import read_manifest
from .hardware import Hardware, probe
from .memory import estimate_llamacpp
from .paths import installed
from .runtime import plan_here
from .sandbox import level as sandbox_level
from .select import Plan
from .settings import describe, settings


def read_record(path: Path) -> Hardware:
    """A recorded machine: `doctor --json` output, or its `hardware` part."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Hardware.from_dict(data.get("hardware", data))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a hardware record ({exc.__class__.__name__})") from None


def memory_breakdown(plan: Plan) -> dict[str, Any]:
    """The plan's memory estimate by part (a GGUF variant on llama.cpp), what `bench
    latency --memory` measures against; empty for other backends."""
    v = CATALOG[plan.variant]
    if v.backend != "llamacpp":
        return {"peak": plan.memory_bytes}
    est = estimate_llamacpp(
        v.text_bytes,
        v.size_bytes - v.text_bytes,
        plan.n_ctx,
        kv_type=plan.prefill.kv_type,
        flash_attn=plan.prefill.flash_attn,
        n_ubatch=plan.prefill.n_ubatch,
        one_shot=plan.device == "cpu",
    )
    return {**est.to_dict(), "n_ctx": plan.n_ctx, "full_cap_peak": plan.memory_full_cap_bytes}


def build_guarantees(hw: Hardware) -> str:
    """What the installed llama.cpp build promises about one request getting one answer."""
    if not hw.llama_cpp_version:
        return "llama-cpp-python is not installed"
    if hw.llama_batch_invariant <= 0:
        return (
            "no batch-invariant kernels: a wheel built before verm-local 0.3 or without "
            "scripts/patches/ (a user's own CUDA or Metal build): a greedy answer can "
            "depend on the batch, drafts and prompt chunks; scripts/install.sh rebuilds it"
        )
    gpu = (
        "; its GPU backend makes no such promise (llama.cpp's CUDA and Metal kernels "
        "pick their path by batch size): deterministic on the CPU only"
        if hw.llama_gpu_offload
        else ""
    )
    revision = hw.llama_batch_invariant
    if "avx2" not in hw.cpu_flags:
        q8_0 = "Q8_0 matmuls one vec_dot at a time (the tile kernel is x86 AVX2's), "
    elif revision >= 2:
        q8_0 = "Q8_0 matmuls take a tile kernel with vec_dot's sums, "
    else:
        q8_0 = (
            "Q8_0 matmuls one vec_dot at a time (a wheel from before the tile kernel: "
            "the same answers, batches slower; scripts/install.sh rebuilds it), "
        )
    return (
        f"batch-invariant CPU kernels, revision {revision}: K-quant matmuls sum as the "
        f"tiled kernel does for every row count, {q8_0}tinyBLAS, repacked weights and "
        "flash attention's split/tiled paths are left out on request" + gpu
    )


def doctor(
    device: str | None = None,
    variant: str | None = None,
    hardware: Path | Hardware | None = None,
    repack: bool | None = None,
    deterministic: bool | None = None,
) -> dict[str, Any]:
    """The report `doctor --json` prints: hardware, plan, decisions, store, settings."""
    if isinstance(hardware, Path):
        hw = read_record(hardware)
    else:
        hw = hardware or probe(with_torch=True)
    _, plan = plan_here(
        device,
        variant,
        hardware=hw,
        repack=repack if repack is not None else settings().repack,
        deterministic=deterministic,
    )
    path = installed(plan.variant)
    return {
        "hardware": hw.to_dict(),
        "plan": plan.to_dict(),
        "decisions": {
            "repack": {"enabled": plan.repack, "reason": plan.repack_reason},
            "deterministic": {
                "enabled": plan.deterministic.on,
                "reason": plan.deterministic.reason,
                "build": build_guarantees(hw),
            },
            "prefill": plan.prefill.to_dict(),
        },
        "memory": memory_breakdown(plan),
        "store": {
            "variant": plan.variant,
            "path": str(path) if path else None,
            # Where the stored variant came from (a repository and commit, a build, an import).
            "source": (
                (read_manifest(path) or {}).get("store", {}).get("source") if path else None
            ),
        },
        "sandbox": sandbox_level().to_dict(),
        "settings": describe(),
    }
