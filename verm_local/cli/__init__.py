"""`verm-local` command line, a package of one module per verb group (as huggingface_hub's
`cli/`): `app` holds the typer app and the options verbs share; `judge`, `critic` (render,
refine), `serve`, `mcp` (the critic's tools for agents), `store` (pull, models, rm),
`doctor` (and version), `bench`, `convert` declare their commands and
call the library, where the work lives (`bench latency` and its gate have a module of
their own, `latency`); `main` is the entry point. Only this package
writes to the terminal: results on stdout, one-line errors and progress on stderr."""

from __future__ import annotations

# isort: off
# Imported for their commands, in the order `verm-local --help` lists them.
from . import judge, critic, serve, mcp, store, doctor, bench, latency, convert  # noqa: F401

# isort: on
from .app import app
from .main import main, run

__all__ = ["app", "main", "run"]
