"""The command line itself, in this process (`cli.main.run`, as the console script runs
it): how options parse in every documented position, before any work starts."""

from __future__ import annotations

import sys

import pytest


def run_here(*args: object) -> int:
    """`verm-local ARGS` in this process; its exit code (output: pytest's capfd)."""
    from verm_local.cli.main import run

    saved = sys.argv
    sys.argv = ["verm-local", *map(str, args)]
    try:
        return run()
    finally:
        sys.argv = saved


@pytest.mark.parametrize(
    "args",
    [
        ["judge", "--pairs", "{pairs}", "--out", "{out}", "--ray"],  # the flag last
        ["judge", "--pairs", "{pairs}", "--ray", "--out", "{out}"],  # before another option
        ["judge", "--ray", "--pairs", "{pairs}", "--out", "{out}", "--ray-actors", "2"],
        ["judge", "--pairs", "{pairs}", "--ray-address", "ray://head:10001", "--out", "{out}"],
        ["judge", "--pairs", "{pairs}", "--out", "{out}", "-q", "--ray"],
        ["bench", "predict", "{pairs}", "--out", "{out}", "--ray"],
        ["bench", "predict", "{pairs}", "--ray", "--out", "{out}"],
    ],
)
def test_every_documented_ray_form_parses(args, tmp_path, capfd):
    """`--ray` is a flag (a local Ray instance), `--ray-address ADDR` a cluster: in any
    position the command gets as far as its input (here a missing file: exit 2 naming it),
    never to "requires an argument" or an option taken for an image."""
    missing = tmp_path / "missing.jsonl"
    argv = [a.format(pairs=missing, out=tmp_path / "out.json") for a in args]
    code = run_here(*argv)
    err = capfd.readouterr().err
    assert code == 2, err
    assert "missing.jsonl" in err and "requires an argument" not in err
    assert "Traceback" not in err


def test_ray_goes_with_pairs(tmp_path, capfd):
    gt = tmp_path / "gt.png"
    assert run_here("judge", gt, gt, "--ray") == 2
    assert "--ray" in capfd.readouterr().err
