"""Task prompts, in this project's own words, and the override from a file so a user can
plug in the exact training prompt."""

from __future__ import annotations

import json
from pathlib import Path

from .constants import CATEGORIES, TASKS
from .errors import InputError

_SUBJECT = {
    "chart": (
        "a reviewer of chart renderings",
        "a reference chart",
        "a chart rendered from code that tried to reproduce it",
        {
            "structure_error": "chart type, axes, subplots, legend or layout differ",
            "data_error": "values, series, bars, points or their order differ",
            "text_error": "titles, labels, tick labels, legend or annotation text differ",
            "style_error": "colours, markers, line styles, fonts or sizes differ",
        },
    ),
    "table": (
        "a reviewer of table renderings",
        "a reference table",
        "a table rendered from markup that tried to reproduce it",
        {
            "layout_error": "rows, columns, merged cells, headers or alignment differ",
            "text_error": "words in cells or headers are wrong, missing or extra",
            "numeric_error": "numbers, units, signs or decimals differ",
        },
    ),
    "svg": (
        "a reviewer of vector graphics renderings",
        "a reference graphic",
        "a graphic rendered from SVG code that tried to reproduce it",
        {
            "structure_error": "elements are missing, extra, grouped or placed differently",
            "shape_error": "a shape's geometry, size, proportion or path differs",
            "style_error": "fills, strokes, colours, opacity or line widths differ",
            "text_symbol_error": "text, symbols, digits or icons differ",
        },
    ),
}

_RUBRIC = (
    "Severity: 1 = minor, barely affects reading; "
    "2 = medium, needs a manual correction; "
    "3 = severe, a structural or key-content error that misleads the reader."
)


def default_prompt(task: str) -> str:
    """The built-in prompt for a task."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    role, first, second, cats = _SUBJECT[task]
    cat_lines = "\n".join(f"- {c}: {d}" for c, d in cats.items())
    counts = ", ".join(f'"{c}_count": <int>' for c in CATEGORIES[task])
    return (
        f"You are {role}. Image 1 is {first} (the ground truth). "
        f"Image 2 is {second}.\n"
        "Find all visual discrepancies of image 2 relative to image 1. "
        "Report each one once, with the category it belongs to:\n"
        f"{cat_lines}\n"
        f"{_RUBRIC}\n"
        "Answer with JSON only, exactly in this form:\n"
        f'{{{counts}, "errors": [{{"category": "<category>", "severity": <1|2|3>, '
        '"location": "<where in image 2>", "description": "<what differs>"}]}\n'
        "If the images match, every count is 0 and errors is []."
    )


def load_prompt(task: str, prompt_file: str | Path | None = None) -> str:
    """The prompt for a task: from `prompt_file` when given (plain text, or a JSON object
    keyed by task), else the built-in one."""
    if prompt_file is None:
        return default_prompt(task)
    path = Path(prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read prompt file ({exc.__class__.__name__})") from None
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            table = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: prompt file looks like JSON but is not ({exc.msg})") from None
        if task not in table or not isinstance(table[task], str):
            raise InputError(f"{path}: no prompt for task {task!r} in the JSON object")
        stripped = table[task].strip()
    if not stripped:
        raise InputError(f"{path}: prompt file is empty")
    return stripped
