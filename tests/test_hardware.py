"""Hardware-dependent decisions from recorded machines: llama.cpp's extra buffer types
(AMX / repacked weights) and the wheel cache key. The CPUs under tests/data/cpuinfo are an
AWS m7i (Intel Sapphire Rapids, AMX), this project's AMD EPYC development machine and an
AWS Graviton3 (ARM); the Apple machine is a hardware record (no /proc/cpuinfo on macOS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from verm_local.errors import InputError
from verm_local.hardware import (
    AMX_FLAGS,
    Hardware,
    gptq_cpu_kernels,
    gptq_cpu_workers,
    has_amx,
    isa_flags,
    parse_cpu_quota,
    parse_cpuinfo,
    patches_digest,
    probe_cpus_usable,
    usable_cpus,
    wheel_key,
)
from verm_local.select import repack_decision, select_plan

from .conftest import run_here

DATA = Path(__file__).parent / "data" / "cpuinfo"
ROOT = Path(__file__).resolve().parent.parent


def cpuinfo(name: str) -> str:
    return (DATA / f"{name}.txt").read_text()


def record(name: str, **kw) -> Hardware:
    model, flags, cores = parse_cpuinfo(cpuinfo(name))
    base = dict(
        os="linux",
        arch="arm64" if "graviton" in name else "x86_64",
        cpu_model=model,
        cores_logical=4,
        cores_physical=cores,
        cpu_flags=flags,
        ram_total=32 << 30,
        ram_available=24 << 30,
        llama_cpp_version="0.3.36",
    )
    return Hardware(**{**base, **kw})


APPLE_M2 = Hardware(
    os="darwin",
    arch="arm64",
    cpu_model="Apple M2",
    cores_logical=8,
    cores_physical=8,
    cpu_flags=("neon",),
    ram_total=16 << 30,
    ram_available=10 << 30,
    metal=True,
    metal_working_set=int(16 * 2**30 * 0.67),
    llama_cpp_version="0.3.36",
    llama_gpu_offload=True,
)


def test_recorded_cpus_are_read():
    spr = record("sapphire-rapids-m7i")
    assert spr.cpu_model == "Intel(R) Xeon(R) Platinum 8488C"
    assert set(AMX_FLAGS) <= set(spr.cpu_flags) and spr.amx
    assert "avx512f" in spr.cpu_flags and spr.cores_physical == 2
    amd = record("amd-epyc-dev")
    assert "avx2" in amd.cpu_flags and not amd.amx
    arm = record("graviton3-arm64")
    assert "neon" in arm.cpu_flags and "sve" in arm.cpu_flags and not arm.amx
    assert not APPLE_M2.amx


def test_threads_stay_within_the_cpus_a_process_may_use():
    """A container's CPU quota or a process's affinity mask caps the thread count: more
    llama.cpp threads than CPUs wait on one another (measured: two 2-thread decodes on 2
    CPUs ran 5.5x slower than one)."""
    assert parse_cpu_quota("200000 100000\n") == 2.0  # cgroup v2 cpu.max
    assert parse_cpu_quota("150000 100000") == 1.5
    assert parse_cpu_quota("max 100000") is None
    assert parse_cpu_quota("50000\n", "100000\n") == 0.5  # cgroup v1 quota, period
    assert parse_cpu_quota("-1", "100000") is None
    assert parse_cpu_quota("garbage") is None and parse_cpu_quota("") is None
    assert usable_cpus(64, None, 64) == 64
    assert usable_cpus(64, 1.5, 64) == 2  # a quota of 1.5 CPUs keeps two busy part-time
    assert usable_cpus(3, 8.0, 64) == 3  # taskset -c 0-2
    assert usable_cpus(None, 0.25, 8) == 1
    # A 32-core (64 logical) host seen from a container given 4 CPUs: 4 threads.
    host = record("sapphire-rapids-m7i", cores_logical=64, cores_physical=32)
    assert host.threads == 32
    assert Hardware.from_dict({**host.to_dict(), "cpus_usable": 4}).threads == 4
    assert Hardware.from_dict({**host.to_dict(), "cpus_usable": 48}).threads == 32
    # A record from before the field reads as all CPUs usable.
    old = host.to_dict()
    del old["cpus_usable"]
    assert Hardware.from_dict(old).threads == 32
    # This process, pinned to one CPU in a child: the probe and llama.cpp's default follow.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from verm_local.hardware import default_threads, probe_cpus_usable; "
        "print(probe_cpus_usable(), default_threads())"
    )
    if hasattr(os, "sched_setaffinity"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.split() == ["1", "1"], out.stderr
    assert 1 <= probe_cpus_usable() <= (os.cpu_count() or 1)
    # GPTQModel's loader takes 2 workers from its CPU pool: never fewer, even on 1 CPU.
    assert gptq_cpu_workers(1) == 2 and gptq_cpu_workers(8) == 8


def test_gptq_kernels_to_build_follow_the_cpu():
    """scripts/install.sh builds the GPTQModel CPU kernels the machine loads: the packer
    everywhere, the fused int4 kernel only where GPTQModel's loader takes it (Linux x86-64
    with AVX512-BF16 and the AVX-512 parts it is compiled for)."""
    both = ("pack_block_cpu", "int4_qzero_group_scaled_cpu")
    assert gptq_cpu_kernels(record("amd-epyc-dev")) == both
    assert gptq_cpu_kernels(record("sapphire-rapids-m7i")) == both
    assert gptq_cpu_kernels(record("graviton3-arm64")) == ("pack_block_cpu",)
    assert gptq_cpu_kernels(APPLE_M2) == ("pack_block_cpu",)
    amd = record("amd-epyc-dev")
    avx2_laptop = replace(amd, cpu_flags=("avx", "avx2", "fma", "f16c"))
    assert gptq_cpu_kernels(avx2_laptop) == ("pack_block_cpu",)
    # AVX-512 without BF16 (Skylake-X, Ice Lake) or without VBMI: not that kernel.
    no_bf16 = tuple(f for f in amd.cpu_flags if f != "avx512_bf16")
    no_vbmi = tuple(f for f in amd.cpu_flags if f != "avx512vbmi")
    assert gptq_cpu_kernels(replace(amd, cpu_flags=no_bf16)) == ("pack_block_cpu",)
    assert gptq_cpu_kernels(replace(amd, cpu_flags=no_vbmi)) == ("pack_block_cpu",)
    # Windows on the same CPU: GPTQModel's kernel is Linux's.
    assert gptq_cpu_kernels(replace(amd, os="windows")) == ("pack_block_cpu",)


def test_amx_cpu_loads_without_extra_buffer_types():
    use, why = repack_decision(record("sapphire-rapids-m7i").cpu_flags)
    assert use is False
    assert "AMX" in why and "amx_tile" in why and "20824" in why
    plan = select_plan(record("sapphire-rapids-m7i"))
    assert plan.repack is False and plan.repack_reason == why


def test_avx512_cpus_follow_the_measured_figures():
    """On this project's AVX-512 EPYC, `bench latency --compare-repack` measured Q4_K_M
    faster plain (prefill-bound judgements) and Q8_0 faster repacked (decode)."""
    amd = record("amd-epyc-dev")
    use, why = repack_decision(amd.cpu_flags, quant="Q4_K_M")
    assert use is False and "measured" in why and "prefill" in why
    use, why = repack_decision(amd.cpu_flags, quant="Q8_0")
    assert use is True and "measured" in why
    assert select_plan(amd).repack is False  # the CPU plan is Q4_K_M
    assert select_plan(amd, variant="gguf-q8_0").repack is True


@pytest.mark.parametrize("machine", ["graviton3-arm64", "apple"])
def test_other_cpus_keep_llama_cpp_default(machine):
    hw = APPLE_M2 if machine == "apple" else record(machine)
    for quant in ("Q4_K_M", "Q8_0"):
        use, why = repack_decision(hw.cpu_flags, quant=quant)
        assert use is True and "default" in why
    assert select_plan(hw).repack is True


def test_override_both_ways():
    spr, amd = record("sapphire-rapids-m7i").cpu_flags, record("amd-epyc-dev").cpu_flags
    assert repack_decision(spr, True)[0] is True and repack_decision(spr, "on")[0] is True
    assert repack_decision(amd, False)[0] is False and repack_decision(amd, "off")[0] is False
    assert "asked for" in repack_decision(spr, "on")[1]
    assert repack_decision(spr, "auto")[0] is False
    with pytest.raises(InputError):
        repack_decision(amd, "sometimes")


def test_environment_override_reaches_the_backend_choice(monkeypatch):
    from verm_local.backends.llamacpp import repack_choice

    monkeypatch.setenv("VERM_LOCAL_REPACK", "off")
    assert repack_choice(None, "Q8_0")[0] is False
    assert repack_choice(True)[0] is True  # the flag wins over the environment
    monkeypatch.setenv("VERM_LOCAL_REPACK", "on")
    assert repack_choice(None, "Q4_K_M")[0] is True
    monkeypatch.setenv("VERM_LOCAL_REPACK", "maybe")
    with pytest.raises(InputError, match="VERM_LOCAL_REPACK"):
        repack_choice(None)


def test_doctor_shows_the_decision_for_a_recorded_amx_machine(tmp_path):
    rec = tmp_path / "m7i.json"
    rec.write_text(json.dumps(record("sapphire-rapids-m7i").to_dict()))
    proc = run_here("doctor", "--json", "--hardware", rec)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["decisions"]["repack"]["enabled"] is False
    assert "AMX" in out["decisions"]["repack"]["reason"]
    assert out["plan"]["repack"] is False
    forced = json.loads(run_here("doctor", "--json", "--hardware", rec, "--repack").stdout)
    assert forced["decisions"]["repack"]["enabled"] is True
    env = json.loads(
        run_here("doctor", "--json", "--hardware", rec, env={"VERM_LOCAL_REPACK": "on"}).stdout
    )
    assert env["decisions"]["repack"]["enabled"] is True
    text = run_here("doctor", "--hardware", rec)
    assert "repack" in text.stdout and "AMX" in text.stdout
    assert any(r["variable"] == "VERM_LOCAL_REPACK" for r in out["settings"])


def test_wheel_cache_key_follows_the_instruction_set():
    spr, amd = isa_flags(cpuinfo("sapphire-rapids-m7i")), isa_flags(cpuinfo("amd-epyc-dev"))
    arm = isa_flags(cpuinfo("graviton3-arm64"))
    assert has_amx(spr) and not has_amx(amd)
    keys = {
        wheel_key("0.3.36", "", "x86_64", spr),
        wheel_key("0.3.36", "", "x86_64", amd),
        wheel_key("0.3.36", "", "arm64", arm),
    }
    assert len(keys) == 3
    # Same instruction set, other kernel or hypervisor flags: the same wheel fits.
    noisy = cpuinfo("amd-epyc-dev").replace("flags\t\t: ", "flags\t\t: hypervisor constant_tsc ")
    assert wheel_key("0.3.36", "", "x86_64", isa_flags(noisy)) == wheel_key(
        "0.3.36", "", "x86_64", amd
    )
    # One extension fewer (a CPU without AVX-512): another wheel.
    no512 = tuple(f for f in amd if not f.startswith("avx512"))
    assert wheel_key("0.3.36", "", "x86_64", no512) != wheel_key("0.3.36", "", "x86_64", amd)
    # Build flags and versions count too.
    assert wheel_key("0.3.36", "-DGGML_CUDA=on", "x86_64", amd) != wheel_key(
        "0.3.36", "", "x86_64", amd
    )
    assert wheel_key("0.3.37", "", "x86_64", amd) != wheel_key("0.3.36", "", "x86_64", amd)


def test_install_script_key_is_the_package_key():
    """scripts/wheel_key.py (what install.sh runs before any venv exists) computes the same
    key as the package, from a recorded cpuinfo."""
    for name in ("sapphire-rapids-m7i", "amd-epyc-dev"):
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "wheel_key.py"),
                "--version",
                "0.3.36",
                "--cmake-args=-DGGML_CUDA=on",
                "--cpuinfo",
                str(DATA / f"{name}.txt"),
                "--arch",
                "x86_64",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        patches = patches_digest(ROOT / "scripts" / "patches")
        assert patches  # the batch-invariant kernels are part of every build
        assert out == wheel_key(
            "0.3.36", "-DGGML_CUDA=on", "x86_64", isa_flags(cpuinfo(name)), patches
        )
    assert "wheel_key.py" in (ROOT / "scripts" / "install.sh").read_text()
