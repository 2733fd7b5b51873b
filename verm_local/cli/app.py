"""The `verm-local` typer app, its command groups, the options verbs share (defined once),
verbosity and the one-line failure. Each verb lives in the module named for it."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from ..errors import ExitCode

app = typer.Typer(
    name="verm-local",
    help="Quantized, verified local inference for the Visual-ERM reward model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
convert_app = typer.Typer(
    help="Build models: tiny test model, GGUF conversion and quants, GPTQ, ONNX vision.",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")
bench_app = typer.Typer(
    help="Benchmarks: labelled data, agreement with the reference, latency.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
bench_data_app = typer.Typer(
    help="Benchmark data in VC-RewardBench's layout.", no_args_is_help=True
)
bench_app.add_typer(bench_data_app, name="data")

# ---------------------------------------------------------------- shared options

MODEL, REQUEST, DECODING, MACHINE, OUTPUT = "Model", "Request", "Decoding", "Machine", "Output"

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        rich_help_panel=MODEL,
        help="A .gguf file, a `convert` directory or an HF checkpoint (default: the planned "
        "variant from the store; VERM_LOCAL_MODEL).",
    ),
]
VariantOpt = Annotated[
    Optional[str],
    typer.Option(
        "--variant", rich_help_panel=MODEL, help="Store variant to use instead of the plan's."
    ),
]
QuantOpt = Annotated[
    Optional[str],
    typer.Option("--quant", rich_help_panel=MODEL, help="Quant to use from a model directory."),
]
VisionOpt = Annotated[
    str,
    typer.Option(
        "--vision",
        rich_help_panel=MODEL,
        help="GGUF: auto | gguf (mmproj) | onnx (ONNX Runtime tower).",
    ),
]
TaskOpt = Annotated[
    str, typer.Option("--task", "-t", rich_help_panel=REQUEST, help="chart | table | svg")
]
ImageTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--image-tokens",
        min=1,
        rich_help_panel=REQUEST,
        help="Cap visual tokens per image below the task's trained size (less memory, less "
        "fidelity).",
    ),
]
MaxTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-tokens",
        min=1,
        rich_help_panel=DECODING,
        help="Answer cap (default: the trained one, 4096 chart/svg, 8192 table).",
    ),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads", min=1, rich_help_panel=MACHINE, help="CPU threads (default: physical cores)."
    ),
]
GpuLayersOpt = Annotated[
    Optional[int],
    typer.Option(
        "--gpu-layers",
        rich_help_panel=MACHINE,
        help="Layers to offload (-1 = all; default: planned).",
    ),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device", rich_help_panel=MACHINE, help="cuda | metal | cpu (default: planned)."
    ),
]
RepackOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--repack/--no-repack",
        rich_help_panel=MACHINE,
        help="llama.cpp weight repacking / AMX buffers (default: decided from the CPU; "
        "VERM_LOCAL_REPACK).",
    ),
]
SpeculateOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--speculate/--no-speculate",
        rich_help_panel=MACHINE,
        help="Decode the text the answer grammar dictates (keys, quotes, the rest of a "
        "category name) in one step with the token before it, keeping only what the "
        "sampler would pick: the same answers in fewer decode steps (llama.cpp models; "
        "default: on where decoding is deterministic, where it is exact).",
    ),
]
DeterministicOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--deterministic/--no-deterministic",
        rich_help_panel=MACHINE,
        help="Greedy judgements whose logits do not depend on the path (alone, batched, "
        "drafted, prefix-cached): llama.cpp's batch-invariant CPU kernels, weights plain "
        "(default: wherever the build and device allow; VERM_LOCAL_DETERMINISTIC). "
        "--deterministic refuses where it cannot hold; --no-deterministic takes the faster "
        "multi-row kernels.",
    ),
]
KvTypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--kv-type",
        rich_help_panel=MACHINE,
        help="llama.cpp KV cache type: f16 | q8_0 (less memory, slower prefill on a CPU; "
        "needs flash attention) (default: the plan's).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print JSON.")]
RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        rich_help_panel="Ray",
        help="Judge on Ray Data: an actor pool of judges (a local Ray instance, or the "
        "cluster of --ray-address).",
    ),
]
RayAddressOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray-address",
        rich_help_panel="Ray",
        help="The Ray cluster to join, e.g. ray://head:10001 (implies --ray; default: a "
        "local Ray instance on this machine).",
    ),
]
RayActorsOpt = Annotated[
    int, typer.Option("--ray-actors", min=1, rich_help_panel="Ray", help="Judges in the pool.")
]


def ray_target(ray: bool, address: Optional[str]) -> Optional[str]:
    """Where `--ray` / `--ray-address` send the work: None (here, no Ray), "local" (a
    local Ray instance) or the cluster's address."""
    if address is not None:
        return address
    return "local" if ray else None


# ---------------------------------------------------------------- verbosity

_verbosity = {"level": 0}


def verbosity() -> int:
    """-1 with -q, 0 by default, 1 with -v, 2 with -vv."""
    return _verbosity["level"]


@app.callback()
def _options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="More on stderr: -v progress and details, -vv llama.cpp's own log too.",
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only on stderr.")] = False,
) -> None:
    """Quantized, verified local inference for the Visual-ERM reward model."""
    _verbosity["level"] = -1 if quiet else verbose
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        _verbosity["level"], logging.DEBUG
    )
    logging.getLogger("verm_local").setLevel(level)
    if _verbosity["level"] >= 2:
        logging.getLogger("verm_local.llama_cpp").setLevel(logging.DEBUG)


def show_progress() -> None:
    """Long work (pull, convert, bench, serve) reports its steps unless -q."""
    if _verbosity["level"] == 0:
        logging.getLogger("verm_local").setLevel(logging.INFO)


def fail(message: str, code: int) -> None:
    """One clear line on stderr and a non-zero exit; never a traceback."""
    typer.echo(f"verm-local: error: {message}", err=True)
    raise typer.Exit(code)


def kv_type_choice(value: str | None) -> str | None:
    """--kv-type checked: f16 or q8_0 (q8_0 turns flash attention on: llama.cpp needs it
    for a quantized V cache)."""
    if value is None:
        return None
    if value not in ("f16", "q8_0"):
        fail(f"--kv-type must be f16 or q8_0, not {value!r}", ExitCode.INPUT)
    return value


def split_list(spec: str) -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [x.strip() for x in spec.split(",") if x.strip()]
