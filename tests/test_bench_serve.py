"""`verm-local bench serve`: verm-local's engine and llama.cpp's llama-server (built once
from the runtime's sdist, then cached) serve the same tiny model under the same load; the
report has both engines per workload and their ratio."""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.slow


def test_both_engines_serve_the_same_load(tiny_gguf, tmp_path):
    out = tmp_path / "serve.json"
    proc = run_cli(
        "bench",
        "serve",
        "-m",
        tiny_gguf / "model-Q8_0.gguf",
        "--clients",
        "2",
        "--requests",
        "4",
        "--answer-tokens",
        "16",
        "--parallel",
        "2",
        "--image-size",
        "256",
        "192",
        "--workloads",
        "shared,independent",
        "--out",
        out,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["workloads"]) == {"shared", "independent"}
    for w, r in report["workloads"].items():
        mine, theirs = r["verm-local"], r["llama-server"]
        assert mine["requests"] == theirs["requests"] == 4, (w, r)
        assert mine["failed"] == theirs["failed"] == 0, (w, r)
        # Answers forced to 16 tokens on both: equal decode work.
        assert mine["completion_tokens"] == theirs["completion_tokens"] == 4 * 16
        assert r["ratio"] == pytest.approx(mine["wall_s"] / theirs["wall_s"])
    assert "| shared |" in proc.stdout and "ratio" in proc.stdout
    assert report["settings"]["llama_server"].endswith("llama-server")
    assert out.with_suffix(".md").is_file()
