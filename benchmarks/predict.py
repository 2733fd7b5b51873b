"""`verm-local bench predict`: the judge over a dataset in VC-RewardBench's layout, written
as the authors' evaluation reads its input, so `bench score` (or their own evaluation)
scores it.

The output is a JSON list: every row as read, plus `pred_json` (the judge's answer in the
task's trained format; null when it could not be read, with `error_parse_failed_reason`),
the judgement's `reward`, `complete` and `timings`. Pairs are judged grouped by ground
truth (as `judge --pairs`: one evaluation of a shared ground truth), a chunk at a time;
after each chunk the file is written whole (atomically), so a run stopped half-way keeps
what it did and the same command resumes: rows already in the file are kept and skipped.
A row whose image is missing or unreadable is reported (id, path), counted and skipped,
or with `strict` stops the run before any model loads."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from verm_local.answer import trained_answer
from verm_local.errors import InputError
from verm_local.rows import Row, read_rows

log = logging.getLogger(__name__)


def _previous(out: Path) -> dict[str, dict[str, Any]]:
    """Rows an earlier run wrote to `out`, by key; {} when there is no file yet."""
    if not out.is_file():
        return {}
    try:
        data = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{out}: exists and is not a predictions file ({exc})") from None
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and "pred_json" in r for r in data
    ):
        raise InputError(f"{out}: exists and is not a predictions file of bench predict")
    return {json.dumps([r.get("id"), r.get("idx")]): r for r in data}


def check_rows(rows: list[Row], strict: bool) -> tuple[list[Row], list[dict[str, Any]]]:
    """(rows whose images can be judged, the others with their problem). With `strict`
    the first problem is an InputError."""
    from verm_local.images import check_image

    ok, skipped = [], []
    for row in rows:
        problem = None
        for path, prep in ((row.gt, row.task.gt), (row.pred, row.task.pred)):
            try:
                check_image(path, prep)
            except InputError as exc:
                problem = {"id": row.id, "path": str(path), "problem": str(exc)}
                break
        if problem is None:
            ok.append(row)
        elif strict:
            raise InputError(f"{row.where}: {problem['problem']} (without --strict: skipped)")
        else:
            skipped.append(problem)
    return ok, skipped


def predicted_row(row: Row, result: Any) -> dict[str, Any]:
    """The row as read with the judge's answer added, as the authors' evaluation reads it."""
    out = dict(row.data)
    if isinstance(result, Exception):
        out.update(pred_json=None, error_parse_failed_reason=str(result), reward=None)
        out.update(complete=False, timings=None)
        return out
    errors = [e.model_dump(exclude_none=True) for e in result.errors]
    out["pred_json"] = trained_answer(row.task, errors) if result.complete else None
    out["error_parse_failed_reason"] = None if result.complete else result.problem
    out["reward"] = result.reward
    out["complete"] = result.complete
    out["timings"] = result.timings.model_dump()
    return out


def predict(
    data: str | Path,
    out: Path,
    stream: Callable[[], Any],
    *,
    strict: bool = False,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Judge every row of `data` not yet in `out`, writing `out` as it goes; a summary of
    the run. `stream()` gives the judging stream (`pairs.local_stream` of a Judge, or
    `raydata.ray_stream`): it is only called when there is work, so a finished run loads
    no model."""
    from verm_local.fileio import write_json_atomic

    rows = read_rows(data, limit=limit)
    done = _previous(out)
    todo_all = [r for r in rows if r.key not in done]
    todo, skipped = check_rows(todo_all, strict)
    for s in skipped:
        log.warning("predict: row %s skipped: %s", s["id"], s["problem"])
    # Grouped by ground truth, so a chunk holds whole groups and each is evaluated once.
    todo.sort(key=lambda r: str(r.gt))
    written: dict[str, dict[str, Any]] = dict(done)

    def save() -> None:
        write_json_atomic(out, [written[r.key] for r in rows if r.key in written])

    if todo:
        t0 = time.perf_counter()
        pairs = [{"gt": r.gt, "pred": r.pred, "task": r.task} for r in todo]
        n = 0
        for batch in stream()(pairs):
            for pos, result in batch:
                written[todo[pos].key] = predicted_row(todo[pos], result)
            save()
            n += len(batch)
            log.info(
                "predict: %d/%d rows judged, %.2f rows/s",
                n,
                len(todo),
                n / (time.perf_counter() - t0),
            )
            if progress is not None:
                progress(n, len(todo))
    elif not out.is_file():
        save()
    new = [written[r.key] for r in todo]
    return {
        "rows": len(rows),
        "judged": len(todo),
        "resumed": len(done),
        "skipped": skipped,
        "unreadable": sum(1 for r in new if r.get("pred_json") is None),
        "out": str(out),
    }
