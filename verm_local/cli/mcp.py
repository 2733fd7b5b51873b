"""`verm-local mcp`: the visual critic's tools (judge, critique, render) for agents, over
the Model Context Protocol (stdio, or streamable HTTP with --http)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from .app import (
    DeterministicOpt,
    ImageTokensOpt,
    MaxTokensOpt,
    ModelOpt,
    QuantOpt,
    RepackOpt,
    ThreadsOpt,
    VariantOpt,
    VisionOpt,
    app,
    fail,
)
from .critic import UnsafeRenderOpt


@app.command("mcp")
def mcp_cmd(
    model: ModelOpt = None,
    quant: QuantOpt = None,
    variant: VariantOpt = None,
    root: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--root",
            help="A folder the tools may read images from (repeatable; default: the working "
            "directory); the roots the client declares are added.",
        ),
    ] = None,
    http: Annotated[
        Optional[str],
        typer.Option("--http", help="Serve streamable HTTP on HOST:PORT (path /mcp), not stdio."),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            help="--http: require `Authorization: Bearer KEY` (default: VERM_LOCAL_API_KEY).",
        ),
    ] = None,
    vision: VisionOpt = "auto",
    image_tokens: ImageTokensOpt = None,
    max_tokens: MaxTokensOpt = None,
    threads: ThreadsOpt = None,
    repack: RepackOpt = None,
    deterministic: DeterministicOpt = None,
    unsafe_render: UnsafeRenderOpt = None,
) -> None:
    """MCP server: judge, critique and render as tools for agents (stdio by default)."""
    from ..mcp_server import Critic, build, serve_http, serve_stdio
    from ..settings import settings

    roots = root or [Path.cwd()]
    for r in roots:
        if not r.is_dir():
            fail(f"--root {r}: not a folder", ExitCode.INPUT)
    address = None
    if http is not None:
        host, _, port = http.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            fail(f"--http {http}: give HOST:PORT, e.g. 127.0.0.1:8765", ExitCode.INPUT)
        address = (host, int(port))
    elif api_key is not None:
        fail("--api-key goes with --http (stdio has no network to guard)", ExitCode.INPUT)
    options = dict(
        model=model,
        quant=quant,
        variant=variant,
        vision=vision,
        image_tokens=image_tokens,
        max_tokens=max_tokens,
        threads=threads,
        repack=repack,
        deterministic=deterministic,
    )
    critic = Critic(options, roots, unsafe_render)
    server = build(critic)
    critic.start()  # the judge loads while the client connects
    if address is None:
        serve_stdio(server)
    else:
        serve_http(server, *address, api_key or settings().api_key)
