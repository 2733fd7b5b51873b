"""Native crashes end as one line, never as a silent exit 139.

llama.cpp, ONNX Runtime and torch can kill a process with SIGSEGV, SIGABRT, SIGILL or
SIGBUS (an AMX kernel, a wheel built for another CPU, a failed GGML_ASSERT). Work that
can crash runs where the crash can be seen:

- the CLI runs each command in a forked child (`supervise`); the parent waits, and when
  the child dies by a signal it prints one line (what was running, the signal, what to
  try, where the native stack is) and exits with `ExitCode.NATIVE_CRASH`;
- worker processes (serve's model worker, bench's measurements) record to their own log
  and their parent reports the death the same way (`crash_report`).

The log (under the cache, `crash/`) holds the command, the machine's CPU and the repack
decision, the stages the work went through (`events.stage`), and the stack of every
thread as `faulthandler` writes it at the crash. It is removed when the work ends
normally."""

from __future__ import annotations

import faulthandler
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from . import events
from .errors import ExitCode

NATIVE_PREFIX = "native: "  # a line of llama.cpp's own log
STATE_PREFIX = "state: "  # what was in use (repacked weights)
ABORT_PREFIX = "native abort: "  # the message llama.cpp (ggml) aborted with
SIGNALS = {
    getattr(signal, n): n
    for n in ("SIGSEGV", "SIGABRT", "SIGILL", "SIGBUS", "SIGFPE", "SIGKILL")
    if hasattr(signal, n)
}
STEP_PREFIX = "step: "
REPACK_ADVICE = "try --no-repack (or VERM_LOCAL_REPACK=off) and see `verm-local doctor`"
ADVICE = "try a smaller model or fewer threads, and see `verm-local doctor`"
ASSERT_ADVICE = (
    "llama.cpp cannot run this model or request as it is (a failed assertion: a model "
    "shape it does not support, or a bug); check the model with `verm-local convert gguf "
    "--check`, and report it with the log"
)
ILLEGAL_ADVICE = (
    "the native library uses an instruction this CPU lacks (a wheel built on another "
    "machine: reinstall with scripts/install.sh)"
)

# The crash log of this process while a Recorder writes it (native lines go there).
_active: dict[str, Any] = {"recorder": None}


def native_line(text: str, prefix: str = NATIVE_PREFIX) -> bool:
    """A line of the native library's own output (its log, an abort message), kept in
    the crash log as it happens: a crash leaves no chance to write it later. False when
    no crash log is being written."""
    rec = _active["recorder"]
    if rec is None or rec.file is None:
        return False
    try:
        rec.file.write(f"{prefix}{text}\n")
        rec.file.flush()
    except (OSError, ValueError):
        return False
    return True


def crash_dir() -> Path:
    from .paths import cache_dir

    return cache_dir() / "crash"


def new_log_path(what: str) -> Path:
    d = crash_dir()
    d.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() else "-" for c in what)[:32]
    return d / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{os.getpid()}.log"


# The signals a native crash ends with.
FATAL_SIGNALS = tuple(
    getattr(signal, n)
    for n in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT")
    if hasattr(signal, n)
)


def reclaim_fatal_signals() -> None:
    """Take the crash signals back from libraries that install their own handler when they
    load (tvm_ffi, which xgrammar loads, prints a 100-line backtrace on stderr at a
    segfault): the default action again, behind the recorder's faulthandler when one is
    active, so a crash stays one line on the terminal and its stack goes to the log."""
    rec = _active.get("recorder")
    faulthandler.disable()
    for sig in FATAL_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # not settable here (a thread, a platform)
            pass
    if rec is not None and rec.file is not None:
        faulthandler.enable(file=rec.file, all_threads=True)


class Recorder:
    """Writes a crash log: a header now, a line per stage, faulthandler's stacks at a
    crash. `close(keep=False)` removes it."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.file: TextIO | None = open(path, "w", encoding="utf-8")  # noqa: SIM115
        self.file.write(_header(what))
        self.file.flush()
        _active["recorder"] = self
        reclaim_fatal_signals()  # enables faulthandler on this log
        self._injected = False
        events.add_listener(self._step)

    def _step(self, name: str, detail: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(f"{STEP_PREFIX}{events.describe(name, detail)}\n")
        self.file.flush()
        self._inject()

    def _inject(self) -> None:
        """Testing: raise the signal VERM_LOCAL_CRASH_TEST names at the first stage."""
        from .settings import settings

        name = settings().crash_test
        if name and not self._injected:
            self._injected = True
            sig = getattr(signal, "SIG" + name.upper().removeprefix("SIG"), None)
            if sig is not None:
                os.kill(os.getpid(), sig)

    def close(self, keep: bool = False) -> None:
        events.remove_listener(self._step)
        if _active["recorder"] is self:
            _active["recorder"] = None
        if self.file is not None:
            faulthandler.disable()
            self.file.close()
            self.file = None
        if not keep:
            self.path.unlink(missing_ok=True)


def _header(what: str) -> str:
    from .hardware import probe_cpu

    try:
        model, flags, _ = probe_cpu()
    except Exception:  # noqa: BLE001 - a header never stops the work
        model, flags = "?", ()
    return (
        f"verm-local crash log: {what}\n"
        f"command: {' '.join(sys.argv)}\n"
        f"python {platform.python_version()} on {platform.platform()}\n"
        f"cpu: {model}; flags: {' '.join(flags)}\n"
    )


def note_state(name: str, value: str) -> None:
    """Something in use from now on that the advice after a crash depends on (`repack`:
    `on` while repacked weights are loaded)."""
    native_line(f"{name}={value}", STATE_PREFIX)


def _lines(path: Path | None, prefix: str) -> list[str]:
    if path is None or not path.is_file():
        return []
    return [
        ln[len(prefix) :].strip()
        for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if ln.startswith(prefix)
    ]


def last_step(path: Path | None) -> str:
    """The last stage a crash log recorded ('' when none)."""
    steps = _lines(path, STEP_PREFIX)
    return steps[-1] if steps else ""


def native_message(path: Path | None) -> str:
    """What the native library said as it died: its abort message (a GGML_ASSERT), else
    its last error line ('' when none)."""
    aborts = _lines(path, ABORT_PREFIX)
    if aborts:
        return aborts[-1]
    errors = [
        ln
        for ln in _lines(path, NATIVE_PREFIX)
        if any(w in ln.lower() for w in ("error", "failed", "assert", "exception", "what():"))
    ]
    return errors[-1] if errors else ""


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def crash_report(what: str, sig: int, log: Path | None) -> str:
    """The one line for a process `what` that died by signal `sig`."""
    step = last_step(log)
    during = f" during {step}" if step else ""
    if sig == getattr(signal, "SIGKILL", -1):
        cause = "was killed (SIGKILL; most likely out of memory)"
    elif sig not in SIGNALS:  # SIGTERM, SIGINT, SIGHUP: stopped from outside, no crash
        return f"{what} was stopped by {signal_name(sig)}{during}"
    else:
        cause = f"crashed in native code ({signal_name(sig)})"
    said = native_message(log)
    repack = [s for s in _lines(log, STATE_PREFIX) if s.startswith("repack=")]
    repacked = bool(repack) and repack[-1] == "repack=on"
    where = f"; native stack: {log}" if log is not None and log.is_file() else ""
    quoted = f": {said}" if said else ""
    return f"{what} {cause}{during}{quoted}; {advice(sig, repacked, said)}{where}"


def advice(sig: int, repacked: bool, said: str) -> str:
    """What to try, from the cause: a failed assertion is the model or the request; an
    illegal instruction the wheel; repacking is advised against only where repacked
    weights were in use."""
    if "GGML_ASSERT" in said or "assert" in said.lower():
        return ASSERT_ADVICE
    if sig == getattr(signal, "SIGILL", -1):
        return (REPACK_ADVICE + "; or " + ILLEGAL_ADVICE) if repacked else ILLEGAL_ADVICE
    if repacked:
        return REPACK_ADVICE + "; or " + ADVICE.removeprefix("try ")
    return ADVICE


def supervise(run: Callable[[], int], what: str) -> int:
    """Run `run()` in a forked child and return its exit code; a child killed by a signal
    becomes one line on stderr and `ExitCode.NATIVE_CRASH`. Without fork (Windows), run in
    this process with faulthandler writing to the log."""
    log = new_log_path(what.split()[0] if what else "run")
    if not hasattr(os, "fork"):
        rec = Recorder(log, what)
        try:
            return run()
        finally:
            rec.close()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child does the work
        rec = Recorder(log, what)
        code = 1
        try:
            code = run()
        finally:
            rec.close()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return _wait(pid, what, log)


def _wait(pid: int, what: str, log: Path) -> int:
    def forward(sig: int, _frame: Any) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # Ctrl-C reaches the child from the terminal itself; SIGTERM is passed on.
    previous = {
        s: signal.signal(s, h)
        for s, h in ((signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, forward))
    }
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                return int(ExitCode.INTERNAL)
            except InterruptedError:
                continue
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGINT, signal.SIGTERM):
            log.unlink(missing_ok=True)
            return 128 + sig
        print(f"verm-local: error: {crash_report(what, sig, log)}", file=sys.stderr, flush=True)
        return int(ExitCode.NATIVE_CRASH)
    log.unlink(missing_ok=True)
    return os.WEXITSTATUS(status)
