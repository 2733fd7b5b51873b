"""`verm-local convert`: the tiny test model, GGUF and quants, GPTQ, ONNX vision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import RepackOpt, convert_app, show_progress


def _echo_files(out_dir: Path, entries: list[dict], label) -> None:
    """One line per file a converter wrote: label, size, sha256 prefix, path."""
    for e in entries:
        typer.echo(
            f"{label(e)}  {e['size'] / 1e6:8.1f} MB  {e['sha256'][:12]}  {out_dir / e['file']}"
        )


@convert_app.command("tiny-model")
def tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the HF checkpoint.")],
    seed: Annotated[int, typer.Option("--seed", help="Weights are deterministic for a seed.")] = 0,
    shape: Annotated[
        str,
        typer.Option(
            "--shape",
            help="tiny (tests) | 8b-vision | 8b | 8b-text4 (real shapes, for speed work).",
        ),
    ] = "tiny",
) -> None:
    """Write a tiny random-weight Qwen3-VL checkpoint with the real Qwen2 tokenizer."""
    show_progress()
    from ..convert.tiny_model import build_tiny_model

    typer.echo(str(build_tiny_model(out_dir, seed=seed, shape=shape)))


@convert_app.command("gguf")
def gguf_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face Qwen3-VL checkpoint.")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory.")],
    quant: Annotated[
        str,
        typer.Option(
            "--quant", help="Comma-separated quants beside F16 (Q8_0,Q6_K,Q5_K_M,Q4_K_M)."
        ),
    ] = "Q8_0,Q4_K_M",
    mmproj_type: Annotated[
        str, typer.Option("--mmproj-type", help="f16 | bf16 | q8_0 | f32")
    ] = "f16",
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check", help="Load each written model and run a few tokens here."
        ),
    ] = True,
    repack: RepackOpt = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the converter's own output.")
    ] = False,
) -> None:
    """Convert to GGUF (F16 + quants) and mmproj, with a sha256 manifest."""
    show_progress()
    from ..convert.gguf import convert_gguf, parse_quants

    manifest = convert_gguf(
        hf_dir,
        out_dir,
        parse_quants(quant),
        mmproj_type,
        verbose=verbose,
        check=check,
        repack=repack,
    )
    _echo_files(out_dir, manifest["files"], lambda e: f"{e['quant']:>7}")


@convert_app.command("gptq")
def gptq_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face Qwen3-VL checkpoint (bf16).")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory.")],
    bits: Annotated[int, typer.Option("--bits", help="4 or 8.")] = 4,
    group_size: Annotated[
        int, typer.Option("--group-size", help="Columns per scale (-1 = per row).")
    ] = 128,
    calibration: Annotated[
        str,
        typer.Option(
            "--calibration",
            help="'synthetic' (drawn chart/table/SVG pairs) or a directory in "
            "VC-RewardBench layout.",
        ),
    ] = "synthetic",
    samples: Annotated[int, typer.Option("--samples", help="Calibration conversations.")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Quantize the language model to GPTQ int4/int8 with GPTQModel, with a manifest."""
    show_progress()
    from ..convert.gptq import convert_gptq

    manifest = convert_gptq(
        hf_dir,
        out_dir,
        bits=bits,
        group_size=group_size,
        calibration=calibration,
        samples=samples,
        seed=seed,
    )
    _echo_files(
        out_dir, [e for e in manifest["files"] if e["kind"] == "weights"], lambda e: e["quant"]
    )


@convert_app.command("onnx")
def onnx_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face Qwen3-VL checkpoint.")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory (e.g. <gguf dir>/onnx).")],
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | int8")] = "fp32",
) -> None:
    """Export the vision tower (with deepstack outputs) to ONNX for ONNX Runtime."""
    show_progress()
    from ..convert.onnx import convert_onnx

    manifest = convert_onnx(hf_dir, out_dir, precision)
    _echo_files(
        out_dir, [e for e in manifest["files"] if e["file"].endswith(".onnx")], lambda e: precision
    )
