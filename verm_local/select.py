"""Which variant runs where: a pure function of (hardware record, catalog, user choice).

Policy (the README's table says the same):
- CUDA GPU with a GPU build of llama-cpp-python: the best GGUF quant that fits the GPU's
  free memory fully offloaded, Q8_0 first (near-lossless, half the bytes per token of F16);
  when none fits, Q4_K_M with as many layers on the GPU as fit.
- CUDA GPU, llama-cpp-python without GPU offload, torch with CUDA: transformers with bf16,
  else GPTQ int8 / int4 (GPTQModel) when they fit.
- Apple silicon (Metal): the best GGUF quant that fits Metal's working set, fully offloaded.
- CPU: GGUF Q4_K_M. Decode on a CPU is memory-bandwidth bound and Q4_K_M reads 1.7x fewer
  bytes per token than Q8_0; what it costs in fidelity is measured in docs/fidelity.md.
Refusals name what was needed and what the machine has."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .catalog import (
    CATALOG,
    GB,
    GGUF_LADDER,
    Variant,
    get_variant,
)
from .errors import InputError, PlanError
from .hardware import AMX_FLAGS, Hardware, has_amx
from .memory import ANSWER_RESERVE, Shape, estimate_llamacpp
from .tasks import PROFILES, TaskProfile

DEVICES = ("cuda", "metal", "cpu")
TEXT_LAYERS = Shape().layers  # the 8B text model's layers, the unit of partial offload
# Share of memory a plan may fill: the rest is the OS, other programs, fragmentation.
RAM_SHARE = 0.90
VRAM_SHARE = 0.90
CPU_DEFAULT = "gguf-q4_k_m"


# Text around the images: chat preamble, the prompt (the trained ones are 300-450
# tokens), and slack for a longer prompt file.
TEXT_TOKENS = 1024


def context_size(image_tokens: int, max_tokens: int) -> int:
    """Context that fits two images of `image_tokens`, the prompt and `max_tokens` of
    answer (256-aligned)."""
    need = 2 * image_tokens + TEXT_TOKENS + max_tokens
    return (need + 255) // 256 * 256


def task_context(
    task: TaskProfile | None = None, image_tokens: int | None = None, max_tokens: int | None = None
) -> int:
    """The context a judgement needs at the trained sizes: of one task, or the largest
    over all tasks (a judge that may see any of them). `image_tokens` and `max_tokens`
    replace the profiles' (a caller's lower cap)."""
    profiles = [task] if task is not None else list(PROFILES.values())
    return max(
        context_size(
            min(image_tokens or p.max_image_tokens, p.max_image_tokens), max_tokens or p.max_tokens
        )
        for p in profiles
    )


def default_n_ctx() -> int:
    """The context a default judgement allocates at most before its answer grows: two
    1024-token images (the chart/SVG maximum), the prompt text, and the answer reserve."""
    return context_size(1024, ANSWER_RESERVE)


def full_cap_n_ctx() -> int:
    """The context when an answer runs to its trained cap (the largest over the tasks)."""
    return task_context()


@dataclass(frozen=True)
class PrefillSettings:
    """How llama.cpp evaluates prompts: tokens per compute step, flash attention, KV
    cache type; and why."""

    n_ubatch: int
    flash_attn: bool
    kv_type: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


# Measured side by side with `verm-local bench latency --sweep` on the 8B shape (Q4_K_M,
# one default judgement of a 1024x768 chart pair, 2-core AMD EPYC; benchmarks/README.md,
# "Prefill and memory on a CPU").
# Against llama.cpp's batch of 512 without flash attention (peak 6,235 MB, text prefill
# 39.5 s): n_ubatch 256 with flash attention peaked at 6,018 MB with prefill 36.8 s (the
# attention scores of a step are never materialized, and a step's activations are half);
# flash attention at 512 prefilled fastest (35.3 s) but peaked at 6,119 MB; a q8_0 KV
# cache saved 212 MB more but doubled the prefill (68.7 s): an option (--kv-type q8_0),
# not the default.
CPU_PREFILL = PrefillSettings(
    n_ubatch=256,
    flash_attn=True,
    kv_type="f16",
    reason="measured with `bench latency --sweep` on the 8B shape: the least peak memory "
    "(6,018 MB against 6,235 MB at llama.cpp's 512 without flash attention) and a 7% "
    "faster text prefill; a q8_0 KV cache (--kv-type q8_0) saves 212 MB more but "
    "doubles the prefill",
)
GPU_PREFILL = PrefillSettings(
    n_ubatch=512,
    flash_attn=False,
    kv_type="f16",
    reason="llama.cpp's batch size, flash attention off, f16 KV cache: not measured on "
    "a GPU here, so llama.cpp's own settings stand",
)


def prefill_settings(
    device: str, parallel: int = 1, batch_invariant: bool = False
) -> PrefillSettings:
    """The prefill settings for `device`, the same for one request and for many when the
    kernels are batch-invariant (then flash attention takes its one-row path for every
    row: a batched answer is the answer alone). Without them, flash attention only for
    one request at a time: its batched rows and a lone one round apart, and a served
    answer must not depend on its neighbours in the batch."""
    base = CPU_PREFILL if device == "cpu" else GPU_PREFILL
    if parallel > 1 and base.flash_attn and not batch_invariant:
        return replace(
            base,
            flash_attn=False,
            reason=base.reason + "; flash attention off with --parallel > 1 (a batched "
            "answer must equal the answer alone)",
        )
    return base


# Weight repacking (llama.cpp's extra buffer types) on CPUs without AMX, measured side by
# side with `verm-local bench latency --compare-repack` (benchmarks/README.md, "Repacked
# weights"): on a 2-core AMD EPYC with AVX-512, the 8B text widths (4 layers), two
# 1024x768 images, 2 threads, plain weights made Q4_K_M's prefill 1.54x faster (6.05 s
# -> 3.92 s) and its decode 12% slower (39.3 -> 34.5 tok/s): faster end to end below
# about 600 answer tokens, which covers a judgement; Q8_0 prefilled 4% faster plain but
# decoded 14% slower (27.2 -> 23.9 tok/s): repacked is faster beyond about 80 tokens.
# Elsewhere (AVX2 without AVX-512, ARM) llama.cpp's own default, repacked, stands: those
# layouts were written to speed those CPUs up, and it was not measured here.
_PLAIN_ON_AVX512 = ("Q4_K", "Q4_0")  # quant families measured faster plain with AVX-512


@dataclass(frozen=True)
class Determinism:
    """Whether a greedy judgement's logits are the same bits on every path (alone, batched
    with other requests, with drafted tokens, with a cached prefix, in other prompt
    chunks), and why (`verm-local doctor` prints it; `--json` carries `deterministic`)."""

    on: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def determinism_decision(
    revision: int,
    backend: str = "llamacpp",
    device: str = "cpu",
    gpu_layers: int = 0,
    override: str | bool | None = None,
) -> Determinism:
    """Path-invariant decoding, from the llama.cpp build's batch-invariant kernels
    (`revision`, 0: none), the backend and the device. Repacked weights are not
    batch-invariant either: where this says on, weights load plain unless --repack is
    forced (`repack_decision`), which turns it off. `override` (--deterministic /
    --no-deterministic, VERM_LOCAL_DETERMINISTIC) "on" refuses, with the reason, where it
    cannot hold."""
    if override in (False, "off"):
        return Determinism(
            False, "off: asked for (--no-deterministic or VERM_LOCAL_DETERMINISTIC=off)"
        )
    if override not in (None, "auto", True, "on"):
        raise InputError(f"deterministic must be auto, on or off, not {override!r}")
    why = ""
    if backend != "llamacpp":
        why = (
            "transformers: torch's kernels are not batch-invariant (a judgement runs alone "
            "there; its logits are not promised equal across batch sizes or devices)"
        )
    elif device != "cpu" or gpu_layers != 0:
        why = (
            f"{device}: llama.cpp's GPU kernels pick a matrix-vector or a matrix-matrix "
            "path by the batch's rows, so a row's logits can depend on its batch (not "
            "checked on a GPU here); the batch-invariant kernels are CPU-only"
        )
    elif revision <= 0:
        why = (
            "this llama.cpp build has no batch-invariant kernels (a wheel built before "
            "verm-local 0.3, or one built without scripts/patches/): run scripts/install.sh "
            "to rebuild it"
        )
    if why:
        if override in (True, "on"):
            raise PlanError(f"--deterministic cannot hold: {why}")
        return Determinism(False, f"off: {why}")
    return Determinism(
        True,
        f"on: batch-invariant CPU kernels (revision {revision}): a row's logits do not "
        "depend on the rows beside it, the prompt's chunking or the thread count; "
        "weights load plain (repacked ones are not batch-invariant)",
    )


def repack_decision(
    cpu_flags: tuple[str, ...] | list[str],
    override: str | bool | None = None,
    quant: str | None = None,
    batch_invariant: bool = False,
) -> tuple[bool, str]:
    """Whether llama.cpp loads weights with its extra buffer types (AMX tiles, repacked
    Q4_0/Q4_K layouts), and why. llama.cpp 0.3.36's AMX kernel segfaults for Q8_0 and
    Q4_K_M weights (ggml-org/llama.cpp#20824, ollama/ollama#17205), so CPUs with AMX load
    without them; on other CPUs the measured figures above decide, per quant (`quant`:
    the GGUF's, e.g. "Q4_K_M"; None: the default CPU variant's, Q4_K_M). `override`
    (--repack/--no-repack, VERM_LOCAL_REPACK) wins either way."""
    if override in (True, "on"):
        return True, "on: asked for (--repack or VERM_LOCAL_REPACK=on)"
    if override in (False, "off"):
        return False, "off: asked for (--no-repack or VERM_LOCAL_REPACK=off)"
    if override not in (None, "auto"):
        raise InputError(f"repack must be auto, on or off, not {override!r}")
    if batch_invariant:
        return False, (
            "off: deterministic decoding; repacked weights take a GEMM for blocks of rows "
            "and a GEMV for the rest, which round apart (--repack forces them in and "
            "turns determinism off)"
        )
    if has_amx(cpu_flags):
        found = " ".join(f for f in AMX_FLAGS if f in cpu_flags)
        return False, (
            f"off: this CPU has AMX ({found}); llama.cpp 0.3.36's AMX kernel "
            "crashes on Q8_0 and Q4_K_M weights (ggml-org/llama.cpp#20824), so "
            "weights stay in plain CPU buffers (--repack forces them in)"
        )
    family = (quant or "Q4_K_M").upper()
    if "avx512f" in cpu_flags and family.startswith(_PLAIN_ON_AVX512):
        return False, (
            f"off: {family} on an AVX-512 CPU prefills 1.54x faster in plain "
            "buffers (decode 12% slower), measured with `bench latency "
            "--compare-repack`; a judgement is prefill-bound"
        )
    if "avx512f" in cpu_flags:
        return True, (
            f"on: {family} on an AVX-512 CPU decodes 14% faster repacked (Q8_0, "
            "measured with `bench latency --compare-repack`)"
        )
    return True, "on: llama.cpp's default for this CPU (repacked layouts for AVX2/ARM)"


def decode_path(
    revision: int,
    cpu_flags: tuple[str, ...] | list[str],
    *,
    backend: str = "llamacpp",
    device: str = "cpu",
    gpu_layers: int = 0,
    quant: str | None = None,
    repack: str | bool | None = None,
    deterministic: str | bool | None = None,
) -> tuple[Determinism, bool, str]:
    """Determinism and weight repacking decided together (repacked weights are not
    batch-invariant): (determinism, repack, why repack). A forced --repack turns auto
    determinism off; with --deterministic it is refused."""
    det = determinism_decision(revision, backend, device, gpu_layers, deterministic)
    use_repack, why = repack_decision(cpu_flags, repack, quant, batch_invariant=det.on)
    if det.on and use_repack and device == "cpu":
        if deterministic in (True, "on"):
            raise PlanError(
                "--deterministic and --repack do not go together: repacked weights are "
                "not batch-invariant"
            )
        det = Determinism(False, "off: --repack forces repacked weights in (not batch-invariant)")
    return det, use_repack, why


@dataclass(frozen=True)
class Plan:
    variant: str
    backend: str  # "llamacpp" | "transformers"
    device: str  # "cuda" | "metal" | "cpu"
    gpu_layers: int  # llama.cpp layers on the GPU: -1 all, 0 none
    threads: int
    n_ctx: int
    memory_bytes: int  # what the plan needs where the weights live
    budget_bytes: int  # what that place offers (after the share kept free)
    vision: str
    reasons: tuple[str, ...]
    repack: bool = True  # llama.cpp extra buffer types (AMX / repacked layouts)
    repack_reason: str = ""
    prefill: PrefillSettings = GPU_PREFILL
    # The peak when an answer runs to the trained cap and the context grows to hold it.
    memory_full_cap_bytes: int = 0
    deterministic: Determinism = Determinism(False, "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        fields = dict(data)
        if isinstance(fields.get("prefill"), dict):
            fields["prefill"] = PrefillSettings(**fields["prefill"])
        if isinstance(fields.get("deterministic"), dict):
            fields["deterministic"] = Determinism(**fields["deterministic"])
        fields["reasons"] = tuple(fields.get("reasons", ()))
        return cls(**fields)


class _NoFit(Exception):
    """This device cannot take the request; try the next one (or refuse with the reason)."""


def _gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB"


def select_plan(
    hw: Hardware,
    *,
    device: str | None = None,
    variant: str | None = None,
    n_ctx: int | None = None,
    catalog: dict[str, Variant] = CATALOG,
    repack: str | bool | None = None,
    deterministic: str | bool | None = None,
) -> Plan:
    """The plan for this machine; `device` and `variant` override the choice, `repack`
    and `deterministic` the CPU decisions. Raises PlanError with the reason when the
    request cannot run here."""
    n_ctx = n_ctx or default_n_ctx()
    want = get_variant(variant) if variant else None
    if want is not None and want.name not in catalog:
        raise PlanError(f"variant {want.name} is not in this catalog")
    if device in (None, "", "auto"):
        order = [d for d, ok in (("cuda", bool(hw.cuda)), ("metal", hw.metal)) if ok] + ["cpu"]
    elif device in DEVICES:
        order = [device]
        if device == "cuda" and not hw.cuda:
            raise PlanError("--device cuda: no CUDA device found (nvidia-smi lists none)")
        if device == "metal" and not hw.metal:
            raise PlanError("--device metal: this is not an Apple-silicon Mac")
    else:
        raise PlanError(f"unknown device {device!r}; choose cuda, metal or cpu")
    skipped: list[str] = []
    for dev in order:
        try:
            plan = _PLANNERS[dev](hw, want, n_ctx, catalog)
        except _NoFit as exc:
            if len(order) == 1:
                raise PlanError(str(exc)) from None
            skipped.append(f"not {dev}: {exc}")
            continue
        det, use_repack, why_repack = decode_path(
            hw.llama_batch_invariant,
            hw.cpu_flags,
            backend=plan.backend,
            device=plan.device,
            gpu_layers=plan.gpu_layers,
            quant=catalog[plan.variant].quant,
            repack=repack,
            deterministic=deterministic,
        )
        return replace(
            plan,
            reasons=tuple(skipped) + plan.reasons,
            repack=use_repack,
            repack_reason=why_repack,
            deterministic=det,
            prefill=prefill_settings(plan.device, batch_invariant=det.on),
        )
    raise PlanError("; ".join(skipped))


def _vision(hw: Hardware, backend: str, device: str) -> str:
    if backend == "transformers":
        return "the checkpoint's own vision tower (transformers)"
    if device != "cpu":
        return f"mmproj, offloaded to {device}"
    if "CPUExecutionProvider" in hw.onnxruntime_providers:
        return (
            "ONNX Runtime tower when one is kept in <model>/onnx (faster on a CPU), else the mmproj"
        )
    return "mmproj (onnxruntime not installed)"


def _plan(
    hw: Hardware,
    v: Variant,
    device: str,
    layers: int,
    need: int,
    budget: int,
    n_ctx: int,
    *reasons: str,
) -> Plan:
    return Plan(
        variant=v.name,
        backend=v.backend,
        device=device,
        gpu_layers=layers,
        threads=hw.threads,
        n_ctx=n_ctx,
        memory_bytes=need,
        budget_bytes=budget,
        vision=_vision(hw, v.backend, device),
        reasons=tuple(reasons),
        prefill=prefill_settings(device),
    )


def _gguf_on_gpu(
    hw: Hardware,
    want: Variant | None,
    n_ctx: int,
    catalog: dict[str, Variant],
    device: str,
    budget: int,
    where: str,
) -> Plan:
    """Full offload of the best GGUF quant that fits, else partial offload."""
    if not hw.llama_gpu_offload:
        flag = "-DGGML_CUDA=on" if device == "cuda" else "-DGGML_METAL=on"
        raise _NoFit(
            f"this llama-cpp-python build cannot offload to a GPU; reinstall it "
            f'with CMAKE_ARGS="{flag}" (see README)'
        )
    candidates = [want] if want else [catalog[n] for n in GGUF_LADDER if n in catalog]
    for v in candidates:
        need = v.memory_bytes(n_ctx)
        if need <= budget:
            why = f"{v.name} fits {where} fully offloaded ({_gb(need)} of {_gb(budget)})"
            if want is None:
                why += (
                    "; the best-fidelity quant that fits (Q8_0 is near-lossless and reads "
                    "half the bytes of F16 per token)"
                )
            return _plan(hw, v, device, -1, need, budget, n_ctx, why)
    v = candidates[-1]
    # What stays on the GPU whatever the layers: the projector, the KV cache, buffers.
    fixed = estimate_llamacpp(0, v.size_bytes - v.text_bytes, n_ctx, one_shot=False).peak
    per_layer = v.text_bytes / TEXT_LAYERS
    layers = int(max(0, budget - fixed) // per_layer)
    rest = int(v.text_bytes - layers * per_layer)
    ram = int(hw.ram_total * RAM_SHARE)
    if layers == 0 or rest > ram:
        raise _NoFit(
            f"{v.name} needs {_gb(v.memory_bytes(n_ctx))}; {where} offers "
            f"{_gb(budget)} and RAM {_gb(ram)} cannot hold the rest"
        )
    need = int(fixed + layers * per_layer)
    return _plan(
        hw,
        v,
        device,
        layers,
        need,
        budget,
        n_ctx,
        f"{v.name} does not fit {where} ({_gb(v.memory_bytes(n_ctx))} > "
        f"{_gb(budget)}): {layers} of {TEXT_LAYERS} layers offloaded, the rest "
        f"({_gb(rest)}) in RAM",
    )


def _plan_cuda(hw: Hardware, want: Variant | None, n_ctx: int, catalog: dict[str, Variant]) -> Plan:
    gpu = max(hw.cuda, key=lambda g: g.free_bytes)
    budget = int(gpu.free_bytes * VRAM_SHARE)
    where = f"{gpu.name} ({_gb(gpu.free_bytes)} free)"
    if want is not None and want.backend == "transformers":
        return _transformers_on_cuda(hw, [want], n_ctx, budget, where)
    try:
        return _gguf_on_gpu(hw, want, n_ctx, catalog, "cuda", budget, where)
    except _NoFit as exc:
        if want is not None or not hw.torch_cuda:
            raise
        order = [catalog[n] for n in ("bf16", "gptq-int8", "gptq-int4") if n in catalog]
        plan = _transformers_on_cuda(hw, order, n_ctx, budget, where)
        return replace(plan, reasons=(f"GGUF: {exc}",) + plan.reasons)


def _transformers_on_cuda(
    hw: Hardware, order: list[Variant], n_ctx: int, budget: int, where: str
) -> Plan:
    if hw.torch_cuda is False:
        raise _NoFit("torch here has no CUDA support; the transformers backend cannot use the GPU")
    tried = []
    for v in order:
        if v.format == "gptq" and not hw.gptqmodel:
            tried.append(f"{v.name}: GPTQModel is not installed (pip install 'verm-local[gptq]')")
            continue
        need = v.memory_bytes(n_ctx)
        if need <= budget:
            return _plan(
                hw,
                v,
                "cuda",
                0,
                need,
                budget,
                n_ctx,
                f"{v.name} on transformers fits {where} ({_gb(need)} of {_gb(budget)})",
            )
        tried.append(f"{v.name} needs {_gb(need)}, {where} offers {_gb(budget)}")
    raise _NoFit("; ".join(tried))


def _plan_metal(
    hw: Hardware, want: Variant | None, n_ctx: int, catalog: dict[str, Variant]
) -> Plan:
    budget = int(hw.metal_working_set or hw.ram_total * 0.67)
    where = f"Metal's working set ({_gb(budget)} of {_gb(hw.ram_total)} unified memory)"
    if want is not None and want.format == "gptq":
        raise _NoFit("GPTQ kernels do not run on Metal; use a GGUF variant")
    if want is not None and want.backend == "transformers":
        need = want.memory_bytes(n_ctx)
        if need > budget:
            raise _NoFit(f"{want.name} needs {_gb(need)}, {where}")
        return _plan(
            hw,
            want,
            "metal",
            0,
            need,
            budget,
            n_ctx,
            f"{want.name} on transformers with MPS fits ({_gb(need)})",
        )
    return _gguf_on_gpu(hw, want, n_ctx, catalog, "metal", budget, where)


def _plan_cpu(hw: Hardware, want: Variant | None, n_ctx: int, catalog: dict[str, Variant]) -> Plan:
    budget = int(hw.ram_total * RAM_SHARE)
    v = want or catalog[CPU_DEFAULT]
    if v.format == "gptq" and not hw.gptqmodel:
        raise _NoFit(f"{v.name} needs GPTQModel: pip install 'verm-local[gptq]'")
    # transformers on a CPU runs float32 (see docs/fidelity.md): twice bf16's weights.
    # llama.cpp: one-shot judging (vision phase, then text phase) at the CPU settings.
    pre = prefill_settings("cpu")
    fields = dict(
        dtype_bytes=4 if v.format == "hf" else 2,
        one_shot=True,
        flash_attn=pre.flash_attn,
        n_ubatch=pre.n_ubatch,
        kv_type=pre.kv_type,
    )
    need = v.memory_bytes(n_ctx, **fields)
    full = v.memory_bytes(max(n_ctx, full_cap_n_ctx()), **fields)
    if need > budget:
        which = f"{v.name}" if want else f"{v.name} (the smallest variant planned for a CPU)"
        raise _NoFit(
            f"{which} needs {_gb(need)} of RAM at context {n_ctx}; this "
            f"machine has {_gb(budget)} usable ({RAM_SHARE:.0%} of {_gb(hw.ram_total)})"
        )
    reasons = [f"{v.name} fits RAM ({_gb(need)} of {_gb(budget)} usable)"]
    if want is None:
        reasons.append(
            "on a CPU decode is memory-bandwidth bound: Q4_K_M reads 1.7x fewer "
            "bytes per token than Q8_0 (fidelity cost: docs/fidelity.md)"
        )
    if hw.ram_available < need:
        reasons.append(f"only {_gb(hw.ram_available)} is free now: close other programs")
    if full > budget:
        reasons.append(
            f"an answer that runs to the trained cap grows the context to "
            f"{full_cap_n_ctx()} tokens ({_gb(full)}), more than this machine offers: "
            "such an answer fails with an out-of-memory error (--max-tokens lowers the cap)"
        )
    plan = _plan(hw, v, "cpu", 0, need, budget, n_ctx, *reasons)
    return replace(plan, memory_full_cap_bytes=full)


_PLANNERS = {"cuda": _plan_cuda, "metal": _plan_metal, "cpu": _plan_cpu}
