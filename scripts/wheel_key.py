#!/usr/bin/env python3
"""Print the cache key of a llama-cpp-python wheel built on this machine: version, build
flags (CMAKE_ARGS), CPU architecture and instruction-set extensions, and the patches
scripts/install.sh applies to llama.cpp (scripts/patches/). A wheel built with
llama.cpp's default GGML_NATIVE uses every extension of the build machine, so a cache
shared between machines (CI caches, network homes) must never hand it to a CPU without
them (SIGILL). Used by scripts/install.sh and the CI examples; stdlib only, so it runs
before the virtual environment exists.

    python3 scripts/wheel_key.py [--version 0.3.36] [--cmake-args="-DGGML_CUDA=on"]
                                 [--cpuinfo FILE] [--arch x86_64]

--version defaults to the one scripts/install.sh pins (LLAMA_VERSION=), --cmake-args to
$CMAKE_ARGS, as install.sh passes them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

HARDWARE = Path(__file__).resolve().parent.parent / "verm_local" / "hardware.py"
INSTALL = Path(__file__).resolve().parent / "install.sh"
PATCHES = Path(__file__).resolve().parent / "patches"  # applied to llama.cpp before the build


def _pinned_version() -> str:
    for line in INSTALL.read_text().splitlines():
        if line.startswith("LLAMA_VERSION="):
            return line.split("=", 1)[1].strip()
    raise SystemExit(f"{INSTALL}: no LLAMA_VERSION= line")


def _hardware():
    spec = importlib.util.spec_from_file_location("verm_local_hardware", HARDWARE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    if path.is_file():
        return path.read_text(errors="replace")
    if sys.platform == "darwin":  # Intel Macs list features; Apple silicon: the brand
        out = []
        for key in (
            "machdep.cpu.features",
            "machdep.cpu.leaf7_features",
            "machdep.cpu.brand_string",
        ):
            r = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True)
            out.append(r.stdout.strip().lower())
        return "flags: " + " ".join(out).replace(".", "_")
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default=None)
    ap.add_argument("--cmake-args", default=os.environ.get("CMAKE_ARGS", ""))
    ap.add_argument("--cpuinfo", type=Path, help="A recorded /proc/cpuinfo (default: here).")
    ap.add_argument("--arch", default=None)
    a = ap.parse_args(argv)
    a.version = a.version or _pinned_version()
    hw = _hardware()
    text = a.cpuinfo.read_text(errors="replace") if a.cpuinfo else _cpuinfo()
    flags = hw.isa_flags(text)
    if not flags and sys.platform == "darwin":
        flags = tuple(sorted(set(text.split()) - {"flags:"}))
    arch = hw.arch_name(a.arch)
    print(hw.wheel_key(a.version, a.cmake_args, arch, flags, hw.patches_digest(PATCHES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
