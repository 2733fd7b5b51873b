"""Vision-stage latency per path: llama.cpp's mmproj (each mmproj-*.gguf in a converted
directory) against the tower on ONNX Runtime (each `convert onnx` output given), on one
image, with the relative error of each path's embeddings against the most exact path.

    python -m verm_local.benchmarks.vision_stage MODEL_DIR IMAGE [--onnx DIR ...]
        [--repeat N] [--threads N] [--image-tokens N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

from verm_local.images import load_image


def measure(
    model_dir: Path,
    image_path: Path,
    onnx_dirs: list[Path],
    repeat: int = 3,
    threads: int | None = None,
    image_tokens: int = 1024,
) -> list[dict]:
    """One row per path: median/min seconds over `repeat` runs after a warm-up."""
    from verm_local.backends.llamacpp import LlamaCppBackend
    from verm_local.modelref import resolve_model
    from verm_local.vision_onnx import OnnxVision

    image = load_image(image_path, image_tokens=image_tokens)
    text = resolve_model(model_dir, quant=None)
    paths = [
        (f"mmproj {p.stem.removeprefix('mmproj-')}", p, None)
        for p in sorted(model_dir.glob("mmproj-*.gguf"))
    ]
    for d in onnx_dirs:
        for f in sorted(d.glob("vision-*.onnx")):
            paths.append((f"onnx {f.stem.removeprefix('vision-')}", text.mmproj, (d, f)))
    # The reference is the most exact path present: ONNX fp32 (matches PyTorch to 1e-6),
    # else an f32 mmproj, else the first.
    exact = [i for i, (n, _, _) in enumerate(paths) if n in ("onnx fp32", "mmproj f32")]
    if exact:
        paths.insert(0, paths.pop(exact[0]))
    rows, reference = [], None
    for name, mmproj, onnx in paths:
        vision = (
            OnnxVision(onnx[0], onnx[1].stem.removeprefix("vision-"), threads=threads)
            if onnx
            else None
        )
        model = resolve_model(text.path, mmproj=mmproj)
        backend = LlamaCppBackend(model, n_ctx=4096, threads=threads, vision=vision)
        try:
            emb, _ = backend.encode_image_timed(image)  # warm-up
            times = [backend.encode_image_timed(image)[1] for _ in range(repeat)]
        finally:
            backend.close()
        if reference is None:
            reference = emb
        rel = float(np.linalg.norm(emb - reference) / np.linalg.norm(reference))
        rows.append(
            {
                "path": name,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "rel_error_vs_ref": rel,
                "tokens": int(emb.shape[0]),
            }
        )
        print(
            f"{name:>14}: {rows[-1]['median_s']:.3f} s (median of {repeat}), rel. error {rel:.2e}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def markdown(rows: list[dict], image: str, size: tuple[int, int]) -> str:
    head = (
        f"Vision stage, one {size[0]}x{size[1]} image ({rows[0]['tokens']} visual tokens), "
        f"{platform.processor() or platform.machine()}\n\n"
        f"| path | median s | min s | rel. error vs {rows[0]['path']} |\n|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['path']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['rel_error_vs_ref']:.2e} |\n"
        for r in rows
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--onnx", type=Path, action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rows = measure(a.model_dir, a.image, a.onnx, a.repeat, a.threads, a.image_tokens)
    size = load_image(a.image, image_tokens=a.image_tokens).size
    print(markdown(rows, str(a.image), size))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
