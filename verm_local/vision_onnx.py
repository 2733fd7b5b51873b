"""The Qwen3-VL vision tower on ONNX Runtime: pixel preprocessing, the grid-dependent
inputs (learned position-embedding interpolation, rotary positions) and the session.

Everything that depends on an image's grid is computed here in numpy and fed to the graph
as inputs, so one exported graph takes any grid the image budget allows. The output is laid
out as llama.cpp's Qwen3-VL projector lays it out: per merged visual token, the merger's
features followed by each deepstack merger's, concatenated along the feature axis."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError, VermError
from .hardware import default_threads
from .images import PreparedImage

INPUTS = ("patches", "pos_indices", "pos_weights", "rot_pos")


@dataclass(frozen=True)
class VisionSpec:
    """What preprocessing needs to know of the tower (stored beside the ONNX graph)."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    num_grid_per_side: int = 48
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    out_dim: int = 0
    n_deepstack: int = 0

    @classmethod
    def load(cls, path: Path) -> "VisionSpec":
        data = json.loads(path.read_text(encoding="utf-8"))
        data["image_mean"] = tuple(data["image_mean"])
        data["image_std"] = tuple(data["image_std"])
        return cls(**data)


def grid(image: PreparedImage, spec: VisionSpec) -> tuple[int, int]:
    """(rows, cols) of 16-px patches; the image sides are multiples of 32 already."""
    w, h = image.size
    p = spec.patch_size
    if w % (p * spec.merge_size) or h % (p * spec.merge_size):
        raise VermError(f"{image.source}: sides must be multiples of {p * spec.merge_size}")
    return h // p, w // p


def patches(image: PreparedImage, spec: VisionSpec) -> np.ndarray:
    """Normalised patches in Qwen2-VL's order: merge blocks in raster order, each patch a
    (channel, temporal, row, col) vector, the frame repeated over the temporal patch."""
    gh, gw = grid(image, spec)
    m, p, t = spec.merge_size, spec.patch_size, spec.temporal_patch_size
    x = np.asarray(image.image, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std, np.float32)
    x = x.transpose(2, 0, 1)  # C, H, W
    x = np.broadcast_to(x[None], (t,) + x.shape)  # T, C, H, W
    c = x.shape[1]
    x = x.reshape(t, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # gh/m, gw/m, m, m, C, T, P, P
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p))


def _block_order(gh: int, gw: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch in merge-block order."""
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    shape = (gh // m, m, gw // m, m)
    return (
        rows.reshape(shape).transpose(0, 2, 1, 3).ravel(),
        cols.reshape(shape).transpose(0, 2, 1, 3).ravel(),
    )


def rotary_positions(gh: int, gw: int, m: int) -> np.ndarray:
    """[N, 2] (row, col) of each patch, the rotary embedding's positions."""
    rows, cols = _block_order(gh, gw, m)
    return np.stack([rows, cols], axis=-1).astype(np.int64)


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    # Bilinear, align_corners=True: endpoints map to 0 and side-1.
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    taps = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
    return np.clip(taps, 0, side - 1), weights.astype(np.float32)


def position_interpolation(gh: int, gw: int, m: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices and weights ([N, 4] each) that resample the learned side x side
    position table to the image's grid, bilinearly with aligned corners."""
    rows, cols = _block_order(gh, gw, m)
    h_taps, h_w = _axis_taps(rows, gh, side)
    w_taps, w_w = _axis_taps(cols, gw, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices, weights


def graph_inputs(image: PreparedImage, spec: VisionSpec) -> dict[str, np.ndarray]:
    gh, gw = grid(image, spec)
    idx, wts = position_interpolation(gh, gw, spec.merge_size, spec.num_grid_per_side)
    return {
        "patches": patches(image, spec),
        "pos_indices": idx,
        "pos_weights": wts,
        "rot_pos": rotary_positions(gh, gw, spec.merge_size),
    }


class OnnxVision:
    """An ONNX Runtime session of the exported tower; `encode` gives llama.cpp's layout."""

    def __init__(
        self,
        model_dir: str | Path,
        precision: str | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError:
            raise VermError(
                "the ONNX vision path needs onnxruntime (pip install onnxruntime, "
                "or onnxruntime-gpu for CUDA)"
            ) from None
        model_dir = Path(model_dir)
        spec_path = model_dir / "vision_spec.json"
        if not spec_path.is_file():
            raise ModelError(f"{model_dir}: no vision_spec.json; not a `convert onnx` output")
        self.spec = VisionSpec.load(spec_path)
        available = ort.get_available_providers()
        on_gpu = "CUDAExecutionProvider" in available
        # fp16 only pays on a GPU; on a CPU fp32 is exact and int8 the fast option.
        order = ["fp16", "fp32", "int8"] if on_gpu else ["fp32", "int8", "fp16"]
        wanted = [precision] if precision else order
        files = [
            model_dir / f"vision-{p}.onnx"
            for p in wanted
            if (model_dir / f"vision-{p}.onnx").is_file()
        ]
        if not files:
            raise ModelError(f"{model_dir}: no vision-{precision or '*'}.onnx in it")
        self.path = files[0]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = [
            p
            for p in (
                providers
                or ["CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"]
            )
            if p in available
        ]
        # Give the arena's chunks back after each run: one image's activations are over a
        # gigabyte at 1024 visual tokens, and a kept arena outlives the session's release.
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._session_args = (str(self.path), opts, chosen)
        self.session = ort.InferenceSession(str(self.path), opts, providers=chosen)
        self.providers = self.session.get_providers()

    def release(self) -> None:
        """Let the session (its weights and activation arena) go and hand the freed heap
        back to the system, so the text model does not load on top of it; the next
        `encode` loads it again."""
        from .memory import release_heap

        self.session = None
        release_heap()

    def encode(self, image: PreparedImage) -> tuple[np.ndarray, float]:
        """([tokens, out_dim * (1 + deepstack)] float32, seconds)."""
        if self.session is None:
            import onnxruntime as ort

            path, opts, providers = self._session_args
            self.session = ort.InferenceSession(path, opts, providers=providers)
        feeds = graph_inputs(image, self.spec)
        t0 = time.perf_counter()
        (out,) = self.session.run(None, feeds, self._run_options)
        return np.ascontiguousarray(out, dtype=np.float32), time.perf_counter() - t0


def find_tower(model_dir: Path) -> Path | None:
    """An ONNX vision tower kept with a GGUF model: <dir>/onnx/ (from `convert onnx`)."""
    for candidate in (model_dir / "onnx", model_dir / "vision-onnx"):
        if (candidate / "vision_spec.json").is_file():
            return candidate
    return None


def choose_vision(
    mode: str, tower: Path | None, onnxruntime_ok: bool, gpu_offload: bool
) -> tuple[str, str]:
    """Pure choice of the vision path: ("gguf" | "onnx", reason).

    auto: the ONNX tower when one is kept with the model, onnxruntime imports, and the model
    runs on the CPU (measured faster there than llama.cpp's mmproj at equal precision; on a
    GPU the mmproj runs offloaded); otherwise the mmproj."""
    if mode == "gguf":
        return "gguf", "asked for the mmproj"
    if mode == "onnx":
        if tower is None:
            raise ModelError(
                "--vision onnx: no ONNX vision tower found; pass --vision-model DIR "
                "(written by `verm-local convert onnx`) or keep it in <model>/onnx/"
            )
        if not onnxruntime_ok:
            raise VermError(
                "--vision onnx needs onnxruntime: pip install onnxruntime "
                "(onnxruntime-gpu for CUDA)"
            )
        return "onnx", "asked for ONNX Runtime"
    if mode != "auto":
        raise VermError(f"unknown vision path {mode!r}; choose auto, gguf or onnx")
    if tower is None:
        return "gguf", "no ONNX vision tower kept with the model"
    if not onnxruntime_ok:
        return "gguf", "onnxruntime is not installed; using the mmproj"
    if gpu_offload:
        return "gguf", "layers are offloaded to a GPU; the mmproj runs there too"
    return "onnx", "ONNX Runtime is faster than the mmproj on a CPU"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
