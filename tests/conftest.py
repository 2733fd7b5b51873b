"""Shared fixtures: the tiny Qwen3-VL model is built once per test run, converted once to
F16, Q8_0 and Q4_K_M plus mmproj, and every end-to-end test drives it through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

CLI = Path(sys.executable).parent / "verm-local"

# The suite runs on pytest-xdist's workers (pyproject's addopts: `-n auto --dist loadfile`,
# a test file per worker at a time). The workers share this machine's CPUs: each one's
# llama.cpp, torch and ONNX Runtime get an equal share of threads (llama.cpp threads past
# the CPUs wait on one another: two 2-thread decodes on 2 CPUs ran 5.5x slower than one),
# set before any library reads it, so the programs the tests start inherit it too.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "VERM_LOCAL_THREADS" not in os.environ:
    from verm_local.hardware import default_threads as _threads

    _share = str(max(1, _threads() // _WORKERS))
    os.environ["VERM_LOCAL_THREADS"] = _share
    os.environ.setdefault("OMP_NUM_THREADS", _share)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per CPU this process may use, at most 4 (the slow tests are
    few and long; more workers would each build the session's models for nothing)."""
    from verm_local.hardware import probe_cpus_usable

    return max(1, min(4, probe_cpus_usable()))


# The order files are handed to the workers (pyproject: --no-loadscope-reorder keeps it).
# First the file that builds the tiny model, beside files that need no model (the other
# worker runs them meanwhile), then the file that converts it to GGUF; then the longest
# files first (each file's busy CPU-seconds, its subprocesses' included, measured with the
# suite in one process on the 2-core AMD machine), so the run does not end on a long file
# alone; then the rest. A file not named here goes in the middle.
_FIRST = [
    "test_tiny_model.py",
    "test_sandbox.py",
    "test_convert_gguf.py",
    "test_tasks.py",
    "test_images.py",
    "test_score.py",
    "test_net.py",
]
_SECONDS = {
    "test_determinism.py": 126,
    "test_ray.py": 125,
    "test_judge_e2e.py": 104,
    "test_transformers_gptq.py": 93,
    "test_bench.py": 86,
    "test_speculate.py": 77,
    "test_serve.py": 76,
    "test_pull.py": 75,
    "test_ci_gate.py": 61,
    "test_hub_gguf.py": 38,
    "test_fidelity.py": 32,
    "test_vision_onnx.py": 28,
    "test_refine.py": 20,
    "test_mcp_server.py": 16,
    "test_bench_serve.py": 14,
    "test_crash.py": 11,
    # Files of pure logic, a second or two: last, so that both workers finish together.
    "test_architecture.py": 2,
    "test_cli.py": 1,
    "test_hardware.py": 1,
    "test_select.py": 1,
    "test_modelref.py": 0,
    "test_reward_prompts.py": 0,
    "test_schema.py": 0,
}


def pytest_collection_modifyitems(session, config, items) -> None:
    def rank(item) -> tuple:
        name = Path(str(item.fspath)).name
        if name in _FIRST:
            return (0, _FIRST.index(name))
        return (1, -_SECONDS.get(name, 20))

    items.sort(key=rank)  # stable: a file's tests keep their order


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` once for the test run, whichever worker asks first; the others wait
    on a file lock and take the same folder (pytest-xdist's workers share the parent of
    their temporary roots). A build that failed is tried again by the next to ask."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "built-once" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.parent / f"{name}.done"
    with FileLock(str(out.parent / f"{name}.lock")):
        if not done.exists():
            if out.exists():
                import shutil

                shutil.rmtree(out)
            build(out)
            done.touch()
    return out


def serve_in_thread(server):
    """Serve a test HTTP server on a daemon thread. Its `shutdown()` returns within 50 ms:
    `serve_forever` looks for it every 0.5 s by default, and each test server's teardown
    waited that long."""
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server


def run_cli(
    *args: str, timeout: float = 600, env: dict | None = None, input_text: str | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `verm-local` console script in a subprocess (`input_text` on its
    stdin)."""
    cmd = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "verm_local.cli"]
    full_env = dict(os.environ)
    full_env.pop("VERM_LOCAL_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        cmd + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        input=input_text,
    )


def run_here(
    *args: object, env: dict | None = None, input_text: str | None = None
) -> subprocess.CompletedProcess:
    """`verm-local ARGS` in this process, as the console script runs it (`cli.main.run`:
    one-line errors, exit codes) but without an interpreter's start-up or the crash
    supervisor's fork: for commands whose subprocess adds nothing to what a test checks.
    stdout and stderr are caught at the file-descriptor level too (native libraries
    write there); `env` is set for the call (verm-local reads its settings, and the hub's
    HF_ENDPOINT and HF_HUB_OFFLINE, when called, not at import)."""
    import io
    import logging
    import tempfile

    from verm_local.cli.main import run

    argv = [str(a) for a in args]
    saved_env = dict(os.environ)
    os.environ.pop("VERM_LOCAL_DEBUG", None)
    os.environ.update(env or {})
    root = logging.getLogger("verm_local")
    native = logging.getLogger("verm_local.llama_cpp")
    saved_log = (root.handlers[:], root.propagate, root.level, native.level)
    saved_std = (sys.stdout, sys.stderr, sys.argv, sys.stdin)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        fds = (os.dup(1), os.dup(2))
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True)
        sys.argv = ["verm-local", *argv]
        sys.stdin = io.StringIO(input_text or "")
        try:
            code = run()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            for fd in fds:
                os.close(fd)
            sys.stdout, sys.stderr, sys.argv, sys.stdin = saved_std
            root.handlers[:], root.propagate = saved_log[0], saved_log[1]
            root.setLevel(saved_log[2])
            native.setLevel(saved_log[3])
            os.environ.clear()
            os.environ.update(saved_env)
        out.seek(0)
        err.seek(0)
        text_out = out.read().decode("utf-8", errors="replace")
        text_err = err.read().decode("utf-8", errors="replace")
    return subprocess.CompletedProcess(["verm-local", *argv], code, text_out, text_err)


def draw_chart(
    path: Path,
    values: list[int],
    colour: str = "steelblue",
    title: str = "Sales 2024",
    size: tuple[int, int] = (320, 256),
) -> Path:
    """A small bar chart; differing values/colours make a prediction with known errors."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for i, v in enumerate(values):
        d.rectangle([30 + i * 70, 230 - v * 30, 80 + i * 70, 230], fill=colour)
    d.line([20, 230, size[0] - 20, 230], fill="black")
    d.text((120, 10), title, fill="black")
    img.save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def no_prompt_mirror():
    """These machines reach no GitHub: `pull` would spend its backoff (about 2.4 s) on
    every fetch of the authors' prompt files. For the session, VERM_LOCAL_PROMPTS_URL
    points at a local server that answers 404 at once (not retried), so a pull warns
    and goes on as it does without a network. Tests of the prompt fetch set their own."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = serve_in_thread(ThreadingHTTPServer(("127.0.0.1", 0), NotFound))
    saved = os.environ.get("VERM_LOCAL_PROMPTS_URL")
    os.environ["VERM_LOCAL_PROMPTS_URL"] = f"http://127.0.0.1:{server.server_port}"
    yield
    server.shutdown()
    if saved is None:
        os.environ.pop("VERM_LOCAL_PROMPTS_URL", None)
    else:
        os.environ["VERM_LOCAL_PROMPTS_URL"] = saved


@pytest.fixture(scope="session")
def chart_group(tmp_path_factory) -> tuple[Path, list[Path]]:
    """One ground truth and 8 predictions of it (other values and colours): an RL step's
    rollouts against one reference, for the batching, drafting and serving tests."""
    root = tmp_path_factory.mktemp("group")
    gt = draw_chart(root / "gt.png", [3, 5, 2, 6])
    colours = ["orange", "steelblue", "green", "red"]
    preds = [
        draw_chart(root / f"p{i}.png", [3, 5 - i % 3, 2 + i % 2, 6], colour=colours[i % 4])
        for i in range(8)
    ]
    return gt, preds


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    gt = draw_chart(root / "gt.png", [3, 5, 2, 6])
    pred = draw_chart(root / "pred.png", [3, 4, 2, 6], colour="orange")
    return gt, pred


def _cli_ok(*args: object, in_process: bool = False) -> None:
    proc = run_here(*args) if in_process else run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return built_once(
        tmp_path_factory, "tiny", lambda out: _cli_ok("convert", "tiny-model", out, "--seed", "0")
    )


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf) -> Path:
    return built_once(
        tmp_path_factory,
        "tiny-gguf",
        lambda out: _cli_ok("convert", "gguf", tiny_hf, out, "--quant", "Q8_0,Q4_K_M"),
    )


def _gptq(tmp_path_factory, tiny_hf, bits: int) -> Path:
    """In this process: the GPTQ tests load GPTQModel and transformers here anyway (10 s
    of imports a process). The conversion must leave no scratch behind: GPTQModel's own
    offload folder in the temporary directory outlives a CLI run (its cleanup is an atexit
    hook, skipped by the supervisor's os._exit), so the converter gives it one of its own."""
    import tempfile

    def build(out: Path) -> None:
        scratch = Path(tempfile.gettempdir())
        before = set(scratch.glob("gptqmodel_*"))
        _cli_ok("convert", "gptq", tiny_hf, out, "--bits", bits, "--samples", "4", in_process=True)
        assert set(scratch.glob("gptqmodel_*")) == before
        assert not list(out.parent.glob(f".{out.name}.offload-*"))

    return built_once(tmp_path_factory, f"tiny-gptq{bits}", build)


@pytest.fixture(scope="session")
def tiny_gptq4(tmp_path_factory, tiny_hf) -> Path:
    return _gptq(tmp_path_factory, tiny_hf, 4)


@pytest.fixture(scope="session")
def tiny_gptq8(tmp_path_factory, tiny_hf) -> Path:
    return _gptq(tmp_path_factory, tiny_hf, 8)


# A judge's answer to force on every model when comparing distributions.
FORCED_ANSWER = (
    '{"structure_error_count": 0, "data_error_count": 1, "text_error_count": 0, '
    '"style_error_count": 1, "errors": [{"category": "data_error", "severity": 2, '
    '"location": "second bar", "description": "height 5 became 4"}, {"category": '
    '"style_error", "severity": 1, "location": "all bars", "description": "blue bars are '
    'orange"}]}'
)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_hf) -> Path:
    """The tiny model's vision tower in ONNX fp32 and int8, exported in this process: the
    ONNX tests load torch and the PyTorch tower here anyway (5 s of imports a process)."""

    def build(out: Path) -> None:
        for precision in ("fp32", "int8"):
            _cli_ok(
                "convert", "onnx", tiny_hf, out / precision, "--precision", precision,
                in_process=True,
            )  # fmt: skip

    return built_once(tmp_path_factory, "onnx", build)


@pytest.fixture(scope="session")
def tiny_mmproj_f32(tmp_path_factory, tiny_hf) -> Path:
    """The tiny model's vision projector in f32, from llama.cpp's converter as `convert
    gguf --mmproj-type f32` runs it (the text model is the session's: no second
    conversion of it)."""
    from verm_local.convert.gguf import _run_converter, mmproj_file_name
    from verm_local.fileio import atomic_output

    def build(out: Path) -> None:
        with atomic_output(out / mmproj_file_name("f32")) as tmp:
            _run_converter(tiny_hf, [(tmp, "f32", True)], verbose=False)

    return built_once(tmp_path_factory, "tiny-mmproj-f32", build) / mmproj_file_name("f32")


@pytest.fixture(scope="session")
def served(tiny_gguf):
    """One `verm-local serve --parallel 8` of the tiny Q8_0 model for the session (the
    serve, determinism and critique tests share it): API key "k", images up to 200 kB."""
    from .test_serve import Served

    s = Served(tiny_gguf, "--parallel", "8", "--api-key", "k", "--max-image-bytes", "200000")
    yield s
    assert s.stop() == 0
