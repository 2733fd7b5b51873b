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


def describe(name: str, detail: dict[str, Any]) -> str:
    """One readable line for a stage: 'decode (model-Q8_0.gguf, Q8_0, 12 tokens)'."""
    parts = [str(v) for k, v in detail.items() if v not in (None, "") and k != "total"]
    if "total" in detail and "done" in detail:
        parts = [p for p in parts if p != str(detail["done"])]
        parts.append(f"{detail['done']}/{detail['total']}")
    return f"{name} ({', '.join(parts)})" if parts else name
