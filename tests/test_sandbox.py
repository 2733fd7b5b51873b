"""Model-written code renders only in the sandbox: each escape tried from inside fails
cleanly (one RenderError line) and leaves no trace, at the bubblewrap level and at the
fallback (Landlock, seccomp, resource limits); a plain chart still renders; `render`,
`doctor` and the server's critique use it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from verm_local import sandbox
from verm_local.errors import RenderError, SandboxError
from verm_local.render import render_code, run_renderer

from .conftest import run_here

CHART = "import matplotlib.pyplot as plt\nplt.bar([1, 2, 3], [3, 1, 2])\nplt.title('ok')\n"


@pytest.fixture(params=["bwrap", "limited"])
def level(request, monkeypatch):
    """Each test at both levels: bubblewrap where this machine has it, and the fallback
    forced (VERM_LOCAL_SANDBOX=limited)."""
    monkeypatch.setenv("VERM_LOCAL_SANDBOX", request.param)
    sandbox._cache.clear()
    try:
        got = sandbox.level()
    except SandboxError as exc:
        pytest.skip(f"no bubblewrap here: {exc}")  # CI installs it (scripts/install.sh)
    assert got.name == request.param
    yield got
    sandbox._cache.clear()


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join(2)
    srv.close()


def _escape(code: str, timeout: float = 20) -> str:
    with pytest.raises(RenderError) as exc:
        run_renderer("python", code + CHART, timeout=timeout)
    message = str(exc.value)
    assert "\n" not in message.strip()  # one line
    return message


def _sleepers() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "verm-escape" in ln and "ps -eo" not in ln]


def test_a_plain_chart_renders(level):
    png = run_renderer("python", CHART)
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_the_users_files_are_not_readable(level, tmp_path):
    home = Path(os.path.expanduser("~"))
    secret = home / f".verm-escape-secret-{os.getpid()}"
    secret.write_text("do not read me")
    try:
        message = _escape(f"print(open({str(secret)!r}).read())\n")
        assert "do not read me" not in message
        assert "PermissionError" in message or "FileNotFoundError" in message
    finally:
        secret.unlink()


def test_nothing_is_written_outside_the_sandbox(level, tmp_path):
    target = tmp_path / "written.txt"
    _escape(f"open({str(target)!r}, 'w').write('x')\n")
    assert not target.exists()


def test_the_network_is_closed(level, listener):
    port, hits = listener
    message = _escape(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 3)\n")
    assert "Permission denied" in message or "unreachable" in message.lower()
    time.sleep(0.5)
    assert hits == []


def test_memory_is_bounded(level):
    assert "MemoryError" in _escape("x = bytearray(12 * 2**30)\n")


def test_processes_are_bounded_and_none_survive(level):
    code = (
        "import subprocess\n"
        "ps = [subprocess.Popen(['sleep', '60', 'verm-escape']) for _ in range(400)]\n"
    )
    _escape(code)
    assert _sleepers() == []


def test_a_loop_forever_ends_at_the_timeout_with_its_tree(level):
    t = time.monotonic()
    message = _escape("import threading\nwhile True:\n    pass\n", timeout=2)
    assert "timed out after 2 s" in message and time.monotonic() - t < 20
    assert _sleepers() == []


def test_no_sandbox_refuses_unless_asked(monkeypatch):
    monkeypatch.setenv("VERM_LOCAL_SANDBOX", "none")
    sandbox._cache.clear()
    try:
        with pytest.raises(SandboxError, match="--unsafe-render"):
            run_renderer("python", CHART)
        assert run_renderer("python", CHART, unsafe=True).startswith(b"\x89PNG")
        monkeypatch.setenv("VERM_LOCAL_UNSAFE_RENDER", "1")
        assert run_renderer("python", CHART).startswith(b"\x89PNG")
    finally:
        sandbox._cache.clear()


def test_a_table_renders_in_the_browser_inside_the_sandbox(level):
    from verm_local.render import browser

    try:
        browser()
    except Exception:  # noqa: BLE001
        pytest.skip("no Chromium here (scripts/install.sh installs it)")
    png = render_code(
        "<table><tr><th>Name</th><th>Value</th></tr><tr><td>a</td><td>1</td></tr></table>", "table"
    )
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        w, h = im.size
        assert 80 < w < 400 and 40 < h < 200  # cropped to the table, 12 px around it
    # A page that tries the network gets nothing: no connection reaches the host.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(1)
        port = srv.getsockname()[1]
        html = f"<table><tr><td><img src='http://127.0.0.1:{port}/x.png'>x</td></tr></table>"
        render_code(html, "table")
        with pytest.raises(OSError):
            srv.accept()


def test_render_cli_and_doctor(tmp_path):
    code = tmp_path / "chart.py"
    code.write_text(CHART)
    out = tmp_path / "chart.png"
    proc = run_here("render", code, "--task", "chart", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit('no chart today')\n")
    proc = run_here("render", bad, "--task", "chart", "--out", tmp_path / "bad.png")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no chart today" in lines[0], proc.stderr
    assert not (tmp_path / "bad.png").exists()
    svg = tmp_path / "icon.svg"
    svg.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20">'
        '<circle cx="10" cy="10" r="8"/></svg>'
    )
    proc = run_here(
        "render", "-", "--task", "svg", "--out", tmp_path / "icon.png", input_text=svg.read_text()
    )
    assert proc.returncode == 0, proc.stderr
    doctor = json.loads(run_here("doctor", "--json").stdout)
    assert doctor["sandbox"]["name"] in sandbox.LEVELS and doctor["sandbox"]["reason"]
