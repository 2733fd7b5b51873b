"""What this machine has: pure probes that return one record.

Each probe reads one source (a file, a command's output, an import) and the parsing is a
pure function of that text, so the selection can be tested on recorded machines
(`Hardware.from_dict`) and `verm-local doctor` prints exactly what selection saw."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The CPU features llama.cpp's kernels are built for (and a wheel built with GGML_NATIVE
# depends on), and those GPTQModel's fused CPU kernel needs (GPTQ_AVX512_BF16), as
# /proc/cpuinfo names them; "neon" stands for ARM's asimd.
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "sve",
)
# GPTQModel's fused int4 CPU kernel (its torch_cpu_avx512 layers) is compiled for these,
# on Linux x86-64 only (gptqmodel.utils.cpu_features.has_avx512_bf16; XSAVE, which it
# also asks for, comes with every AVX-512 CPU).
GPTQ_AVX512_BF16 = ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16")
# Intel Advanced Matrix Extensions (Sapphire Rapids and later): llama.cpp's AMX kernel.
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
# Instruction-set extensions a compiler may use when it builds for the machine it runs on
# (llama.cpp's default GGML_NATIVE): a wheel built where one of these is present can die
# with SIGILL where it is not. The wheel cache is keyed by them (`wheel_key`); flags that
# only describe the kernel or the hypervisor (constant_tsc, hypervisor, ...) are not.
ISA_FLAGS = (
    "sse",
    "sse2",
    "sse3",
    "pni",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "popcnt",
    "aes",
    "pclmulqdq",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi1",
    "bmi2",
    "lzcnt",
    "abm",
    "movbe",
    "adx",
    "sha_ni",
    "vaes",
    "vpclmulqdq",
    "gfni",
    "avx_vnni",
    "avx_vnni_int8",
    "avx_ifma",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
    "asimd",
    "fp",
    "fphp",
    "asimdhp",
    "asimddp",
    "dotprod",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
    "sme",
)


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Hardware:
    os: str  # "linux" | "darwin" | "windows"
    arch: str  # "x86_64" | "arm64" | ...
    cpu_model: str
    cores_logical: int
    cores_physical: int | None
    cpu_flags: tuple[str, ...]
    ram_total: int
    ram_available: int
    cuda: tuple[GpuDevice, ...] = ()
    metal: bool = False  # Apple silicon GPU
    metal_working_set: int | None = None  # what Metal lets one process keep resident
    llama_cpp_version: str | None = None
    llama_gpu_offload: bool = False  # this llama-cpp-python build can offload layers
    # Revision of the batch-invariant CPU kernels in the llama.cpp build (verm-local's
    # patch, scripts/patches/); 0: none (a stock or older wheel, a build of one's own).
    llama_batch_invariant: int = 0
    torch_version: str | None = None
    torch_cuda: bool | None = None  # None: not probed (torch not imported)
    gptqmodel: bool = False
    onnxruntime_providers: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    # The CPUs this process may use: its affinity mask, capped by a container's CPU quota
    # (cgroup cpu.max); None: not known (a record from before this field), all of them.
    cpus_usable: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Hardware":
        data = dict(data)
        data["cuda"] = tuple(GpuDevice(**g) for g in data.get("cuda", ()))
        for key in ("cpu_flags", "onnxruntime_providers", "notes"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    @property
    def amx(self) -> bool:
        """The CPU has AMX (llama.cpp then puts Q8_0/Q4_K weights in its AMX buffers)."""
        return has_amx(self.cpu_flags)

    @property
    def threads(self) -> int:
        """llama.cpp is fastest with one thread per physical core, and no more threads than
        the CPUs this process may run on: past them its threads wait on one another (two
        processes of 2 threads on 2 CPUs decode 5x slower than one)."""
        return thread_count(self.cores_physical, self.cores_logical, self.cpus_usable)


def thread_count(physical: int | None, logical: int, usable: int | None) -> int:
    """One thread per physical core (logical CPUs where that is not known), capped by the
    CPUs usable."""
    cores = max(1, physical or logical)
    return max(1, min(cores, usable or cores))


# ---------------------------------------------------------------- parsers (pure)


def parse_cpu_quota(text: str, period_text: str | None = None) -> float | None:
    """A cgroup's CPU quota in CPUs: cgroup v2's cpu.max ("200000 100000": 2 CPUs; "max
    100000": none), or cgroup v1's cpu.cfs_quota_us ("-1": none) with cpu.cfs_period_us
    as `period_text`. None where there is no quota or the text is not one."""
    parts = text.split()
    if period_text is not None:
        parts = parts[:1] + period_text.split()[:1]
    if len(parts) != 2 or parts[0] in ("max", "-1"):
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(affinity: int | None, quota: float | None, logical: int) -> int:
    """How many CPUs a process can keep busy: its affinity mask's size (all logical CPUs
    where the OS has none), capped by the quota rounded up."""
    n = affinity or logical
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def parse_nvidia_smi(text: str) -> tuple[GpuDevice, ...]:
    """`nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,
    nounits` -> devices (memory in MiB there)."""
    devices = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            index, total, free = int(parts[0]), int(float(parts[2])), int(float(parts[3]))
        except ValueError:
            continue
        devices.append(GpuDevice(index, parts[1], total << 20, free << 20))
    return tuple(devices)


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...], int | None]:
    """/proc/cpuinfo -> (model name, the flags verm-local cares about, physical cores)."""
    model, flags, cores = "", set(), set()
    physical_id = "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key in ("flags", "Features"):
            flags |= set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    if "asimd" in flags:
        flags.add("neon")
    return model, tuple(f for f in CPU_FLAGS if f in flags), (len(cores) or None)


def has_amx(flags: tuple[str, ...] | list[str]) -> bool:
    return any(f in flags for f in AMX_FLAGS)


def isa_flags(cpuinfo: str) -> tuple[str, ...]:
    """The instruction-set extensions /proc/cpuinfo lists (x86 `flags`, ARM `Features`),
    sorted; kernel and hypervisor flags left out."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found |= set(value.split())
    return tuple(sorted(f for f in found if f in ISA_FLAGS))


def wheel_key(
    version: str,
    cmake_args: str,
    arch: str,
    flags: tuple[str, ...] | list[str],
    patches: str = "",
) -> str:
    """The cache key of a llama-cpp-python wheel built here: its version, its build flags,
    the CPU architecture and instruction-set extensions (a natively built wheel runs only
    where they all are), and the digest of the patches applied to its llama.cpp
    (`patches_digest`: a wheel built before a patch changed is not taken). 16 hex digits."""
    import hashlib

    parts = [version, " ".join((cmake_args or "cpu").split()), arch, " ".join(sorted(set(flags)))]
    if patches:
        parts.append(patches)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def patches_digest(folder: Path) -> str:
    """The sha256 of the patches (`*.patch`, by name) that scripts/install.sh applies to
    llama.cpp before building the wheel; "" when there are none."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(folder.glob("*.patch")) if folder.is_dir() else []
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest() if files else ""


def metal_working_set(ram_total: int) -> int:
    """Apple's recommended GPU working set: about two thirds of unified memory up to 36 GB,
    three quarters above (what llama.cpp's Metal backend reports as usable)."""
    fraction = 0.67 if ram_total <= 36 * 2**30 else 0.75
    return int(ram_total * fraction)


# ---------------------------------------------------------------- probes (read the machine)


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def probe_cuda() -> tuple[GpuDevice, ...]:
    out = _run(
        [
            "nvidia-smi",
            "--query-gpu=index,name,memory.total,memory.free",
            "--format=csv,noheader,nounits",
        ]
    )
    return parse_nvidia_smi(out) if out else ()


def arch_name(machine: str | None = None) -> str:
    """The CPU architecture under one name per kind: x86_64 (also AMD64) and arm64 (also
    aarch64, ARM64), whatever the platform calls it."""
    m = (machine if machine is not None else platform.machine()).lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8": "arm64"}.get(m, m)


def probe_cpu() -> tuple[str, tuple[str, ...], int | None]:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    if platform.system() == "Darwin":
        model = (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip()
        cores = (_run(["sysctl", "-n", "hw.physicalcpu"]) or "").strip()
        flags = ("neon",) if arch_name() == "arm64" else ()
        return model, flags, int(cores) if cores.isdigit() else None
    return platform.processor(), (), None


def probe_cpus_usable() -> int:
    """The CPUs this process may use (`usable_cpus`): sched_getaffinity where the OS has
    it, the cgroup quota of the process's own cgroup (v2, then v1) where there is one."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return usable_cpus(affinity, _cgroup_quota(), os.cpu_count() or 1)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _cgroup_quota() -> float | None:
    text = _read("/proc/self/cgroup")
    if text is None:
        return None
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":  # cgroup v2, mounted at /sys/fs/cgroup
            cpu_max = _read(f"/sys/fs/cgroup{path.rstrip('/')}/cpu.max")
            if cpu_max is None:  # a namespaced view: the process's cgroup is the root
                cpu_max = _read("/sys/fs/cgroup/cpu.max")
            if cpu_max is not None:
                return parse_cpu_quota(cpu_max)
        elif "cpu" in controllers.split(","):
            for root in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"):
                for base in (f"{root}{path.rstrip('/')}", root):
                    quota = _read(f"{base}/cpu.cfs_quota_us")
                    period = _read(f"{base}/cpu.cfs_period_us")
                    if quota is not None and period is not None:
                        return parse_cpu_quota(quota, period)
    return None


def default_threads() -> int:
    """The thread count of llama.cpp, torch and ONNX Runtime when none is asked for:
    VERM_LOCAL_THREADS, else one per physical core, no more than the CPUs this process
    may use (cheap: no library is probed)."""
    # Here, not at the top: scripts/wheel_key.py loads this file alone, with the stdlib.
    from .settings import settings

    chosen = settings().threads
    if chosen:
        return chosen
    _, _, physical = probe_cpu()
    return thread_count(physical, os.cpu_count() or 1, probe_cpus_usable())


def gptq_cpu_workers(threads: int | None = None) -> int:
    """GPTQModel's CPU worker pool (GPTQMODEL_CPU_WORKERS): one per thread, at least 2,
    since its model loader takes 2 workers from that pool and fails with fewer ("Virtual
    pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"), as its own
    default of half the CPUs does on 1- and 2-CPU machines."""
    return max(2, threads or default_threads())


def gptq_cpu_kernels(hw: Hardware) -> tuple[str, ...]:
    """The GPTQModel CPU extensions (C++ it compiles on first use) that verm-local's GPTQ
    paths load on this machine: the packer for every `convert gptq`, and on Linux x86-64
    with AVX512-BF16 the fused int4 kernel, which GPTQModel's loader checks, and so
    compiles, as it loads any GPTQ checkpoint on the CPU (its own priority order, float32
    included)."""
    kernels = ["pack_block_cpu"]
    if (
        hw.os == "linux"
        and hw.arch == "x86_64"
        and all(f in hw.cpu_flags for f in GPTQ_AVX512_BF16)
    ):
        kernels.append("int4_qzero_group_scaled_cpu")
    return tuple(kernels)


def probe_memory() -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def probe_llama_cpp() -> tuple[str | None, bool]:
    try:
        import llama_cpp
    except ImportError:
        return None, False
    return llama_cpp.__version__, bool(llama_cpp.llama_supports_gpu_offload())


def llama_library(name: str) -> Any:
    """A library of the llama.cpp build llama-cpp-python loads (name: "llama", "ggml-base",
    "mtmd"), for the functions its bindings leave out; None when it is not there. Found
    where llama-cpp-python looks: LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB, else its own lib/
    (loading a library again returns the one already in the process)."""
    import ctypes

    from .settings import settings

    try:
        import llama_cpp
    except ImportError:
        return None
    s = settings()
    override = s.mtmd_cpp_lib if name == "mtmd" else s.llama_cpp_lib_path
    libdir = Path(override) if override else Path(llama_cpp.__file__).parent / "lib"
    file = {"darwin": f"lib{name}.dylib", "win32": f"{name}.dll"}.get(sys.platform, f"lib{name}.so")
    path = libdir / file
    if not path.exists():
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def probe_batch_invariant() -> int:
    """The revision of the batch-invariant kernels of the llama.cpp build (0: none)."""
    import ctypes

    lib = llama_library("llama")
    fn = getattr(lib, "llama_batch_invariant_revision", None) if lib is not None else None
    if fn is None:
        return 0
    fn.argtypes, fn.restype = [], ctypes.c_int32
    return int(fn())


def probe_torch() -> tuple[str | None, bool | None]:
    """Imports torch (a second or two), so only when asked."""
    if importlib.util.find_spec("torch") is None:
        return None, None
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install is "no torch"
        return None, None
    return torch.__version__, bool(torch.cuda.is_available())


def probe_onnxruntime() -> tuple[str, ...]:
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    try:
        import onnxruntime
    except Exception:  # noqa: BLE001
        return ()
    return tuple(onnxruntime.get_available_providers())


def probe(with_torch: bool = True) -> Hardware:
    """The record of this machine. `with_torch=False` skips importing torch (the judge's
    fast path; GPTQ and bf16 then count as unavailable on CUDA)."""
    system = platform.system().lower()
    arch = arch_name()
    model, flags, physical = probe_cpu()
    total, available = probe_memory()
    metal = system == "darwin" and arch == "arm64"
    llama_version, offload = probe_llama_cpp()
    torch_version, torch_cuda = probe_torch() if with_torch else (None, None)
    return Hardware(
        os=system,
        arch=arch,
        cpu_model=model,
        cores_logical=os.cpu_count() or 1,
        cores_physical=physical,
        cpu_flags=flags,
        ram_total=total,
        ram_available=available,
        cuda=probe_cuda(),
        metal=metal,
        metal_working_set=metal_working_set(total) if metal else None,
        llama_cpp_version=llama_version,
        llama_gpu_offload=offload,
        llama_batch_invariant=probe_batch_invariant() if llama_version else 0,
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        gptqmodel=importlib.util.find_spec("gptqmodel") is not None,
        onnxruntime_providers=probe_onnxruntime(),
        cpus_usable=probe_cpus_usable(),
    )
