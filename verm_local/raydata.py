"""Batch judging on Ray Data: `judge --pairs FILE --ray [ADDR]` and `bench predict --ray`.

The pairs (sorted by ground truth, so a batch holds whole groups) go through
`map_batches` with an actor pool of judges: each actor loads the model once and judges
its batches with `Judge.judge_many` (a shared ground truth evaluated once, answers
decoded together), exactly as the local run does, so greedy judgements equal the local
run's. Results stream back as batches finish and the caller writes them as it goes (the
same JSONL as the local run, resumable). Without an address a local Ray instance starts
(`ray.init()`); with one, the pool runs on that cluster."""

from __future__ import annotations

import logging
from typing import Any, Iterator

from .errors import VermError

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise VermError(
            "--ray needs Ray: pip install 'ray[serve,data]' (scripts/install.sh installs it)"
        ) from None
    return ray


class JudgeActor:
    """One judge per actor: the model loaded once, batches judged as the local run does."""

    def __init__(self, judge_options: dict[str, Any], call_options: dict[str, Any]) -> None:
        from .judge import Judge

        self.judge = Judge(**judge_options)
        self.call = call_options

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import json

        from .tasks import decoding, profile

        pairs = [
            (str(g), str(p), str(t)) for g, p, t in zip(batch["gt"], batch["pred"], batch["task"])
        ]
        mode = self.call.get("sampling_mode", "default")
        overrides = self.call.get("overrides") or {}
        results = self.judge.judge_many(
            pairs,
            free=self.call.get("free", False),
            max_errors=self.call.get("max_errors"),
            unreadable=self.call.get("unreadable", "raise"),
            sampling=lambda prof: decoding(profile(prof), mode, self.call.get("max_tokens")).with_(
                **overrides
            ),
        )
        out = [
            json.dumps({"error": str(r)}) if isinstance(r, Exception) else r.model_dump_json()
            for r in results
        ]
        return {"pos": batch["pos"], "result": out}


def ray_stream(
    judge_options: dict[str, Any],
    call_options: dict[str, Any],
    *,
    address: str | None = None,
    actors: int = 1,
    batch_size: int = 8,
    cpus_per_actor: float = 1.0,
) -> Any:
    """A stream for `pairs.judge_file` (and `bench predict`): the pairs on Ray Data's
    actor pool, results yielded as lists of (position, Judgement or VermError)."""

    def stream(todo: list[dict[str, Any]]) -> Iterator[list[tuple[int, Any]]]:
        import json

        from .schema import Judgement

        ray = _ray()
        if not ray.is_initialized():
            ray.init(
                address=None if address in (None, "local") else address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [
            {"pos": i, "gt": str(p["gt"]), "pred": str(p["pred"]), "task": p["task"].name}
            for i, p in enumerate(todo)
        ]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
        judged = ds.map_batches(
            JudgeActor,
            fn_constructor_kwargs={"judge_options": judge_options, "call_options": call_options},
            batch_size=batch_size,
            concurrency=actors,
            num_cpus=cpus_per_actor,
            batch_format="numpy",
        )
        for batch in judged.iter_batches(batch_size=None, batch_format="numpy"):
            got = []
            for pos, raw in zip(batch["pos"], batch["result"]):
                data = json.loads(raw)
                if "error" in data and "task" not in data:
                    got.append((int(pos), VermError(data["error"])))
                else:
                    got.append((int(pos), Judgement.model_validate(data)))
            yield got

    return stream
