"""`verm-local mcp` (issue 36): a real `verm-local mcp` subprocess with the tiny model,
driven by the SDK's own client over stdio (initialize, tools/list, tools/call of judge,
critique and render; roots; failures as isError results; malformed calls as JSON-RPC
errors), and by a bare JSON-RPC client written from the protocol: every line on stdout is
a protocol message, and the server exits when stdin closes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from verm_local.schema import Critique, Judgement

from .conftest import CLI, draw_chart

pytestmark = pytest.mark.slow

GOOD = "import matplotlib.pyplot as plt\nplt.bar([0, 1, 2, 3], [3, 4, 2, 6])\n"
BROKEN = "import matplotlib.pyplot as plt\nplt.bar([0, 1], [1, 2, 3])\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcproot")
    draw_chart(root / "gt.png", [3, 5, 2, 6])
    draw_chart(root / "pred.png", [3, 4, 2, 6], colour="orange")
    (root / "not-an-image.png").write_text("hello")
    outside = tmp_path_factory.mktemp("outside")
    draw_chart(outside / "secret.png", [1, 1, 1, 1])
    (root / "link.png").symlink_to(outside / "secret.png")  # leaves the root
    declared = tmp_path_factory.mktemp("declared")  # a root the client declares
    draw_chart(declared / "theirs.png", [2, 2, 2, 2])
    return root, outside, declared


def _command(tiny_gguf: Path, root: Path) -> list[str]:
    return [str(CLI), "mcp", "--model", str(tiny_gguf), "--quant", "Q8_0", "--root", str(root),
            "--vision", "gguf", "--image-tokens", "64", "--max-tokens", "200"]  # fmt: skip


def test_the_sdk_client_calls_every_tool(tiny_gguf, workdir):
    from mcp import ClientSession, StdioServerParameters, types
    from mcp.client.stdio import stdio_client
    from mcp.shared.exceptions import MCPError

    root, outside, declared = workdir
    cmd = _command(tiny_gguf, root)
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=dict(os.environ))
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async def roots(context) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=declared.as_uri(), name="theirs")])

    async def session() -> dict:
        out: dict = {}
        async with (
            stdio_client(params) as (read, write),
            ClientSession(read, write, list_roots_callback=roots) as s,
        ):
            await s.initialize()
            tools = {t.name: t for t in (await s.list_tools()).tools}
            out["tools"] = tools
            out["judge"] = await s.call_tool(
                "judge", {"gt": "gt.png", "pred": str(root / "pred.png"), "task": "chart"},
                progress_callback=on_progress,
            )  # fmt: skip
            out["critique"] = await s.call_tool("critique", {"gt": "gt.png", "code": GOOD})
            out["broken"] = await s.call_tool("critique", {"gt": "gt.png", "code": BROKEN})
            url = (
                "data:image/png;base64,"
                + base64.b64encode((root / "pred.png").read_bytes()).decode()
            )
            out["by_image"] = await s.call_tool(
                "critique", {"gt": "gt.png", "pred": url, "task": "chart"}
            )
            out["render"] = await s.call_tool("render", {"code": GOOD, "task": "chart"})
            theirs = {"gt": str(declared / "theirs.png"), "pred": "pred.png"}
            out["declared"] = await s.call_tool("judge", theirs)
            out["outside"] = await s.call_tool(
                "judge", {"gt": str(outside / "secret.png"), "pred": "pred.png"}
            )
            out["symlink"] = await s.call_tool("judge", {"gt": "link.png", "pred": "pred.png"})
            out["bad_image"] = await s.call_tool(
                "judge", {"gt": "not-an-image.png", "pred": "pred.png"}
            )
            for name, args in (
                ("nope", {}),
                ("judge", {"gt": 3, "pred": "pred.png"}),
                ("judge", {"gt": "gt.png"}),
                ("render", {"code": "x", "task": "pie"}),
            ):
                try:
                    await s.call_tool(name, args)
                except MCPError as exc:
                    out.setdefault("rpc_errors", []).append((exc.code, str(exc)))
                else:
                    out.setdefault("rpc_errors", []).append((None, "no error"))
        return out

    out = anyio.run(session)
    tools = out["tools"]
    assert set(tools) == {"judge", "critique", "render"}
    for t in tools.values():
        assert t.input_schema["type"] == "object" and t.output_schema is not None
    assert set(tools["judge"].input_schema["required"]) == {"gt", "pred"}
    j = out["judge"]
    judged = Judgement.model_validate(j.structured_content)
    assert judged.task == "chart" and judged.deterministic and "reward" in j.content[0].text
    assert j.is_error == (not judged.complete)
    assert all("loading the judge" in m for m in progress)  # progress while it loaded, if any
    c = Critique.model_validate(out["critique"].structured_content)
    assert c.render_error is None and c.judgement is not None and "Your code" in c.revision_message
    broken = out["broken"]
    assert broken.is_error and "did not render" in broken.content[0].text
    assert Critique.model_validate(broken.structured_content).render_error
    assert Critique.model_validate(out["by_image"].structured_content).judgement is not None
    r = out["render"]
    image = next(p for p in r.content if p.type == "image")
    png = base64.b64decode(image.data)
    assert image.mime_type == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.structured_content["bytes"] == len(png) and not r.is_error
    # A root the client declared is readable too.
    assert Judgement.model_validate(out["declared"].structured_content).task == "chart"
    for key, words in (("outside", "outside the roots"), ("symlink", "outside the roots"),
                       ("bad_image", "not-an-image.png")):  # fmt: skip
        res = out[key]
        assert res.is_error and words in res.content[0].text, (key, res.content)
        assert len(res.content[0].text.splitlines()) == 1
    assert [code for code, _ in out["rpc_errors"]] == [-32602] * 4, out["rpc_errors"]


def _send(proc, msg: dict) -> None:
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    proc.stdin.flush()


def _receive(proc, want_id: int, seen: list[dict], timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line, "the server closed stdout"
        msg = json.loads(line)  # every line on stdout is a JSON-RPC message
        assert msg.get("jsonrpc") == "2.0", msg
        seen.append(msg)
        if msg.get("id") == want_id:
            return msg
    raise AssertionError(f"no answer to {want_id}")


def test_a_bare_json_rpc_client(tiny_gguf, workdir):
    """A client written from the specification, nothing else: newline-delimited JSON-RPC
    on the server's stdin and stdout, protocol 2025-06-18."""
    root = workdir[0]
    proc = subprocess.Popen(_command(tiny_gguf, root), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root)  # fmt: skip
    seen: list[dict] = []
    try:
        _send(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "bare", "version": "0"}}})  # fmt: skip
        init = _receive(proc, 1, seen)
        assert init["result"]["serverInfo"]["name"] == "verm-local"
        assert "tools" in init["result"]["capabilities"]
        _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _send(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        names = {t["name"] for t in _receive(proc, 2, seen)["result"]["tools"]}
        assert names == {"judge", "critique", "render"}
        calls = [
            ("judge", {"gt": "gt.png", "pred": "pred.png", "task": "chart"}),
            ("critique", {"gt": str(root / "gt.png"), "code": GOOD, "task": "chart"}),
            ("render", {"code": GOOD, "task": "chart"}),
        ]
        for i, (name, args) in enumerate(calls, start=3):
            _send(proc, {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                         "params": {"name": name, "arguments": args,
                                    "_meta": {"progressToken": f"p{i}"}}})  # fmt: skip
            res = _receive(proc, i, seen)["result"]
            assert res["content"], res
            if name == "render":
                assert res["content"][0]["type"] == "image" and not res.get("isError")
            else:
                assert "reward" in res["structuredContent"], res
        _send(proc, {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "nope"}})
        assert _receive(proc, 9, seen)["error"]["code"] == -32602
        progress = [m for m in seen if m.get("method") == "notifications/progress"]
        assert all(m["params"]["progressToken"] == "p3" for m in progress)
    finally:
        proc.stdin.close()  # the server exits when stdin closes
        code = proc.wait(60)
    assert code == 0, proc.stderr.read().decode()[-2000:]
