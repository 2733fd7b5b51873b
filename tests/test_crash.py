"""A native crash never ends a command silently: it becomes one line (what ran, the signal,
what to try, where the stack is) and ExitCode.NATIVE_CRASH, and the server logs a crashed
worker the same way."""

from __future__ import annotations

import json
import os
import signal

import pytest

from verm_local import events
from verm_local.crash import Recorder, crash_report, last_step, note_state, supervise
from verm_local.errors import ExitCode

from .conftest import run_cli


def _die(sig: int, repack: str = "on"):
    def run() -> int:
        note_state("repack", repack)  # as native.Model notes it when weights load
        events.stage("decode", model="model-Q8_0.gguf", quant="Q8_0")
        os.kill(os.getpid(), sig)
        return 0

    return run


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT, signal.SIGILL, signal.SIGBUS])
def test_a_child_killed_by_a_signal_becomes_one_line(sig, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("VERM_LOCAL_CACHE", str(tmp_path))
    code = supervise(_die(sig), "verm-local judge")
    assert code == ExitCode.NATIVE_CRASH == 10
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    name = signal.Signals(sig).name
    assert line.startswith("verm-local: error: verm-local judge crashed in native code")
    assert name in line and "during decode (model-Q8_0.gguf, Q8_0)" in line, line
    assert "--no-repack" in line and "verm-local doctor" in line
    log = tmp_path / "crash" / line.rsplit("native stack: ", 1)[1]
    log = next((tmp_path / "crash").glob("*.log"))
    text = log.read_text()
    assert "step: decode" in text and "Fatal Python error" in text  # faulthandler's stack


def test_a_library_crash_handler_does_not_reach_the_terminal(tmp_path, monkeypatch, capfd):
    """xgrammar loads tvm_ffi, which takes SIGSEGV to print a 100-line backtrace on stderr;
    a process that imported it before (a test worker, an API user) still gets one line."""
    pytest.importorskip("xgrammar")
    import xgrammar  # noqa: F401

    monkeypatch.setenv("VERM_LOCAL_CACHE", str(tmp_path))
    assert supervise(_die(signal.SIGSEGV), "verm-local judge") == 10
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crashed in native code" in err[0], err[:3]


def test_the_advice_follows_the_cause(tmp_path, monkeypatch, capfd):
    """The repack advice only where repacked weights were in use; an illegal instruction
    points at the wheel."""
    monkeypatch.setenv("VERM_LOCAL_CACHE", str(tmp_path))
    assert supervise(_die(signal.SIGSEGV, repack="off"), "verm-local judge") == 10
    line = capfd.readouterr().err.strip()
    assert "--no-repack" not in line and "fewer threads" in line, line
    assert supervise(_die(signal.SIGILL, repack="off"), "verm-local judge") == 10
    line = capfd.readouterr().err.strip()
    assert "--no-repack" not in line and "instruction this CPU lacks" in line, line


def test_a_ggml_assert_is_quoted_in_the_line_and_kept_in_the_log(tmp_path, monkeypatch, capfd):
    """llama.cpp's own abort (ggml_abort, what a failed GGML_ASSERT calls) in a supervised
    command: the line quotes the assertion and gives the advice for a failed assertion,
    not the repack one; the log keeps llama.cpp's last lines and the message."""
    import ctypes
    from pathlib import Path

    monkeypatch.setenv("VERM_LOCAL_CACHE", str(tmp_path))

    def run() -> int:
        from verm_local.backends import native

        lc, _ = native.init()
        note_state("repack", "off")
        events.stage("prefill", tokens=266)
        lib = ctypes.CDLL(str(Path(lc.__file__).parent / "lib" / "libggml-base.so"))
        lib.ggml_abort(b"ggml.c", 2072, b"GGML_ASSERT(%s) failed", b"ggml_can_repeat(b, a)")
        return 0

    assert supervise(run, "verm-local judge") == 10
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # the message is quoted, not printed a second time
    line = err[0]
    assert "crashed in native code (SIGABRT) during prefill (266 tokens)" in line, line
    assert ": ggml.c:2072: GGML_ASSERT(ggml_can_repeat(b, a)) failed;" in line
    assert "a failed assertion" in line and "--no-repack" not in line
    text = next((tmp_path / "crash").glob("*.log")).read_text()
    assert "native abort: ggml.c:2072: GGML_ASSERT(ggml_can_repeat(b, a)) failed" in text


def test_a_normal_exit_keeps_its_code_and_leaves_no_log(tmp_path, monkeypatch):
    monkeypatch.setenv("VERM_LOCAL_CACHE", str(tmp_path))
    assert supervise(lambda: 0, "verm-local judge") == 0
    assert supervise(lambda: 4, "verm-local judge") == 4
    assert list((tmp_path / "crash").glob("*.log")) == []


def test_crash_report_names_the_stage_and_the_log(tmp_path):
    log = tmp_path / "w.log"
    rec = Recorder(log, "serve model worker")
    events.stage("encode image", image="ground truth", done=1, total=2)
    rec.close(keep=True)
    assert last_step(log) == "encode image 1/2 (ground truth)"
    line = crash_report("the model worker", signal.SIGSEGV, log)
    assert "SIGSEGV" in line and "encode image" in line and str(log) in line
    assert "out of memory" in crash_report("the model worker", signal.SIGKILL, None)
    stopped = crash_report("the model worker", signal.SIGTERM, log)
    assert (
        stopped == "the model worker was stopped by SIGTERM during encode image 1/2 (ground truth)"
    )


@pytest.mark.slow
def test_judge_that_crashes_in_native_code_prints_one_line(tiny_gguf, pair, tmp_path):
    """A forced SIGSEGV at the first native stage of `verm-local judge` (loading the
    vocabulary, which one-shot judging does before the weights) ends as one line and exit
    code 10, with faulthandler's stack in the log."""
    env = {"VERM_LOCAL_CRASH_TEST": "SEGV", "VERM_LOCAL_CACHE": str(tmp_path)}
    proc = run_cli("judge", *pair, "--model", tiny_gguf, "--quant", "Q8_0", env=env)
    assert proc.returncode == 10, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    assert "verm-local judge crashed in native code (SIGSEGV)" in line
    assert "load vocabulary (model-Q8_0.gguf, Q8_0" in line
    # No weights were loaded yet (the vocabulary alone): the repack advice would mislead.
    assert "--no-repack" not in line and "verm-local doctor" in line
    log = line.rsplit("native stack: ", 1)[1]
    text = open(log).read()
    assert "Segmentation fault" in text and "step: load vocabulary" in text
    assert "cpu:" in text and "command:" in text
    proc = run_cli(
        "judge",
        *pair,
        "--model",
        tiny_gguf,
        "--quant",
        "Q8_0",
        "--json",
        env={"VERM_LOCAL_CACHE": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["quant"] == "Q8_0"


@pytest.mark.slow
def test_server_logs_a_crashed_worker_and_replaces_it(tiny_gguf, tmp_path, pair):
    from .test_serve import Served, _url

    gt, pred = pair
    s = Served(tiny_gguf, "--parallel", "1", env={"VERM_LOCAL_CACHE": str(tmp_path)})
    body = json.dumps({"gt": _url(gt), "pred": _url(pred), "max_errors": 2}).encode()
    try:
        code, res = s.kill_worker_during(body, signal.SIGSEGV)
        assert code == 500 and "SIGSEGV" in res["error"]["message"]
        assert "native stack" in res["error"]["message"]
        assert s.metric('verm_worker_crashes_total{signal="SIGSEGV"}') == 1
        code, res = s.request("POST", "/v1/judge", body)
        assert code == 200, res
    finally:
        assert s.stop() == 0
    err = s.output()
    crash = [ln for ln in err.splitlines() if "SIGSEGV" in ln]
    assert len(crash) == 1 and "native stack:" in crash[0] and "restarting" in crash[0]
