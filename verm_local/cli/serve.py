"""`verm-local serve`: the OpenAI-compatible reward endpoint (llama.cpp engine, or vLLM)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from .app import (
    DeterministicOpt,
    GpuLayersOpt,
    ImageTokensOpt,
    ModelOpt,
    RepackOpt,
    SpeculateOpt,
    ThreadsOpt,
    VariantOpt,
    VisionOpt,
    app,
    fail,
    show_progress,
)


@app.command("serve")
def serve_cmd(
    model: ModelOpt = None,
    variant: VariantOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind (loopback unless told otherwise).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    parallel: Annotated[
        int,
        typer.Option("--parallel", min=1, max=64, help="Requests run at once in the loaded model."),
    ] = 4,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            help="Require `Authorization: Bearer KEY` on /v1 (default: VERM_LOCAL_API_KEY).",
        ),
    ] = None,
    max_image_bytes: Annotated[int, typer.Option("--max-image-bytes", min=1)] = 20 << 20,
    max_request_bytes: Annotated[int, typer.Option("--max-request-bytes", min=1)] = 64 << 20,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds per request.")
    ] = 300.0,
    queue_size: Annotated[
        int, typer.Option("--queue", min=1, help="Requests that may wait; more are answered 429.")
    ] = 64,
    prefix_cache: Annotated[
        int, typer.Option("--prefix-cache", min=0, help="Ground-truth prefixes kept evaluated.")
    ] = 4,
    image_tokens: ImageTokensOpt = None,
    max_tokens: Annotated[
        Optional[int],
        typer.Option("--max-tokens", min=1, help="Cap on answer tokens (default 8192)."),
    ] = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    repack: RepackOpt = None,
    speculate: SpeculateOpt = None,
    deterministic: DeterministicOpt = None,
    vision: VisionOpt = "auto",
    allow_remote_images: Annotated[bool, typer.Option("--allow-remote-images")] = False,
    allow_local_images: Annotated[bool, typer.Option("--allow-local-images")] = False,
    unsafe_render: Annotated[
        Optional[bool],
        typer.Option(
            "--unsafe-render",
            help="/v1/critique: render code even where no sandbox is available.",
        ),
    ] = None,
    served_name: Annotated[Optional[str], typer.Option("--served-model-name")] = None,
    engine: Annotated[
        str,
        typer.Option("--engine", help="llamacpp (in-process batches) | vllm (bf16/GPTQ on CUDA)"),
    ] = "llamacpp",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="--engine vllm: print the command.")
    ] = False,
    replicas: Annotated[
        int,
        typer.Option(
            "--replicas",
            min=1,
            rich_help_panel="Ray",
            help="Serve N replicas behind this one URL on Ray Serve (requests sharing a "
            "ground truth go to one replica).",
        ),
    ] = 1,
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            "--ray-address",
            rich_help_panel="Ray",
            help="Join this Ray cluster (default: a local Ray instance on this machine).",
        ),
    ] = None,
    min_replicas: Annotated[
        Optional[int], typer.Option("--min-replicas", min=0, rich_help_panel="Ray")
    ] = None,
    max_replicas: Annotated[
        Optional[int],
        typer.Option("--max-replicas", min=1, rich_help_panel="Ray", help="Autoscale between."),
    ] = None,
    affinity: Annotated[
        bool,
        typer.Option(
            "--affinity/--no-affinity",
            rich_help_panel="Ray",
            help="Requests sharing a ground truth go to one replica (else Ray's own routing).",
        ),
    ] = True,
    replica_cpus: Annotated[
        float,
        typer.Option("--replica-cpus", min=0.1, rich_help_panel="Ray", help="CPUs per replica."),
    ] = 1.0,
) -> None:
    """OpenAI-compatible reward endpoint: /v1/chat/completions, /v1/judge, /health, /metrics."""
    from ..server import ServeConfig, serve
    from ..server.vllm import vllm_for
    from ..settings import settings

    cfg = ServeConfig(
        model=model,
        variant=variant,
        host=host,
        port=port,
        parallel=parallel,
        api_key=api_key or settings().api_key,
        max_image_bytes=max_image_bytes,
        max_request_bytes=max_request_bytes,
        timeout=timeout,
        queue_size=queue_size,
        prefix_cache=prefix_cache,
        image_tokens=image_tokens,
        max_tokens=max_tokens,
        threads=threads,
        gpu_layers=gpu_layers,
        vision=vision,
        repack=repack,
        speculate=speculate,
        deterministic=deterministic,
        allow_remote_images=allow_remote_images,
        allow_local_images=allow_local_images,
        unsafe_render=unsafe_render,
        affinity=affinity,
        served_name=served_name,
    )
    if (min_replicas is None) != (max_replicas is None):
        fail("--min-replicas and --max-replicas go together", ExitCode.INPUT)
    autoscale = (min_replicas, max_replicas) if min_replicas is not None else None
    if autoscale and autoscale[0] > autoscale[1]:
        fail("--min-replicas is above --max-replicas", ExitCode.INPUT)
    on_ray = replicas > 1 or autoscale is not None or ray_address is not None
    if engine == "vllm":
        import json
        import shlex
        import shutil

        cmd = vllm_for(model, variant, cfg)
        if on_ray:
            from ..server.vllm import ray_llm_config, serve_vllm_on_ray

            config = ray_llm_config(cmd, replicas, autoscale)
            if dry_run:
                typer.echo(json.dumps(config, indent=2))
                return
            show_progress()
            serve_vllm_on_ray(config, host, port, ray_address)
            return
        if dry_run:
            typer.echo(shlex.join(cmd))
            return
        if shutil.which("vllm") is None:
            fail(
                "vLLM is not installed (pip install vllm, on a CUDA machine); --dry-run "
                "prints the command",
                ExitCode.PLAN,
            )
        os.execvp(cmd[0], cmd)
    if engine != "llamacpp":
        fail(f"unknown engine {engine!r}; choose llamacpp or vllm", ExitCode.INPUT)
    if dry_run:
        fail("--dry-run goes with --engine vllm", ExitCode.INPUT)
    show_progress()
    if on_ray:
        from ..server.ray_serve import serve_replicas

        serve_replicas(cfg, replicas, address=ray_address, autoscale=autoscale, cpus=replica_cpus)
        return
    serve(cfg)
