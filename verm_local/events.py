"""What long work is doing now. Library code announces stages ("load text model",
"encode image 1/2", "decode"); listeners turn them into a progress display (the CLI) or
into the steps of a crash log (`crash.py`). No listener: nothing happens."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []


def stage(name: str, **detail: Any) -> None:
    """Announce that `name` starts now (detail: model, quant, tokens done, ...)."""
    for fn in list(_listeners):
        fn(name, detail)


def add_listener(fn: Listener) -> None:
    _listeners.append(fn)


def remove_listener(fn: Listener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


@contextlib.contextmanager
def listening(fn: Listener) -> Iterator[None]:
    add_listener(fn)
    try:
        yield
    finally:
        remove_listener(fn)


_UNITS = {"tokens": "tokens", "sequences": "sequences"}


def describe(name: str, detail: dict[str, Any]) -> str:
    """One readable line for a stage: 'encode image 1/2 (prediction, 768 tokens)'."""
    head = name
    if "done" in detail and "total" in detail:
        head += f" {detail['done']}/{detail['total']}"
    parts = []
    for key, value in detail.items():
        if key in ("done", "total") or value in (None, ""):
            continue
        parts.append(f"{value} {_UNITS[key]}" if key in _UNITS else str(value))
    return f"{head} ({', '.join(parts)})" if parts else head
