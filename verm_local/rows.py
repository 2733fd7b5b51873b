"""Rows of image pairs to judge: the one reader of VC-RewardBench's layout and of
`judge --pairs` files, used by `judge --pairs`, the benchmarks and the calibration sets.

A row is a JSON object: `gt` / `gt_img_path`, `pred` / `pred_img_path` (relative paths are
taken from the file's directory), the task under `task` or `category`, and `id` and/or
`idx`; VC-RewardBench rows carry their labels as `human_errors`. A file holds one row per
line (JSONL: `VC-RewardBench.jsonl`, the hub dataset's annotations), or one JSON list of
rows (what the authors' evaluation reads). A category names its task as `chart`, `table`
or `svg`, or as a data source containing one of them (`chart2code`, `icon2svg`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constants import TASKS
from .errors import InputError
from .tasks import TaskProfile, profile

ROWS_FILE = "VC-RewardBench.jsonl"  # the hub dataset's annotations
HUB_DATASET = "internlm/VC-RewardBench"


def task_name(value: Any) -> str | None:
    """The task a category, task or data-source name means, or None: the name itself,
    else the one task it contains (chart2code -> chart, icon2svg -> svg, table_parse ->
    table)."""
    if not isinstance(value, str) or not value:
        return None
    if value in TASKS:
        return value
    low = value.lower()
    found = [t for t in ("table", "svg", "chart") if t in low]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Row:
    """One pair: the row as read, where it is, its task's profile and its images."""

    data: dict[str, Any]
    where: str  # FILE:LINE (JSONL) or FILE[INDEX] (a JSON list)
    number: int  # its line (JSONL) or 1 + its index (a JSON list)
    task: TaskProfile
    gt: Path
    pred: Path

    @property
    def id(self) -> Any:
        """The row's `id`, else its `idx`, else its line number."""
        for key in ("id", "idx"):
            if self.data.get(key) is not None:
                return self.data[key]
        return self.number

    @property
    def key(self) -> str:
        """What tells rows apart (id and idx as given), for resuming a run."""
        return json.dumps([self.data.get("id"), self.data.get("idx")])

    @property
    def human_errors(self) -> list[dict[str, Any]]:
        errors = self.data.get("human_errors") or []
        return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def find_rows(source: str | Path) -> Path:
    """The rows file of a source: a file; a directory holding VC-RewardBench.jsonl (or
    data.jsonl, or one .jsonl / .json file); or a hub dataset id (downloaded with
    huggingface_hub)."""
    path = Path(source)
    if not path.exists():
        text = str(source)
        if "/" in text and not text.startswith((".", "/", "~")):
            return find_rows(_hub_dataset(text))
        raise InputError(f"{source}: no such file or directory")
    if path.is_file():
        return path
    for name in (ROWS_FILE, "data.jsonl"):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.jsonl")) or sorted(path.glob("*.json"))
    if len(found) == 1:
        return found[0]
    raise InputError(
        f"{path}: no {ROWS_FILE} in it (VC-RewardBench's layout)"
        + (f"; several row files: {', '.join(p.name for p in found)}" if found else "")
    )


def _hub_dataset(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    from .settings import hub_endpoint

    try:
        return Path(snapshot_download(repo, repo_type="dataset", endpoint=hub_endpoint()))
    except Exception as exc:  # noqa: BLE001 - one line for any hub failure
        raise InputError(
            f"{repo}: not a local path, and the hub dataset could not be fetched "
            f"({exc.__class__.__name__})"
        ) from None


def load_rows(path: Path) -> list[tuple[str, int, Any]]:
    """(where, number, value) of every row of a JSONL file or a JSON list, as read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path}: not a JSON list of rows ({exc})") from None
        return [(f"{path}[{i}]", i + 1, v) for i, v in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", n, json.loads(line)))
        except ValueError:
            raise InputError(f"{path}:{n}: not a JSON object") from None
    return out


def read_rows(
    source: str | Path, default_task: str | None = None, limit: int | None = None
) -> list[Row]:
    """Every row of a source (`find_rows`), checked for shape: a JSON object naming two
    images and a task. A bad row is an InputError naming it; images are not opened."""
    path = find_rows(source)
    rows = []
    for where, number, data in load_rows(path):
        if not isinstance(data, dict):
            raise InputError(f"{where}: not a JSON object")
        gt = data.get("gt", data.get("gt_img_path"))
        pred = data.get("pred", data.get("pred_img_path"))
        if not isinstance(gt, str) or not isinstance(pred, str):
            raise InputError(f'{where}: needs "gt" and "pred" image paths (or gt_img_path, ...)')
        given = data.get("task", data.get("category", default_task))
        name = task_name(given)
        if name is None:
            raise InputError(
                f"{where}: task {given!r} is not one of {', '.join(TASKS)} (set task or category)"
            )
        rows.append(
            Row(data, where, number, profile(name), _resolve(path, gt), _resolve(path, pred))
        )
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise InputError(f"{path}: no rows in it")
    return rows


def _resolve(rows_file: Path, image: str) -> Path:
    p = Path(image).expanduser()
    return p if p.is_absolute() else rows_file.parent / p
