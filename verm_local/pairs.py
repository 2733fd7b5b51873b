"""A file of pairs (`judge --pairs`, `bench predict`): read and checked before any model
loads, judged grouped by ground truth (locally or on Ray Data), written as JSONL as it goes
and resumed where a stopped run left off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import InputError
from .images import check_image

if TYPE_CHECKING:
    from .judge import Judge


def pair_row(p: dict[str, Any], result: Any) -> dict[str, Any]:
    """One line of `judge --pairs` output: the pair's id and line, and its judgement (or
    the error)."""
    head = {"id": p["id"], "line": p["line"]}
    if isinstance(result, Exception):
        return {**head, "task": p["task"].name, "error": str(result)}
    return {**head, **result.model_dump(mode="json")}


PairStream = Callable[[list[dict[str, Any]]], Any]


def local_stream(j: "Judge", **kwargs: Any) -> PairStream:
    """Pairs judged by a loaded Judge, a chunk at a time (so the output is written as it
    goes): yields lists of (position, result)."""

    def stream(todo: list[dict[str, Any]]) -> Any:
        step = max(8, 4 * j.backend.parallel)
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            results = j.judge_many([(p["gt"], p["pred"], p["task"]) for p in part], **kwargs)
            yield [(start + k, r) for k, r in enumerate(results)]

    return stream


def _pair_key(row: dict[str, Any]) -> str:
    return json.dumps([row.get("id"), row.get("line")])


def judge_file(
    stream: PairStream,
    pairs: list[dict[str, Any]],
    out: Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, int, int]:
    """Judge every pair of `read_pairs` with `stream` (`local_stream`, or the Ray Data
    pool of `raydata.py`), grouped by ground truth; the JSONL of the results in the
    file's order, how many failed and how many came back incomplete. With `out`, the file
    is rewritten (atomically) after each chunk, and pairs it already holds are kept and
    not judged again: a stopped run resumes."""
    from .fileio import atomic_output

    rows: dict[str, dict[str, Any]] = {}
    if out is not None and out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "line" in row and "error" not in row:
                rows[_pair_key(row)] = row
    wanted = {_pair_key(p) for p in pairs}
    rows = {k: v for k, v in rows.items() if k in wanted}
    todo = sorted(
        (p for p in pairs if _pair_key(p) not in rows), key=lambda p: str(p["gt"])
    )  # grouped by ground truth: a group's shared prefix is evaluated once

    def text() -> str:
        return "".join(json.dumps(rows[k]) + "\n" for k in map(_pair_key, pairs) if k in rows)

    done = len(pairs) - len(todo)
    if progress is not None and done:
        progress(done, len(pairs))
    for batch in stream(todo) if todo else ():
        for pos, result in batch:
            rows[_pair_key(todo[pos])] = pair_row(todo[pos], result)
        done += len(batch)
        if out is not None:
            with atomic_output(out) as tmp:
                tmp.write_text(text(), encoding="utf-8")
        if progress is not None:
            progress(done, len(pairs))
    final = [rows[_pair_key(p)] for p in pairs]
    failed = sum("error" in r for r in final)
    incomplete = sum(not r.get("complete", True) for r in final if "error" not in r)
    if out is not None and not todo:
        with atomic_output(out) as tmp:
            tmp.write_text(text(), encoding="utf-8")
    return text(), failed, incomplete


def read_pairs(path: str | Path, default_task: str = "chart") -> list[dict[str, Any]]:
    """Pairs to judge from a file the one row reader reads (`rows.read_rows`: JSONL of
    {gt, pred, task, id}, VC-RewardBench's rows, or a JSON list of either). Every image
    is checked here with its task's preparation, so a bad row fails before any model
    loads, naming the row."""
    from .rows import read_rows

    out = []
    for row in read_rows(path, default_task):
        for p, prep in ((row.gt, row.task.gt), (row.pred, row.task.pred)):
            try:
                check_image(p, prep)
            except InputError as exc:
                raise InputError(f"{row.where}: {exc}") from None
        out.append(
            {"id": row.id, "line": row.number, "gt": row.gt, "pred": row.pred, "task": row.task}
        )
    return out
