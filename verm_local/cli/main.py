"""The entry point: logging set up for the terminal, user errors as one line and their
exit code, each command under the crash supervisor."""

from __future__ import annotations

import logging
import sys

import typer

from ..errors import ExitCode, VermError
from .app import app

# Commands that run their own processes and signal handling (uvicorn, model workers):
# not run under the crash supervisor.
UNSUPERVISED = {"serve"}


class _LineFormatter(logging.Formatter):
    """`verm-local: message` for information, `verm-local: warning: message` and up."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"verm-local: {record.levelname.lower()}: {msg}"
        return f"verm-local: {msg}"


def setup_logging(level: int | None = None) -> None:
    """The CLI alone decides what reaches the terminal: the `verm_local` logger's records
    as one line each on stderr (warnings and up by default, more with -v or for long
    work); llama.cpp's own log only with -vv or judge --verbose."""
    root = logging.getLogger("verm_local")
    if not any(isinstance(h.formatter, _LineFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LineFormatter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level or logging.WARNING)
    # llama.cpp's errors reach the user inside verm-local's one-line errors.
    logging.getLogger("verm_local.llama_cpp").setLevel(logging.CRITICAL)


def hoist_quiet(argv: list[str]) -> list[str]:
    """`-q`/`--quiet` belong to the app, but people type them after the verb too
    (`verm-local judge gt.png pred.png -q`); no verb has an option of that name, so move
    them in front of it. Arguments after `--` stay as they are."""
    end = argv.index("--") if "--" in argv else len(argv)
    quiet = [a for a in argv[:end] if a in ("-q", "--quiet")]
    rest = [a for a in argv[:end] if a not in ("-q", "--quiet")]
    return quiet + rest + argv[end:]


def run() -> int:
    """Run the app in this process; user errors become one line and their exit code."""
    from ..settings import settings

    setup_logging()
    try:
        app(args=hoist_quiet(sys.argv[1:]))
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except VermError as exc:
        typer.echo(f"verm-local: error: {exc}", err=True)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("verm-local: interrupted", err=True)
        return int(ExitCode.INTERRUPTED)
    except MemoryError:
        typer.echo(
            "verm-local: error: out of memory; try a smaller quant or --image-tokens", err=True
        )
        return int(ExitCode.MODEL)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        try:
            debug = settings().debug
        except VermError:
            debug = False
        if debug:
            raise
        typer.echo(
            f"verm-local: internal error: {exc.__class__.__name__}: {exc} "
            "(set VERM_LOCAL_DEBUG=1 for a traceback)",
            err=True,
        )
        return int(ExitCode.INTERNAL)
    return 0


def main() -> None:
    """Entry point. Each command runs in a supervised child, so a native crash (llama.cpp,
    ONNX Runtime, torch) ends as one line and `ExitCode.NATIVE_CRASH`, not a silent 139."""
    from ..crash import supervise

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    verb = " ".join(args[:2] if args[:1] in (["convert"], ["bench"]) else args[:1])
    if not args or args[0] in UNSUPERVISED:
        sys.exit(run())
    sys.exit(supervise(run, f"verm-local {verb}"))


if __name__ == "__main__":
    main()
