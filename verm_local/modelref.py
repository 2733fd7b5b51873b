"""Turn what the user passed as --model into concrete files: a GGUF text model, its mmproj,
the quant and the sha256, checked against the manifest when there is one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constants import GGUF_QUANTS, MANIFEST_NAME
from .errors import ModelError
from .fileio import read_manifest, sha256_file
from .gguf_meta import check_pair

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ResolvedModel:
    format: str  # "gguf" | "hf" (bf16 safetensors) | "gptq"
    path: Path
    mmproj: Path | None
    quant: str
    sha256: str

    @property
    def backend(self) -> str:
        """The backend that runs this format: llama.cpp for GGUF, transformers otherwise."""
        return "llamacpp" if self.format == "gguf" else "transformers"


def resolve_model(
    model: str | Path, mmproj: str | Path | None = None, quant: str | None = None
) -> ResolvedModel:
    """A .gguf file (mmproj given, or found through the manifest beside it) or a directory
    written by `convert gguf` (its best-fidelity quant unless `quant` is given)."""
    path = Path(model)
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    if path.is_dir() and (path / "config.json").is_file():
        return resolve_hf_dir(path)
    if path.is_dir():
        return _from_dir(path, mmproj, quant)
    if path.suffix.lower() != ".gguf":
        raise ModelError(f"{path}: not a .gguf file or a converted model directory")
    manifest = read_manifest(path.parent)
    entry = _entry(manifest, path.name)
    mm = Path(mmproj) if mmproj else _mmproj_from(manifest, path.parent)
    return _checked(path, mm, entry, manifest)


def _from_dir(directory: Path, mmproj: str | Path | None, quant: str | None) -> ResolvedModel:
    manifest = read_manifest(directory)
    if manifest is None:
        raise ModelError(
            f"{directory}: no {MANIFEST_NAME}; pass a .gguf file or a directory "
            "written by `verm-local convert gguf`"
        )
    texts = {
        e.get("quant", "").upper(): e for e in manifest.get("files", []) if e.get("kind") == "text"
    }
    if quant:
        want = quant.upper()
        if want not in texts:
            have = ", ".join(sorted(texts)) or "none"
            raise ModelError(f"{directory}: no {want} model in it (has {have})")
    else:
        order = [q for q in GGUF_QUANTS if q in texts]
        if not order:
            raise ModelError(f"{directory}: manifest lists no text model")
        want = order[0]
    entry = texts[want]
    mm = Path(mmproj) if mmproj else _mmproj_from(manifest, directory)
    return _checked(directory / entry["file"], mm, entry, manifest)


def _entry(manifest: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if not manifest:
        return None
    return next((e for e in manifest.get("files", []) if e.get("file") == name), None)


def _mmproj_from(manifest: dict[str, Any] | None, directory: Path) -> Path | None:
    if manifest and manifest.get("mmproj"):
        return directory / manifest["mmproj"]
    found = sorted(directory.glob("mmproj*.gguf"))
    return found[0] if len(found) == 1 else None


def _checked(
    path: Path, mmproj: Path | None, entry: dict[str, Any] | None, manifest: dict[str, Any] | None
) -> ResolvedModel:
    check_gguf_file(path, entry)
    if mmproj is None:
        raise ModelError(f"{path}: no vision projector found; pass --mmproj PATH")
    check_gguf_file(mmproj, _entry(manifest, mmproj.name))
    check_pair(path, mmproj)
    if entry is not None:
        quant, sha = entry.get("quant", ""), entry.get("sha256", "")
    else:
        quant, sha = _quant_from_name(path.name), sha256_file(path)
    return ResolvedModel("gguf", path, mmproj, quant, sha)


def check_gguf_file(path: Path, entry: dict[str, Any] | None = None) -> None:
    """Cheap integrity check before llama.cpp sees the file (a bad file can abort it):
    exists, GGUF magic, and the manifest's size."""
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (corrupt or wrong file)")
    if entry is not None and entry.get("size") is not None:
        size = path.stat().st_size
        if size != int(entry["size"]):
            raise ModelError(
                f"{path}: size {size} differs from the manifest's {entry['size']}; "
                "the file is corrupt or incomplete"
            )


def _quant_from_name(name: str) -> str:
    upper = name.upper()
    for q in GGUF_QUANTS + ("BF16", "F32"):
        if q in upper:
            return q
    return ""


def resolve_hf_dir(directory: Path) -> ResolvedModel:
    """A Hugging Face checkpoint (bf16 safetensors) or a GPTQ export of one."""
    import json

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(f"{directory}/config.json: unreadable") from None
    if config.get("model_type") != "qwen3_vl":
        raise ModelError(
            f"{directory}: model_type {config.get('model_type')!r} is not qwen3_vl (Visual-ERM)"
        )
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{directory}: incomplete checkpoint, no safetensors weights")
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") == "gptq":
        fmt, quant = "gptq", f"gptq-int{qcfg.get('bits', '?')}"
    else:
        fmt, quant = "hf", str(config.get("dtype") or config.get("torch_dtype") or "bf16")
        quant = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(quant, quant)
    return ResolvedModel(fmt, directory, None, quant, weights_digest(directory, weights))


def weights_digest(directory: Path, weights: list[Path]) -> str:
    """sha256 of one weights file, or of the sorted 'name sha256' lines of several; from
    the manifest when one lists them, so a large checkpoint is not re-hashed per load."""
    import hashlib

    manifest = read_manifest(directory) or {}
    known = {e.get("file"): e.get("sha256") for e in manifest.get("files", [])}
    digests = [(w.name, known.get(w.name) or sha256_file(w)) for w in weights]
    if len(digests) == 1:
        return digests[0][1]
    text = "".join(f"{name} {digest}\n" for name, digest in digests)
    return hashlib.sha256(text.encode()).hexdigest()
