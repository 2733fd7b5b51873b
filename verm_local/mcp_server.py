"""`verm-local mcp`: the visual critic as tools an agent calls over the Model Context
Protocol (the `mcp` SDK's MCPServer), on stdio or streamable HTTP.

- `judge` (gt, pred, task): the `Judgement` as structured content and a short summary.
- `critique` (gt, task, code | pred): what `/v1/critique` answers (`schema.Critique`): the
  code rendered in the sandbox as the authors render the task, judged, the reward and the
  revision message `refine` would send.
- `render` (code, task): the render as a PNG image (the same sandbox and renderers).

The judge loads once, in the background from the start; a call that comes before it is
ready waits, with progress notifications. Images are data URLs or paths inside the roots
(`--root`, default the working directory, and the roots the client declares); a path
outside them, or a symlink that leaves them, is refused before it is read. A bad image,
a render that fails, no sandbox, an unreadable answer: a tool result with `isError` and
one line. A malformed call (an unknown tool, arguments that do not fit the tool's input
schema): a JSON-RPC error. On stdio nothing but protocol messages reaches stdout: native
libraries that print there are sent to stderr with the logs."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, CallToolResult, ImageContent, TextContent
from pydantic import BaseModel, Field

from . import __version__
from .errors import InputError, VermError
from .schema import Critique, Judgement

log = logging.getLogger("verm_local.mcp")

Task = Literal["chart", "table", "svg"]
MAX_IMAGE_BYTES = 20 << 20
ImageArg = Annotated[
    str,
    Field(
        description="A PNG/JPEG/SVG file path inside the server's roots, or a data URL "
        "(data:image/png;base64,...)."
    ),
]
TaskArg = Annotated[
    Task, Field(description="chart (chart-to-code), table (table-to-markdown) or svg.")
]


class Rendered(BaseModel):
    """A render: the PNG is the result's image content; here its size."""

    mime_type: str = "image/png"
    width: int
    height: int
    bytes: int


class Critic:
    """What the tools share: the judge (loaded once, in a thread), the roots, the
    sandbox setting; one judgement at a time (llama.cpp's context is not shared)."""

    def __init__(self, judge_options: dict[str, Any], roots: list[Path], unsafe: bool | None):
        self.options = judge_options
        self.roots = [r.resolve() for r in roots]
        self.unsafe = unsafe
        self.judge: Any = None
        self.error: str | None = None
        self.stage = "starting"
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._load, name="verm-mcp-load", daemon=True).start()

    def _load(self) -> None:
        from . import events
        from .judge import Judge

        def listen(name: str, detail: dict) -> None:
            self.stage = events.describe(name, detail)

        events.add_listener(listen)
        try:
            self.judge = Judge(**self.options)
            log.info("the judge is loaded: %s", self.judge.backend.info.path)
        except VermError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the server stays up and says why
            self.error = f"the judge could not load: {exc.__class__.__name__}: {exc}"
        finally:
            events.remove_listener(listen)
            self.ready.set()

    async def loaded(self, ctx: Context | None) -> Any:
        """The judge, once loaded; meanwhile a progress notification a second."""
        n = 0
        while not self.ready.is_set():
            if ctx is not None:
                await ctx.report_progress(n, None, f"loading the judge: {self.stage}")
            n += 1
            await anyio.sleep(1)
        if self.error:
            raise VermError(self.error)
        return self.judge

    async def roots_of(self, ctx: Context | None) -> list[Path]:
        """--root folders and the roots the client declares (file:// URIs)."""
        roots = list(self.roots)
        caps = ctx.client_capabilities if ctx is not None else None
        if caps is not None and getattr(caps, "roots", None) is not None:
            try:
                listed = await ctx.session.list_roots()
            except Exception as exc:  # noqa: BLE001 - a client that cannot list: --root only
                log.debug("the client's roots are not available: %s", exc)
            else:
                for root in listed.roots:
                    uri = urlparse(str(root.uri))
                    if uri.scheme == "file":
                        roots.append(Path(unquote(uri.path)).resolve())
        return roots

    async def image(self, value: str, what: str, ctx: Context | None) -> tuple[bytes, str]:
        """An image argument's bytes and how errors call it: a data URL, or a file inside
        the roots (checked on the path with its symlinks resolved, before it is read)."""
        if value.startswith("data:"):
            head, _, data = value.partition(",")
            if ";base64" not in head:
                raise InputError(f"{what}: a data URL must be base64-encoded")
            if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
                raise InputError(f"{what}: over {MAX_IMAGE_BYTES} bytes")
            try:
                return base64.b64decode(data, validate=True), f"{what} (a data URL)"
            except (binascii.Error, ValueError):
                raise InputError(f"{what}: the data URL is not valid base64") from None
        raw = Path(unquote(value.removeprefix("file://"))).expanduser()
        roots = await self.roots_of(ctx)
        path = (raw if raw.is_absolute() else self.roots[0] / raw).resolve()
        if not any(path == r or path.is_relative_to(r) for r in roots):
            where = ", ".join(str(r) for r in roots)
            raise InputError(f"{what}: {value} is outside the roots this server reads ({where})")
        if not path.is_file():
            raise InputError(f"{what}: {value} is not a file")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise InputError(f"{what}: {value} is over {MAX_IMAGE_BYTES} bytes")
        return path.read_bytes(), f"{what} ({value})"

    async def prepared(self, j: Any, value: str, what: str, task: str, ctx: Context | None) -> Any:
        """An image argument as the task prepares it for the judge (a bad image fails here,
        named by its argument)."""
        data, name = await self.image(value, what, ctx)
        return await self.run(j.prepare, data, task, what, name)

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A blocking call (a judgement, a render) in a worker thread, one at a time."""

        def call() -> Any:
            with self.lock:
                return fn(*args, **kwargs)

        return await anyio.to_thread.run_sync(call)


def _error(exc: Exception) -> CallToolResult:
    if isinstance(exc, VermError):
        text = str(exc)
    else:
        text = f"internal error: {exc.__class__.__name__}: {exc}"
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


def _summary(j: Judgement) -> str:
    if not j.complete:
        return f"{j.task}: incomplete judgement ({j.problem}); reward {j.reward:g}"
    found = ", ".join(f"{e.category} (severity {e.severity})" for e in j.errors) or "none"
    return (
        f"{j.task}: {len(j.errors)} discrepancies, total severity {j.total_severity:g}, "
        f"reward {j.reward:g}; found: {found}"
    )


def build(critic: Critic) -> MCPServer:
    """The MCP server and its three tools."""
    server = MCPServer(
        name="verm-local",
        version=__version__,
        instructions=(
            "A visual critic (Visual-ERM): compare a ground-truth image with the render of "
            "predicted chart, table or SVG code. `render` draws code as the training "
            "pipeline does, `judge` lists the discrepancies between two images with a "
            "reward, `critique` does both and writes the revision message to act on."
        ),
        middleware=[checker := _MalformedCalls()],
    )

    @server.tool(
        description="Judge PRED against GT: the discrepancies (category, severity, location, "
        "description) and the task's reward."
    )
    async def judge(
        gt: ImageArg, pred: ImageArg, ctx: Context, task: TaskArg = "chart"
    ) -> Annotated[CallToolResult, Judgement]:
        try:
            j = await critic.loaded(ctx)
            gt_img = await critic.prepared(j, gt, "gt", task, ctx)
            pred_img = await critic.prepared(j, pred, "pred", task, ctx)
            found = await critic.run(j.judge, gt_img, pred_img, task, unreadable="score")
        except Exception as exc:  # noqa: BLE001 - every failure is a result, the server stays up
            return _error(exc)
        return CallToolResult(
            content=[TextContent(type="text", text=_summary(found))],
            structured_content=found.model_dump(mode="json"),
            is_error=not found.complete,
        )

    @server.tool(
        description="Critique a prediction for GT: CODE rendered in the sandbox as the task's "
        "pipeline renders it (or PRED, its rendered image), judged; the reward and the revision "
        "message for the next attempt."
    )
    async def critique(
        gt: ImageArg,
        ctx: Context,
        task: TaskArg = "chart",
        code: Annotated[
            str | None, Field(description="chart: matplotlib Python; svg: SVG; table: HTML.")
        ] = None,
        pred: Annotated[
            str | None, Field(description="Instead of code: its rendered image.")
        ] = None,
    ) -> Annotated[CallToolResult, Critique]:
        from .refine import critique as run_critique
        from .tasks import profile

        try:
            if (code is None) == (pred is None):
                raise InputError("give either code (rendered here) or pred (its rendered image)")
            j = await critic.loaded(ctx)
            gt_img = await critic.prepared(j, gt, "gt", task, ctx)
            pred_img = await critic.prepared(j, pred, "pred", task, ctx) if pred else None
            result = await critic.run(
                run_critique, j, gt_img, profile(task), code=code, pred=pred_img,
                unsafe=critic.unsafe,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - every failure is a result, the server stays up
            return _error(exc)
        judged = result.judgement
        failed = result.render_error is not None or not (judged and judged.complete)
        head = (
            f"the code did not render: {result.render_error}"
            if result.render_error is not None
            else _summary(result.judgement)
        )
        return CallToolResult(
            content=[TextContent(type="text", text=f"{head}\n\n{result.revision_message}")],
            structured_content=result.model_dump(mode="json"),
            is_error=failed,
        )

    @server.tool(
        description="Render CODE as the task's training pipeline renders it (chart: matplotlib, "
        "svg: cairosvg 336x336, table: HTML in Chromium), in the sandbox; the PNG."
    )
    async def render(code: str, task: TaskArg = "chart") -> Annotated[CallToolResult, Rendered]:
        from PIL import Image

        from .render import render_code

        try:
            png = await critic.run(render_code, code, task, unsafe=critic.unsafe)
            with Image.open(io.BytesIO(png)) as im:
                size = im.size
        except Exception as exc:  # noqa: BLE001 - every failure is a result, the server stays up
            return _error(exc)
        info = Rendered(width=size[0], height=size[1], bytes=len(png))
        return CallToolResult(
            content=[
                ImageContent(
                    type="image", data=base64.b64encode(png).decode(), mime_type="image/png"
                ),
                TextContent(type="text", text=f"rendered {task}: {size[0]}x{size[1]} PNG"),
            ],
            structured_content=info.model_dump(mode="json"),
        )

    checker.server = server
    return server


class _MalformedCalls:
    """A tools/call whose tool is unknown or whose arguments do not fit the tool's input
    schema is a JSON-RPC error (-32602), not a tool result."""

    def __init__(self) -> None:
        self.server: MCPServer | None = None  # set once its tools are registered
        self.schemas: dict[str, dict] | None = None

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        if ctx.method == "tools/call":
            await self._check(ctx.params)
        return await call_next(ctx)

    async def _check(self, params: Any) -> None:
        import jsonschema

        if self.schemas is None:
            tools = await self.server.list_tools()
            self.schemas = {t.name: t.input_schema for t in tools}
        if not isinstance(params, dict) or not isinstance(params.get("name"), str):
            raise MCPError(INVALID_PARAMS, "tools/call needs params {name, arguments}")
        name, args = params["name"], params.get("arguments", {})
        if name not in self.schemas:
            raise MCPError(
                INVALID_PARAMS, f"unknown tool {name!r}; the tools are {', '.join(self.schemas)}"
            )
        if not isinstance(args, dict):
            raise MCPError(INVALID_PARAMS, f"{name}: arguments must be an object")
        errors = sorted(
            jsonschema.Draft202012Validator(self.schemas[name]).iter_errors(args), key=str
        )
        if errors:
            e = errors[0]
            where = ".".join(str(p) for p in e.path) or "arguments"
            raise MCPError(INVALID_PARAMS, f"{name}: {where}: {e.message}")


def serve_stdio(server: MCPServer) -> None:
    """The server on stdin/stdout until stdin closes. File descriptor 1 is pointed at
    stderr for the process (native libraries print there), the protocol keeps the real
    stdout through a duplicate of it."""
    proto = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(proto, "w", buffering=1, encoding="utf-8", newline="\n")
    server.run("stdio")


def serve_http(server: MCPServer, host: str, port: int, api_key: str | None) -> None:
    """Streamable HTTP on host:port (path /mcp), `Authorization: Bearer KEY` required
    when `api_key` is set."""
    import uvicorn

    app = server.streamable_http_app(host=host)
    app = _require_key(app, api_key) if api_key else app
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _require_key(app: Any, key: str) -> Any:
    import hmac
    import json

    want = f"Bearer {key}".encode()

    async def guarded(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, want):
                message = "a valid API key is required (Authorization: Bearer KEY)"
                body = json.dumps(
                    {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": message}}
                ).encode()
                headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded
