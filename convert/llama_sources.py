"""The parts of the llama-cpp-python sdist that conversion needs: llama.cpp's
`convert_hf_to_gguf.py`, its `conversion/` package, its own `gguf-py`, and the Qwen2
test vocabulary. Taken from the sdist of the *installed* llama-cpp-python release so the
converter and the runtime sit on one llama.cpp commit. Fetched with pip once, cached."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

from verm_local.constants import LLAMA_CPP_PYTHON_VERSION
from verm_local.errors import VermError
from verm_local.paths import cache_dir

log = logging.getLogger(__name__)

_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-qwen2.gguf")


def runtime_version() -> str:
    """Version of the installed llama-cpp-python, else the pinned one."""
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - not installed (or unreadable metadata): the pin
        return LLAMA_CPP_PYTHON_VERSION


def sdist_path(version: str) -> Path:
    """The sdist tarball: $VERM_LOCAL_SDIST if set, else downloaded into the cache by pip."""
    from verm_local.settings import settings

    env = settings().sdist
    if env:
        path = Path(env)
        if not path.is_file():
            raise VermError(f"VERM_LOCAL_SDIST={env} does not exist")
        return path
    target = cache_dir() / "sdist"
    name = f"llama_cpp_python-{version}.tar.gz"
    if (target / name).is_file():
        return target / name
    target.mkdir(parents=True, exist_ok=True)
    log.info("fetching llama-cpp-python %s sources with pip (once) ...", version)
    cmd = [
        # Only this package from source; its build tools may come as wheels (fast).
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        f"llama-cpp-python=={version}",
        "-d",
        str(target),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (target / name).is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VermError(f"could not fetch the llama-cpp-python {version} sdist with pip: {last}")
    return target / name


def llama_cpp_dir(version: str | None = None) -> Path:
    """Directory holding the converter, gguf-py and the qwen2 vocab, extracted once."""
    version = version or runtime_version()
    return _extract(
        version,
        cache_dir() / f"llama.cpp-{version}",
        lambda rel: rel.startswith(_WANTED),
        must_have=("convert_hf_to_gguf.py", "llama.cpp converter"),
    )


def _extract(
    version: str,
    dest: Path,
    keep: Callable[[str], bool],
    must_have: tuple[str, str] | None = None,
) -> Path:
    """The sdist's vendor/llama.cpp/ files whose relative path `keep` accepts, extracted
    once into `dest`: into a temporary directory first, moved into place when complete,
    under a lock. `must_have`: (a file the extraction must hold, what it is)."""
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / ".complete").is_file():
            return dest
        tarball = sdist_path(version)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            with tarfile.open(tarball) as tar:
                for member in tar.getmembers():
                    if not member.name.startswith(prefix):
                        continue
                    rel = member.name[len(prefix) :]
                    if not keep(rel) or not (member.isfile() or member.isdir()):
                        continue
                    member.name = rel
                    tar.extract(member, tmp, filter="data")
            if must_have and not (tmp / must_have[0]).is_file():
                raise VermError(f"{tarball} holds no {must_have[1]}")
            (tmp / ".complete").write_text(version + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def qwen2_vocab() -> tuple[Path, Path, Path]:
    """(gguf, .inp, .out) of llama.cpp's Qwen2 tokenizer test vocabulary."""
    models = llama_cpp_dir() / "models"
    gguf = models / "ggml-vocab-qwen2.gguf"
    return gguf, Path(str(gguf) + ".inp"), Path(str(gguf) + ".out")


def tokenizer_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's reference tokenizations for the Qwen2 vocabulary."""
    _, inp, out = qwen2_vocab()
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    ids = out.read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


def llama_server(cmake_args: str = "") -> Path:
    """llama.cpp's own `llama-server`, built once from the sdist the runtime came from (one
    llama.cpp commit for both), for this CPU and `cmake_args` (e.g. "-DGGML_CUDA=on"); kept
    in the cache under the same kind of key as the wheel (`hardware.wheel_key`). The first
    build takes minutes; progress goes to the log."""
    import platform

    from verm_local.hardware import isa_flags, wheel_key

    version = runtime_version()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    key = wheel_key(version, cmake_args, platform.machine().lower(), isa_flags(cpuinfo))
    out = cache_dir() / "llama-server" / key
    binary = out / "llama-server"
    if binary.is_file():
        return binary
    for tool in ("cmake", "make", "c++"):
        if shutil.which(tool) is None:
            raise VermError(
                f"building llama-server needs {tool}; install a C++ toolchain and "
                "cmake, or pass --llama-server PATH"
            )
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if binary.is_file():
            return binary
        src = _full_sources(version)
        build = out / "build"
        jobs = str(os.cpu_count() or 1)
        configure = [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DBUILD_SHARED_LIBS=OFF",
            *cmake_args.split(),
        ]
        for step, cmd in (
            ("configuring", configure),
            (
                "building (minutes, once)",
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs],
            ),
        ):
            log.info("llama-server %s: %s", version, step)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
                raise VermError(
                    f"building llama-server failed ({step}): "
                    f"{last[-1] if last else proc.returncode}"
                )
        built = next(build.rglob("llama-server"), None)
        if built is None or not built.is_file():
            raise VermError("the llama-server build wrote no binary")
        shutil.copy2(built, binary)
        shutil.rmtree(build, ignore_errors=True)
    return binary


def _full_sources(version: str) -> Path:
    """All of llama.cpp's sources in the sdist (the test vocabularies left out)."""
    return _extract(
        version,
        cache_dir() / f"llama.cpp-src-{version}",
        lambda rel: not rel.startswith("models/ggml-vocab"),
    )
