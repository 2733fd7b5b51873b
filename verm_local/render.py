"""Rendering code the way the authors' RL does, each in a child process with a timeout:
matplotlib for ```python chart code, cairosvg at 336x336 on white for SVG. The reward
client renders policy responses with it; the svg task renders SVG files given as images."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import InputError, RenderError

RENDER_TIMEOUTS = {"python": 15.0, "svg": 10.0, "html": 60.0}
SVG_SIZE = 336

_RUNNERS = {
    "python": r"""
import sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
code = open(sys.argv[1], encoding="utf-8").read()
plt.savefig = lambda *a, **k: None  # the runner saves the figure itself
plt.show = lambda *a, **k: None
exec(compile(code, "prediction", "exec"), {"__name__": "__main__"})
import matplotlib.figure
matplotlib.figure.Figure.savefig(plt.gcf(), sys.argv[2], format="png")
""",
    "svg": rf"""
import sys, cairosvg
cairosvg.svg2png(bytestring=open(sys.argv[1], "rb").read(), write_to=sys.argv[2],
                 output_width={SVG_SIZE}, output_height={SVG_SIZE}, background_color="white")
""",
}


def run_renderer(lang: str, code: str | bytes, timeout: float | None = None) -> bytes:
    """PNG bytes of `code` (`lang`: python or svg); RenderError when it fails or times out."""
    from .settings import child_env

    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d, "prediction"), Path(d, "prediction.png")
        if isinstance(code, bytes):
            src.write_bytes(code)
        else:
            src.write_text(code, encoding="utf-8")
        timeout = timeout or RENDER_TIMEOUTS[lang]
        try:
            r = subprocess.run(
                [sys.executable, "-c", _RUNNERS[lang], str(src), str(out)],
                cwd=d,
                capture_output=True,
                timeout=timeout,
                env=child_env(MPLBACKEND="Agg", MPLCONFIGDIR=d),
            )
        except subprocess.TimeoutExpired:
            raise RenderError(f"render timed out after {timeout:g} s") from None
        if r.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
            raise RenderError(r.stderr.decode(errors="replace")[-300:] or "no image written")
        return out.read_bytes()


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
