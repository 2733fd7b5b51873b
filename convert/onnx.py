"""HF Qwen3-VL vision tower -> ONNX (fp32, fp16 for the CUDA execution provider, or int8
with ONNX Runtime's dynamic quantization), deepstack outputs included, any image grid.

The grid-dependent parts of the tower (learned position interpolation, rotary positions)
are inputs of the graph, computed by `verm_local.vision_onnx`; attention runs over one
image's patches, so no per-image split is traced into the graph."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from verm_local.constants import MANIFEST_NAME, MODEL_ARCHITECTURE
from verm_local.errors import InputError, ModelError
from verm_local.fileio import atomic_directory, manifest_entry, write_json_atomic
from verm_local.vision_onnx import INPUTS

from .gguf import check_checkpoint

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


def _tower(visual):
    """A module over the HF vision tower taking precomputed grid inputs."""
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v = visual
            self.ds = list(visual.deepstack_visual_indexes)

        def forward(self, patches, pos_indices, pos_weights, rot_pos):
            v = self.v
            h = v.patch_embed(patches)
            h = h + (v.pos_embed(pos_indices) * pos_weights[:, :, None]).sum(1).to(h.dtype)
            cos, sin = v.rotary_pos_emb(h, rot_pos)
            feats = []
            for i, blk in enumerate(v.blocks):
                x = blk.norm1(h)
                n = x.shape[0]
                a = blk.attn
                q, k, val = a.qkv(x).reshape(n, 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                q, k, val = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, val))
                o = F.scaled_dot_product_attention(q, k, val, scale=a.scaling)
                h = h + a.proj(o.squeeze(0).transpose(0, 1).reshape(n, -1))
                h = h + blk.mlp(blk.norm2(h))
                if i in self.ds:
                    feats.append(v.deepstack_merger_list[self.ds.index(i)](h))
            return torch.cat([v.merger(h)] + feats, dim=1)

    return Tower().eval()


def vision_spec(hf_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    vision = config["vision_config"]
    pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
    return {
        "patch_size": int(vision.get("patch_size", 16)),
        "merge_size": int(vision.get("spatial_merge_size", 2)),
        "temporal_patch_size": int(vision.get("temporal_patch_size", 2)),
        "num_grid_per_side": int(int(vision.get("num_position_embeddings", 2304)) ** 0.5),
        "image_mean": list(pre.get("image_mean", [0.5, 0.5, 0.5])),
        "image_std": list(pre.get("image_std", [0.5, 0.5, 0.5])),
        "out_dim": int(vision["out_hidden_size"]),
        "n_deepstack": len(vision.get("deepstack_visual_indexes") or []),
    }


def _load_visual(hf_dir: Path):
    """The checkpoint's vision tower alone, in float32: its config and only its tensors
    (the whole 8B model in float32 would take 35 GB; the tower is 0.6B parameters)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    config = AutoConfig.from_pretrained(str(hf_dir))
    visual = Qwen3VLVisionModel._from_config(config.vision_config, dtype=torch.float32)
    prefixes = ("model.visual.", "visual.")
    state: dict[str, Any] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                for prefix in prefixes:
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = f.get_tensor(key).to(torch.float32)
    missing, unexpected = visual.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{hf_dir}: the vision tower's tensors do not match its config "
            f"(missing {len(missing)}, e.g. {missing[:2]}; unexpected {unexpected[:2]})"
        )
    return visual.eval()


def _export_fp32(hf_dir: Path, out: Path, spec: dict[str, Any]) -> None:
    import torch

    from verm_local.vision_onnx import VisionSpec, position_interpolation, rotary_positions

    tower = _tower(_load_visual(hf_dir))
    s = VisionSpec(
        **{**spec, "image_mean": tuple(spec["image_mean"]), "image_std": tuple(spec["image_std"])}
    )
    gh, gw = 8, 12  # an example grid; every axis below is dynamic
    dim = 3 * s.temporal_patch_size * s.patch_size**2
    idx, wts = position_interpolation(gh, gw, s.merge_size, s.num_grid_per_side)
    args = (
        torch.randn(gh * gw, dim),
        torch.from_numpy(idx),
        torch.from_numpy(wts),
        torch.from_numpy(rotary_positions(gh, gw, s.merge_size)),
    )
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        with torch.no_grad():
            torch.onnx.export(
                tower,
                args,
                str(scratch / out.name),
                input_names=list(INPUTS),
                output_names=["embeddings"],
                dynamic_axes={
                    **{name: {0: "patches"} for name in INPUTS},
                    "embeddings": {0: "tokens"},
                },
                opset_version=18,
                dynamo=False,
            )
        _save_compact(scratch / out.name, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# Protobuf caps a single .onnx at 2 GB; the real tower (2.3 GB in fp32) keeps its weights
# in one external data file beside the graph.
_PROTO_LIMIT = 1_800_000_000


def _save_compact(src: Path, dst: Path) -> None:
    """Re-save an exported graph as one file, or graph + one `<name>.data` when large
    (the exporter writes one file per tensor past the protobuf limit)."""
    import onnx

    total = sum(f.stat().st_size for f in src.parent.iterdir() if f.is_file())
    model = onnx.load(str(src))  # pulls external tensors in
    _save(model, dst, external=total >= _PROTO_LIMIT)


def _save(model: Any, dst: Path, external: bool) -> None:
    """Write `model` to `dst`; `external`: its tensors to one `<dst>.data` file beside it
    (a protobuf holds 2 GB at most)."""
    import onnx

    if not external:
        onnx.save_model(model, str(dst))
        return
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
        size_threshold=1024,
    )


def _data_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.exists() else 0


def _remove_graph(path: Path) -> None:
    path.unlink()
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()


def convert_onnx(
    hf_dir: str | Path, out_dir: str | Path, precision: str = "fp32", *, quiet: bool = False
) -> dict[str, Any]:
    """Write vision-<precision>.onnx, vision_spec.json and manifest.json to out_dir."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    config = check_checkpoint(hf_dir)
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ModelError(
            "ONNX export needs onnx and onnxruntime: pip install 'verm-local[onnx]'"
        ) from None
    say = (lambda m: None) if quiet else (lambda m: log.info("%s", m))
    spec = vision_spec(hf_dir, config)
    t0 = time.perf_counter()
    with atomic_directory(out_dir) as tmp:
        fp32 = tmp / "vision-fp32.onnx"
        say("[1/3] exporting the vision tower (with deepstack outputs) to ONNX fp32")
        _export_fp32(hf_dir, fp32, spec)
        final = tmp / f"vision-{precision}.onnx"
        if precision == "int8":
            say("[2/3] ONNX Runtime dynamic int8 quantization (weights int8)")
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(fp32), str(final), weight_type=QuantType.QInt8)
            _remove_graph(fp32)
        elif precision == "fp16":
            say("[2/3] converting to fp16 (for the CUDA execution provider)")
            from onnxruntime.transformers.float16 import convert_float_to_float16

            half = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
            big = fp32.stat().st_size + _data_size(fp32) > 2 * _PROTO_LIMIT
            _remove_graph(fp32)
            _save(half, final, external=big)
        else:
            say("[2/3] fp32: nothing to convert")
        (tmp / "vision_spec.json").write_text(json.dumps(spec, indent=2))
        say("[3/3] manifest with sha256")
        manifest = {
            "format": "onnx-vision",
            "architecture": MODEL_ARCHITECTURE,
            "source": str(hf_dir.resolve()),
            "precision": precision,
            "inputs": list(INPUTS),
            "output": "embeddings [tokens, out_dim * (1 + n_deepstack)], llama.cpp's layout",
            "files": [
                manifest_entry(p, "vision", precision) for p in sorted(tmp.iterdir()) if p.is_file()
            ],
        }
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    say(f"      done in {time.perf_counter() - t0:.0f} s -> {out_dir}")
    return manifest
