"""HF Qwen3-VL checkpoint -> GGUF text model (F16 + quant ladder) and mmproj, with a
manifest. Uses llama.cpp's own converter from the runtime's sdist (one llama.cpp commit
for converter and runtime) and `llama_cpp.llama_model_quantize` for the quants."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from verm_local.constants import (
    GGUF_QUANTS,
    MANIFEST_NAME,
    MMPROJ_TYPES,
    MODEL_ARCHITECTURE,
    MODEL_TYPE,
)
from verm_local.errors import InputError, ModelError
from verm_local.fileio import atomic_output, manifest_entry, write_json_atomic
from verm_local.gguf_meta import check_depth
from verm_local.hardware import default_threads

from .llama_sources import llama_cpp_dir, runtime_version

log = logging.getLogger(__name__)

# llama_ftype values (llama.h) of the quants the ladder offers.
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
K_QUANT_BLOCK = 256


def text_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def mmproj_file_name(mmproj_type: str) -> str:
    return f"mmproj-{mmproj_type}.gguf"


def parse_quants(spec: str) -> list[str]:
    """'Q8_0,q4_k_m' -> ['Q8_0', 'Q4_K_M'] (F16 is always written, so it is dropped here)."""
    out: list[str] = []
    for raw in spec.split(","):
        q = raw.strip().upper()
        if not q:
            continue
        if q not in FTYPES:
            raise InputError(f"unknown quant {raw.strip()!r}; choose from {', '.join(GGUF_QUANTS)}")
        if q != "F16" and q not in out:
            out.append(q)
    return out


def check_checkpoint(hf_dir: Path) -> dict[str, Any]:
    """Refuse anything that is not a complete Qwen3-VL checkpoint; return its config."""
    if not hf_dir.is_dir():
        raise InputError(f"{hf_dir}: not a directory")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{hf_dir}: no config.json; not a Hugging Face checkpoint")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path}: unreadable config ({exc.__class__.__name__})") from None
    archs = config.get("architectures") or []
    if MODEL_ARCHITECTURE not in archs or config.get("model_type") != MODEL_TYPE:
        got = ", ".join(archs) or config.get("model_type") or "unknown"
        raise ModelError(f"{hf_dir}: architecture {got} is not {MODEL_ARCHITECTURE} (Visual-ERM)")
    _check_weights(hf_dir)
    for name in ("tokenizer.json", "preprocessor_config.json"):
        if not (hf_dir / name).is_file():
            raise ModelError(f"{hf_dir}: incomplete checkpoint, {name} is missing")
    text = config.get("text_config") or {}
    vision = config.get("vision_config") or {}
    # llama.cpp aborts the process (GGML_ASSERT) on this; refuse it before it can.
    check_depth(
        hf_dir,
        int(text.get("num_hidden_layers") or 0),
        len(vision.get("deepstack_visual_indexes") or []),
    )
    return config


def _check_weights(hf_dir: Path) -> None:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, json.JSONDecodeError, KeyError):
            raise ModelError(f"{index}: unreadable safetensors index") from None
        missing = sorted(s for s in shards if not (hf_dir / s).is_file())
        if missing:
            raise ModelError(f"{hf_dir}: incomplete checkpoint, missing {', '.join(missing)}")
    elif not (hf_dir / "model.safetensors").is_file():
        raise ModelError(f"{hf_dir}: incomplete checkpoint, no safetensors weights")


def _k_quant_warning(config: dict[str, Any], quants: list[str]) -> str | None:
    text = config.get("text_config") or {}
    widths = {int(text.get("hidden_size", 0)), int(text.get("intermediate_size", 0))}
    if any("_K" in q for q in quants) and any(w % K_QUANT_BLOCK for w in widths):
        return (
            f"row widths {sorted(widths)} are not multiples of {K_QUANT_BLOCK}; "
            "llama.cpp falls back to q5_0/q8_0 for those tensors in K-quants"
        )
    return None


class _Steps:
    """One line per step with elapsed time: conversion is minutes on a real model."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.n, self.quiet = total, 0, quiet
        self.t0 = time.perf_counter()

    def start(self, what: str) -> None:
        self.n += 1
        self.t = time.perf_counter()
        if not self.quiet:
            log.info("[%d/%d] %s ...", self.n, self.total, what)

    def done(self, path: Path, name: str | None = None) -> None:
        if not self.quiet:
            mb = path.stat().st_size / 1e6
            dt = time.perf_counter() - self.t
            log.info("      %s: %.1f MB in %.1f s", name or path.name, mb, dt)


# Runs llama.cpp's converter once per job in one interpreter: torch, transformers and the
# converter's own modules are imported once (about 4 CPU-seconds a run), and a line with
# the marker after each job says it is written.
_DONE = "@@verm-local converted "
_DRIVER = f"""
import json, os, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))
for i, args in enumerate(jobs):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    print({_DONE!r} + str(i), flush=True)
"""


def _run_converter(
    hf_dir: Path,
    jobs: list[tuple[Path, str, bool]],
    verbose: bool,
    on_done: Callable[[int], None] | None = None,
) -> None:
    """llama.cpp's converter on `hf_dir` for each (out, outtype, mmproj) job, in order, in
    one process; `on_done(i)` when job i's file is written."""
    src = llama_cpp_dir()
    from verm_local.crash import crash_report, new_log_path
    from verm_local.errors import NativeCrash
    from verm_local.settings import child_env, environ

    script = src / "convert_hf_to_gguf.py"
    argvs = [
        [str(hf_dir), "--outfile", str(out), "--outtype", outtype, *(["--mmproj"] if mm else [])]
        for out, outtype, mm in jobs
    ]
    cmd = [sys.executable, "-X", "faulthandler", "-c", _DRIVER, str(script), json.dumps(argvs)]
    # The converter wants its own gguf-py, not a newer one from PyPI.
    env = child_env(PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), environ("PYTHONPATH") or ""]))
    printed: list[str] = []
    done = 0
    with subprocess.Popen(
        cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(_DONE):
                out = jobs[done][0]
                if not out.is_file():  # written under a name of the converter's own
                    proc.kill()
                    raise ModelError(f"llama.cpp converter wrote no {out.name}")
                if on_done is not None:
                    on_done(done)
                done += 1
            else:
                printed.append(line)
                if verbose:
                    sys.stderr.write(line)
    if proc.returncode == 0 and done == len(jobs):
        return
    _, outtype, mmproj = jobs[min(done, len(jobs) - 1)]
    what = f"{outtype}{', mmproj' if mmproj else ''}"
    if proc.returncode < 0:  # torch or numpy died in native code: keep its stack
        log_path = new_log_path("convert")
        log_path.write_text(f"command: {' '.join(cmd)}\n{''.join(printed)}", encoding="utf-8")
        raise NativeCrash(
            crash_report(f"llama.cpp's converter ({what})", -proc.returncode, log_path)
        )
    lines = [ln for ln in printed if ln.strip()]
    last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
    raise ModelError(f"llama.cpp converter failed on {hf_dir} ({what}): {last}")


def quantize_gguf(
    src: Path, dst: Path, quant: str, threads: int | None = None, verbose: bool = False
) -> None:
    """Quantize an F16 GGUF with llama.cpp's quantizer (atomic output)."""
    from verm_local.backends import native

    llama_cpp, _ = native.init()  # llama.cpp's log goes to logging, not the terminal
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = threads or default_threads()
    with atomic_output(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ModelError(f"llama.cpp failed to quantize {src.name} to {quant} (code {rc})")


def convert_gguf(
    hf_dir: str | Path,
    out_dir: str | Path,
    quants: list[str],
    mmproj_type: str = "f16",
    *,
    verbose: bool = False,
    quiet: bool = False,
    check: bool = True,
    repack: bool | None = None,
) -> dict[str, Any]:
    """Write model-F16.gguf, one model-<QUANT>.gguf per quant, mmproj-<type>.gguf and
    manifest.json to `out_dir`; with `check`, load each text model and run a few tokens
    (with the repack decision judge will use on this CPU). Returns the manifest."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if mmproj_type not in MMPROJ_TYPES:
        raise InputError(
            f"unknown mmproj type {mmproj_type!r}; choose from {', '.join(MMPROJ_TYPES)}"
        )
    config = check_checkpoint(hf_dir)
    warning = _k_quant_warning(config, quants)
    if warning and not quiet:
        log.warning("%s", warning)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = _Steps(2 + len(quants) + 1 + (1 if check else 0), quiet)
    entries: list[dict[str, Any]] = []

    f16 = out_dir / text_file_name("F16")
    mmproj = out_dir / mmproj_file_name(mmproj_type)
    steps.start(f"text model -> F16 (llama.cpp converter {runtime_version()})")
    with atomic_output(f16) as text_tmp, atomic_output(mmproj) as mmproj_tmp:

        def written(job: int) -> None:  # the text model first, then the projector
            if job == 0:
                steps.done(text_tmp, f16.name)
                steps.start(f"vision projector -> mmproj {mmproj_type}")
            else:
                steps.done(mmproj_tmp, mmproj.name)

        jobs = [(text_tmp, "f16", False), (mmproj_tmp, mmproj_type, True)]
        _run_converter(hf_dir, jobs, verbose, written)
    entries.append(manifest_entry(f16, "text", "F16"))
    entries.append(manifest_entry(mmproj, "mmproj", mmproj_type))

    for quant in quants:
        dst = out_dir / text_file_name(quant)
        steps.start(f"quantize F16 -> {quant}")
        quantize_gguf(f16, dst, quant, verbose=verbose)
        steps.done(dst)
        entries.append(manifest_entry(dst, "text", quant))

    if check:
        from verm_local.backends.llamacpp import repack_choice
        from verm_local.backends.native import check_runs

        steps.start("check that each model runs here")
        for e in entries:
            if e["kind"] == "text":
                check_runs(out_dir / e["file"], repack_choice(repack, e["quant"])[0])
        steps.done(out_dir / entries[-1]["file"])

    steps.start("manifest with sha256")
    manifest = {
        "format": "gguf",
        "architecture": MODEL_ARCHITECTURE,
        "source": str(hf_dir.resolve()),
        "llama_cpp_python": runtime_version(),
        "mmproj": mmproj.name,
        "files": entries,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    steps.done(out_dir / MANIFEST_NAME)
    return manifest
