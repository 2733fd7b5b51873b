"""HF Qwen3-VL checkpoint -> GPTQ int4/int8 with GPTQModel (the maintained successor of
the archived auto-gptq). Only the language model's linear layers are quantized; the
vision tower, embeddings and lm_head stay in 16-bit. The output is GPTQ format (v1
layout, `quant_method: gptq`), which transformers loads and vLLM serves, plus a manifest."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from verm_local.constants import MANIFEST_NAME, MODEL_ARCHITECTURE
from verm_local.errors import InputError, ModelError, first_line
from verm_local.fileio import atomic_directory, manifest_entry, write_json_atomic
from verm_local.hardware import gptq_cpu_workers
from verm_local.settings import export_default

from .calibration import directory_conversations, synthetic_conversations
from .gguf import check_checkpoint

log = logging.getLogger(__name__)

BITS = (4, 8)
# Processor files GPTQModel may not carry over; the judge needs them beside the weights.
_SIDE_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        log.info("%s", msg)


def convert_gptq(
    hf_dir: str | Path,
    out_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    calibration: str = "synthetic",
    samples: int = 8,
    seed: int = 0,
    *,
    quiet: bool = False,
) -> dict[str, Any]:
    """Quantize the language model to GPTQ `bits` and write it with a manifest to out_dir."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if bits not in BITS:
        raise InputError(f"--bits must be 4 or 8, got {bits}")
    if samples < 1:
        raise InputError("--samples must be at least 1")
    config = check_checkpoint(hf_dir)
    hidden = int(config["text_config"]["hidden_size"])
    if group_size != -1 and (group_size <= 0 or hidden % group_size):
        raise InputError(f"--group-size {group_size} does not divide the hidden size {hidden}")
    export_default("GPTQMODEL_CPU_WORKERS", str(gptq_cpu_workers()))
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError:
        raise ModelError("GPTQ export needs GPTQModel: pip install 'gptqmodel>=7.7'") from None

    t0 = time.perf_counter()
    _log(f"[1/4] calibration: {samples} {calibration} image pairs with the judge prompt", quiet)
    if calibration == "synthetic":
        data = synthetic_conversations(samples, seed=seed)
    else:
        data = directory_conversations(calibration, samples)

    # GPTQModel offloads each quantized module to disk; left to itself it makes a temporary
    # folder that only an atexit hook removes, which never runs when the CLI's forked worker
    # ends with os._exit (a folder of the quantized layers left in /tmp per conversion, GBs
    # for the 8B). Ours sits beside the output, on the disk chosen for it, and always goes.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.offload-", dir=out_dir.parent) as off:
        qcfg = QuantizeConfig(bits=bits, group_size=group_size, offload_to_disk_path=off)
        _log(f"[2/4] loading {hf_dir} for {bits}-bit GPTQ (group size {group_size})", quiet)
        try:
            model = GPTQModel.load(str(hf_dir), qcfg)
        except Exception as exc:  # noqa: BLE001 - GPTQModel raises many types; one line out
            raise ModelError(f"GPTQModel could not load {hf_dir}: {first_line(exc)}") from None

        _log("[3/4] quantizing the language model (vision tower stays 16-bit)", quiet)
        try:
            model.quantize(data, batch_size=1)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"GPTQ quantization failed: {first_line(exc)}") from None

        _log("[4/4] saving with a sha256 manifest", quiet)
        manifest = {
            "format": "gptq",
            "architecture": MODEL_ARCHITECTURE,
            "source": str(hf_dir.resolve()),
            "bits": bits,
            "group_size": group_size,
            "calibration": {"source": calibration, "samples": samples, "seed": seed},
            "quantized": "language model linear layers; vision tower, embeddings, lm_head 16-bit",
        }
        _save(model, hf_dir, out_dir, manifest)
    _log(f"      done in {time.perf_counter() - t0:.0f} s -> {out_dir}", quiet)
    return manifest


def _save(model: Any, hf_dir: Path, out_dir: Path, manifest: dict[str, Any]) -> None:
    """The quantized checkpoint, the processor files it needs, and `manifest` with every
    file's sha256 (filled in here), written as one directory that appears whole."""
    with atomic_directory(out_dir) as tmp:
        model.save(str(tmp))
        for name in _SIDE_FILES:
            if (hf_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
        manifest["files"] = [
            manifest_entry(p, _kind(p), f"gptq-int{manifest['bits']}")
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != MANIFEST_NAME
        ]
        write_json_atomic(tmp / MANIFEST_NAME, manifest)


def _kind(path: Path) -> str:
    return "weights" if path.suffix == ".safetensors" else "config"


def quantization_config(model_dir: Path) -> dict[str, Any]:
    """The quantization_config a GPTQ export carries (what transformers and vLLM read)."""
    return json.loads((model_dir / "config.json").read_text())["quantization_config"]
