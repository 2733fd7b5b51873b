"""Runtime selection over recorded machines, the real probe on this one, and `doctor`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from verm_local.errors import PlanError
from verm_local.hardware import (
    GpuDevice,
    Hardware,
    metal_working_set,
    parse_cpuinfo,
    parse_nvidia_smi,
    probe,
)
from verm_local.select import select_plan

from .conftest import run_here

GiB = 2**30


def machine(ram_gib: float, **kw) -> Hardware:
    base = dict(
        os="linux",
        arch="x86_64",
        cpu_model="test cpu",
        cores_logical=8,
        cores_physical=4,
        cpu_flags=("avx2", "fma"),
        ram_total=int(ram_gib * GiB),
        ram_available=int(ram_gib * GiB * 0.8),
        llama_cpp_version="0.3.36",
    )
    base.update(kw)
    return Hardware(**base)


def cuda_box(name: str, vram_gib: float, ram_gib: float, **kw) -> Hardware:
    gpu = GpuDevice(0, name, int(vram_gib * GiB), int(vram_gib * GiB * 0.97))
    fields = dict(
        cores_logical=32,
        cores_physical=16,
        cuda=(gpu,),
        llama_gpu_offload=True,
        torch_version="2.14.1",
        torch_cuda=True,
        gptqmodel=True,
    )
    return machine(ram_gib, **{**fields, **kw})


LAPTOP_8GB = machine(8, cores_logical=4, cores_physical=2)
M2_16GB = machine(
    16,
    os="darwin",
    arch="arm64",
    cpu_model="Apple M2",
    cpu_flags=("neon",),
    metal=True,
    metal_working_set=metal_working_set(16 * GiB),
    llama_gpu_offload=True,
)
RTX4090 = cuda_box("NVIDIA GeForce RTX 4090", 24, 64)
H100 = cuda_box("NVIDIA H100 80GB HBM3", 80, 512)
TINY_4GB = machine(4, cores_logical=2, cores_physical=2)


def test_cpu_laptop_gets_q4_k_m_on_cpu():
    plan = select_plan(LAPTOP_8GB)
    assert (plan.variant, plan.backend, plan.device, plan.gpu_layers) == (
        "gguf-q4_k_m",
        "llamacpp",
        "cpu",
        0,
    )
    assert plan.threads == 2  # physical cores
    assert plan.memory_bytes <= plan.budget_bytes
    assert any("memory-bandwidth" in r for r in plan.reasons)


def test_m2_gets_best_quant_in_metal_working_set():
    plan = select_plan(M2_16GB)
    assert (plan.device, plan.gpu_layers, plan.backend) == ("metal", -1, "llamacpp")
    # Q8_0 (about 11 GB with context) fits two thirds of 16 GiB; F16 would not.
    assert plan.variant == "gguf-q8_0"
    assert plan.memory_bytes <= plan.budget_bytes == int(16 * GiB * 0.67)
    assert "mmproj, offloaded to metal" == plan.vision


@pytest.mark.parametrize("box", [RTX4090, H100], ids=["rtx4090", "h100"])
def test_cuda_gpus_get_q8_0_fully_offloaded(box):
    plan = select_plan(box)
    assert (plan.variant, plan.device, plan.gpu_layers) == ("gguf-q8_0", "cuda", -1)
    assert box.cuda[0].name in plan.reasons[0]


def test_small_gpu_gets_partial_offload():
    box = cuda_box("NVIDIA GeForce GTX 1650", 4, 32)
    plan = select_plan(box)
    assert plan.variant == "gguf-q4_k_m" and plan.device == "cuda"
    assert 0 < plan.gpu_layers < 36
    assert plan.memory_bytes <= plan.budget_bytes
    assert "layers offloaded" in plan.reasons[0]


def test_cpu_build_of_llama_on_a_cuda_box_uses_transformers():
    box = cuda_box("NVIDIA H100 80GB HBM3", 80, 512, llama_gpu_offload=False)
    plan = select_plan(box)
    assert (plan.variant, plan.backend, plan.device) == ("bf16", "transformers", "cuda")
    assert "CMAKE_ARGS" in plan.reasons[0]
    # Without torch CUDA either, the CPU is used and the reason says why not CUDA.
    box = cuda_box("NVIDIA H100 80GB HBM3", 80, 512, llama_gpu_offload=False, torch_cuda=False)
    plan = select_plan(box)
    assert plan.device == "cpu" and plan.variant == "gguf-q4_k_m"
    assert plan.reasons[0].startswith("not cuda:")


def test_4gb_machine_is_refused_with_reason():
    with pytest.raises(PlanError) as err:
        select_plan(TINY_4GB)
    msg = str(err.value)
    assert "gguf-q4_k_m" in msg and "needs" in msg and "usable" in msg


def test_overrides_and_impossible_requests():
    plan = select_plan(RTX4090, device="cpu")
    assert plan.device == "cpu" and plan.gpu_layers == 0
    plan = select_plan(RTX4090, variant="gptq-int4")
    assert (plan.backend, plan.device) == ("transformers", "cuda")
    plan = select_plan(H100, variant="gguf-f16")
    assert plan.variant == "gguf-f16" and plan.gpu_layers == -1
    with pytest.raises(PlanError, match="no CUDA device"):
        select_plan(LAPTOP_8GB, device="cuda")
    with pytest.raises(PlanError, match="not an Apple-silicon Mac"):
        select_plan(RTX4090, device="metal")
    with pytest.raises(PlanError, match="GPTQ kernels do not run on Metal"):
        select_plan(M2_16GB, variant="gptq-int4")
    with pytest.raises(PlanError, match="bf16 needs .* of RAM"):
        select_plan(LAPTOP_8GB, variant="bf16")  # float32 on a CPU: 35 GB
    with pytest.raises(PlanError, match="GPTQModel"):
        select_plan(machine(64), variant="gptq-int8")
    with pytest.raises(PlanError, match="unknown device"):
        select_plan(LAPTOP_8GB, device="tpu")
    no_offload = machine(64, cuda=RTX4090.cuda)
    with pytest.raises(PlanError, match="CMAKE_ARGS"):
        select_plan(no_offload, device="cuda", variant="gguf-q8_0")


def test_parsers_on_recorded_output():
    smi = "0, NVIDIA H100 80GB HBM3, 81559, 80770\n1, NVIDIA H100 80GB HBM3, 81559, 1000\n"
    gpus = parse_nvidia_smi(smi)
    assert [g.index for g in gpus] == [0, 1] and gpus[0].total_bytes == 81559 * 2**20
    cpuinfo = (
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nphysical id\t: 0\ncore id\t: 0\n"
        "flags\t\t: fpu avx2 fma avx512f avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nphysical id\t: 0\ncore id\t: 0\n"
        "flags\t\t: fpu avx2 fma avx512f avx512_bf16\n"
    )
    model, flags, cores = parse_cpuinfo(cpuinfo)
    assert model == "AMD EPYC 9R14" and cores == 1
    assert flags == ("avx2", "fma", "avx512f", "avx512_bf16")
    assert parse_cpuinfo("Features\t: fp asimd\n")[1] == ("neon",)


def test_real_probe_and_plan_on_this_machine():
    hw = probe(with_torch=False)
    assert hw.ram_total > 0 and hw.cores_logical >= 1 and hw.llama_cpp_version == "0.3.36"
    assert Hardware.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw
    plan = select_plan(hw)
    assert plan.device == (
        "cuda" if hw.cuda and hw.llama_gpu_offload else "metal" if hw.metal else plan.device
    )
    assert plan.reasons


def test_doctor_prints_plan_and_reads_recorded_machines(tmp_path):
    proc = run_here("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "plan" in proc.stdout and "why" in proc.stdout
    proc = run_here("doctor", "--json")
    out = json.loads(proc.stdout)
    assert set(out) == {"hardware", "plan", "store", "decisions", "memory", "settings", "sandbox"}
    assert out["plan"]["reasons"]
    # The renders' isolation on this machine (issue 25), with why.
    assert out["sandbox"]["name"] in ("bwrap", "limited", "none") and out["sandbox"]["reason"]
    recorded = tmp_path / "m2.json"
    recorded.write_text(json.dumps(M2_16GB.to_dict()))
    out = json.loads(run_here("doctor", "--json", "--hardware", recorded).stdout)
    assert (out["plan"]["variant"], out["plan"]["device"]) == ("gguf-q8_0", "metal")
    recorded.write_text(json.dumps(TINY_4GB.to_dict()))
    proc = run_here("doctor", "--hardware", recorded)
    assert proc.returncode == 5 and "needs" in proc.stderr and "Traceback" not in proc.stderr


def test_cpu_plan_carries_the_measured_prefill_settings_and_its_memory():
    """An 8 GB laptop: the plan's peak is the one-shot judgement's (text phase: weights,
    KV cache of the default context, compute buffers at the CPU settings), within the
    6 GB such a laptop leaves a process; an answer running to the trained cap needs more
    and the plan says so."""
    from verm_local.catalog import CATALOG
    from verm_local.memory import estimate_llamacpp
    from verm_local.select import CPU_PREFILL, default_n_ctx, prefill_settings

    plan = select_plan(LAPTOP_8GB)
    assert plan.prefill == CPU_PREFILL and "measured" in plan.prefill.reason
    v = CATALOG[plan.variant]
    est = estimate_llamacpp(
        v.text_bytes,
        v.size_bytes - v.text_bytes,
        default_n_ctx(),
        kv_type=CPU_PREFILL.kv_type,
        flash_attn=CPU_PREFILL.flash_attn,
        n_ubatch=CPU_PREFILL.n_ubatch,
    )
    assert plan.memory_bytes == est.peak == est.text_phase <= 6.0e9
    assert est.vision_phase < est.text_phase
    assert plan.memory_full_cap_bytes > plan.memory_bytes
    # Served batches keep flash attention off: an answer must not depend on its batch.
    assert not prefill_settings("cpu", parallel=8).flash_attn
    assert prefill_settings("cuda").n_ubatch == 512
    # doctor --json carries the breakdown and the decision, from a recorded machine.
    rec = json.dumps({"hardware": LAPTOP_8GB.to_dict()})
    from verm_local.doctor import doctor

    path = Path(tempfile.mkdtemp()) / "laptop.json"
    path.write_text(rec)
    report = doctor(hardware=path)
    assert report["memory"]["peak"] == plan.memory_bytes
    assert report["memory"]["kv_cache"] > 0 and report["memory"]["text_weights"] == v.text_bytes
    assert report["decisions"]["prefill"]["n_ubatch"] == CPU_PREFILL.n_ubatch
