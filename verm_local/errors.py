"""Errors a user can cause, and the table of exit codes the CLI returns.

The CLI prints each error as one line and exits with its code; the codes are documented
in the README and are the same for every command."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `verm-local` returns. Stable: scripts and CI act on these."""

    OK = 0
    REGRESSION = 1  # bench latency: a gated ratio is beyond the tolerance
    INPUT = 2  # bad input file or argument
    MODEL = 3  # model missing, corrupt, not Qwen3-VL; out of memory loading it
    ANSWER = 4  # the model's answer could not be read as a judgement
    PLAN = 5  # this machine cannot run the request
    FETCH = 6  # download or import failed
    INCOMPLETE = 7  # the answer ran into the token cap: reported, not scored as whole
    INCONCLUSIVE = 8  # bench latency: the noise is wider than the tolerance
    NATIVE_CRASH = 10  # llama.cpp / torch / ONNX Runtime killed the process (SIGSEGV ...)
    INTERNAL = 70  # a bug in verm-local (EX_SOFTWARE)
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.REGRESSION: "bench latency: a regression beyond the tolerance",
    ExitCode.INPUT: "bad input or argument",
    ExitCode.MODEL: "model problem (missing, corrupt, not Qwen3-VL, not in the store)",
    ExitCode.ANSWER: "the model's answer could not be read",
    ExitCode.PLAN: "this machine cannot run the request",
    ExitCode.FETCH: "download or import failure (hub, offline, integrity, disk space)",
    ExitCode.INCOMPLETE: "the answer was cut at the token cap (reported, not scored)",
    ExitCode.INCONCLUSIVE: "bench latency: inconclusive, noise wider than the tolerance",
    ExitCode.NATIVE_CRASH: "a native library crashed (see the crash log named on stderr)",
    ExitCode.INTERNAL: "internal error (a bug; VERM_LOCAL_DEBUG=1 shows the traceback)",
    ExitCode.INTERRUPTED: "interrupted",
}


class VermError(Exception):
    """A problem the user can fix; `exit_code` is what the CLI returns."""

    exit_code: int = 1


class InputError(VermError):
    """Bad input file or argument (missing, not an image, truncated, too large)."""

    exit_code = ExitCode.INPUT


class ModelError(VermError):
    """No usable model: missing, incomplete, corrupt, or not Qwen3-VL."""

    exit_code = ExitCode.MODEL


class AnswerError(VermError):
    """The model's answer could not be read as a judgement."""

    exit_code = ExitCode.ANSWER


class PlanError(VermError):
    """This machine cannot run what was asked (no such device, not enough memory)."""

    exit_code = ExitCode.PLAN


class FetchError(VermError):
    """A download or import failed: hub unreachable, offline, integrity check, disk full."""

    exit_code = ExitCode.FETCH


class TooLargeError(FetchError):
    """A download went over the size it was allowed."""


class EndpointError(FetchError):
    """Every reward endpoint a client tried failed."""


class RenderError(VermError):
    """Predicted code could not be rendered (no code, a failure, a timeout, a blank image)."""

    exit_code = ExitCode.INPUT


class SandboxError(VermError):
    """No sandbox for model-written code on this machine, and rendering without one was
    not asked for (--unsafe-render)."""

    exit_code = ExitCode.PLAN


class NativeCrash(VermError):
    """A native library killed a process that ran part of the work (a worker, a child)."""

    exit_code = ExitCode.NATIVE_CRASH


def first_line(exc: BaseException) -> str:
    """An exception's message as one line for an error message: its first line, or its type
    where it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
