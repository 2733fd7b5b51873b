"""Rendering code the way the authors' RL does, in the sandbox (`sandbox.py`: no network,
no user files, resource limits, a timeout): matplotlib for ```python chart code, cairosvg
at 336x336 on white for SVG. The reward client, `render`, `refine` and the server render
model-written code with it; the svg task renders SVG files given as images."""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
import sys
from pathlib import Path

from .errors import InputError, RenderError, VermError
from .pixels import all_white

RENDER_TIMEOUTS = {"python": 30.0, "svg": 15.0, "html": 60.0}
SVG_SIZE = 336

# Each renderer runs in the sandbox, reads its code from {input}/code and writes the PNG
# to stdout (nothing is read back from the sandbox's disk).
_RUNNERS = {
    "python": r"""
import io, sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
code = open(sys.argv[1], encoding="utf-8").read()
plt.savefig = lambda *a, **k: None  # the runner saves the figure itself
plt.show = lambda *a, **k: None
exec(compile(code, "prediction", "exec"), {"__name__": "__main__"})
import matplotlib.figure
buf = io.BytesIO()
matplotlib.figure.Figure.savefig(plt.gcf(), buf, format="png")
sys.stdout.buffer.write(buf.getvalue())
""",
    "svg": rf"""
import sys, cairosvg
sys.stdout.buffer.write(cairosvg.svg2png(bytestring=open(sys.argv[1], "rb").read(),
    output_width={SVG_SIZE}, output_height={SVG_SIZE}, background_color="white"))
""",
}


def run_renderer(
    lang: str, code: str | bytes, timeout: float | None = None, unsafe: bool | None = None
) -> bytes:
    """PNG bytes of `code` (`lang`: python or svg), rendered in the sandbox
    (`sandbox.run`); RenderError when it fails, hits a limit or times out, SandboxError
    where no sandbox is available and `unsafe` is not given."""
    from .sandbox import Limits, describe, run

    data = code if isinstance(code, bytes) else code.encode("utf-8")
    limits = Limits(timeout_s=timeout or RENDER_TIMEOUTS[lang])
    r = run(
        [sys.executable, "-I", "-c", _RUNNERS[lang], "{input}/code"],
        files={"code": data},
        limits=limits,
        env={"MPLBACKEND": "Agg", "MPLCONFIGDIR": "{home}/.matplotlib"},
        unsafe=unsafe,
    )
    if r.returncode != 0 or not r.stdout.startswith(b"\x89PNG"):
        raise RenderError(describe(r) if r.returncode != 0 else "no image written")
    return r.stdout


def is_svg(data: bytes) -> bool:
    """An SVG document (optionally behind an XML declaration, comments or a doctype)."""
    head = data[:4096].lstrip().lower()
    return head.startswith((b"<svg", b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in head


def svg_to_png(data: bytes, label: str) -> bytes:
    """An SVG file as the model saw SVG in training: cairosvg at 336x336 on white (the
    authors' renderer); InputError when cairosvg is missing or the SVG does not render."""
    if importlib.util.find_spec("cairosvg") is None:
        raise InputError(f"{label}: SVG input needs cairosvg (pip install cairosvg)")
    try:
        return run_renderer("svg", data)
    except RenderError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no image written"
        raise InputError(f"{label}: the SVG does not render ({last})") from None


# ---------------------------------------------------------------- responses and tables

_BLOCK = re.compile(r"```([a-zA-Z0-9_+-]+)\s*(.*?)\s*```", re.DOTALL)
_SVG = re.compile(r"<svg[^>]*>.*", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> tuple[str, str] | None:
    """(language, code) of a response, as the authors' RL reads it: the last ```python or
    ```svg block with code in it, else a bare <svg ...> to the end (an unclosed tag cut,
    </svg> added when missing); None when there is no code."""
    for m in reversed(list(_BLOCK.finditer(text or ""))):
        lang, code = m.group(1).strip().lower(), m.group(2).strip()
        if lang in ("python", "svg") and code:
            return lang, code
    m = _SVG.search(text or "")
    if m:
        svg = re.sub(r"<[^>]*$", "", m.group(0))
        if not svg.strip().endswith("</svg>"):
            svg += "</svg>"
        return "svg", svg
    return None


# The page a predicted table is rendered in, with the authors' styling
# (render_tools/chrome_render_table.py at d842bec): a white page with a 20 px margin,
# collapsed 1 px borders on cells and header cells, Arial 14 px, cells padded 6 x 10 px;
# a 3600 x 2400 window, then cropped to the content with 12 px of padding.
TABLE_PAGE = """<html>
<head>
<meta charset="utf-8">
<style>
body {{ background: white; margin: 20px; }}
table {{ border-collapse: collapse; font-family: Arial, sans-serif; font-size: 14px; }}
td, th {{ border: 1px solid #333; padding: 6px 10px; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
TABLE_WINDOW = (3600, 2400)
TABLE_CROP_PADDING = 12
# A browser starts dozens of threads and reserves address space it never touches: its
# own limits (the sandbox bounds private memory, not address space).
BROWSER_LIMITS = {"processes": 512, "memory_bytes": 4 << 30}


def browser() -> str:
    """The Chromium/Chrome that renders tables: VERM_LOCAL_BROWSER, else one on PATH."""
    from .settings import settings

    chosen = settings().browser
    if chosen:
        return chosen
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise VermError(
        "rendering a predicted table needs Chromium or Chrome (apt-get install "
        "chromium), or VERM_LOCAL_BROWSER=/path/to/chrome"
    )


def render_table(html: str, timeout: float | None = None, unsafe: bool | None = None) -> bytes:
    """A table's HTML as the authors render it: in the page above, in headless Chromium,
    in the sandbox (no network: the page cannot fetch anything), cropped to its content;
    PNG bytes. RenderError when the browser writes nothing or times out."""
    from dataclasses import replace

    from .pixels import crop_to_content, png_bytes
    from .sandbox import Limits, describe, run

    w, h = TABLE_WINDOW
    shot = "{home}/table.png"
    flags = [
        "--headless=new",
        "--no-sandbox",  # the verm-local sandbox is around it; its own needs namespaces
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-features=TranslateUI",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
        "--log-level=3",
        "--user-data-dir={home}/profile",
        f"--window-size={w},{h}",
        f"--screenshot={shot}",
    ]
    script = 'exe="$1"; shift; "$exe" "$@" >&2 && cat "$HOME/table.png"'
    limits = replace(Limits(timeout_s=timeout or RENDER_TIMEOUTS["html"]), **BROWSER_LIMITS)
    r = run(
        ["/bin/sh", "-c", script, "render", browser(), *flags, "file://{input}/table.html"],
        files={"table.html": TABLE_PAGE.format(body=html).encode("utf-8")},
        limits=limits,
        unsafe=unsafe,
        ro=[Path("/etc/chromium"), Path("/etc/chromium.d"), Path("/opt/google/chrome")],
    )
    if r.returncode != 0 or not r.stdout.startswith(b"\x89PNG"):
        raise RenderError(
            "the browser wrote no screenshot" + (f" ({describe(r)})" if r.returncode != 0 else "")
        )
    from PIL import Image

    with Image.open(io.BytesIO(r.stdout)) as im:
        return png_bytes(crop_to_content(im.convert("RGB"), TABLE_CROP_PADDING))


def render_code(
    code: str, task: str, timeout: float | None = None, unsafe: bool | None = None
) -> bytes:
    """Code for `task` rendered as the authors' pipeline renders it: chart (matplotlib
    Python), svg (cairosvg, 336x336 on white), table (HTML in Chromium). A fenced block
    in `code` (a model's whole response) is taken out first. RenderError when it does
    not render or comes out all white."""
    found = extract_code(code) if task != "table" else None
    lang = {"chart": "python", "svg": "svg"}.get(task)
    if task == "table":
        png = render_table(code, timeout, unsafe)
    else:
        if found is not None:
            lang, code = found
        png = run_renderer(lang or "python", code, timeout, unsafe)
    if all_white(png):
        raise RenderError("the render is all white")
    return png


def render_prediction(
    response: str, task: str, timeout: float | None = None, unsafe: bool | None = None
) -> bytes:
    """PNG bytes of a policy's response rendered as the authors' RL does for `task`: the
    last ```python / ```svg block (chart, svg), the response as HTML (table); RenderError
    when there is no code, the render fails or times out, or comes out all white."""
    if task != "table" and extract_code(response) is None:
        raise RenderError("no ```python or ```svg code in the response")
    return render_code(response, task, timeout, unsafe)
