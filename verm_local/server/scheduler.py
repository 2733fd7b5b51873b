"""The model worker (its own process) and the scheduler that feeds it batches.

The worker holds the loaded model and runs lists of jobs as one batch (shared ground-truth
prefix, batched decoding: `backends/batch.py`). llama.cpp aborts the process on some
internal asserts and can crash in native code; in the worker that fails only the jobs in
flight: the scheduler logs the crash (signal, stage, crash log) and starts a fresh worker.

The scheduler takes jobs from a bounded queue (full: 429). A group of requests that
arrive together (one RL step's rollouts against one ground truth) forms one batch: after
the first job it keeps taking jobs while they keep coming (each within `batch_window` of
the last, up to `parallel` of them, at most ten windows in all)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..crash import crash_report, new_log_path
from ..errors import VermError
from .config import ServeConfig
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("verm_local.server")


# -- the model worker (its own process) -------------------------------------------------


def _worker_main(cfg: ServeConfig, conn: Any) -> None:
    """Load the model, then run batches of jobs sent over `conn` until told to stop."""
    import os

    from ..crash import Recorder

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent shuts us down
    recorder = Recorder(Path(cfg.crash_log), "serve model worker") if cfg.crash_log else None
    from ..judge import Judge

    try:
        judge = Judge(
            cfg.model,
            variant=cfg.variant,
            threads=cfg.threads,
            gpu_layers=cfg.gpu_layers,
            vision=cfg.vision,
            image_tokens=cfg.image_tokens,
            max_tokens=cfg.answer_cap,
            parallel=cfg.parallel,
            prefix_cache=cfg.prefix_cache,
            repack=cfg.repack,
            speculate=cfg.speculate,
            deterministic=cfg.deterministic,
            # No fixed context: each batch gets streams of what its requests need (prompts
            # and the answer reserve), grown when an answer needs more. A context fixed
            # at the full caps of every task (10,496 cells per stream) made --parallel 8
            # on the 8B model hold 18 GB of KV cache.
            n_ctx=None,
        )
    except VermError as exc:
        conn.send(("failed", str(exc)))
        if recorder:
            recorder.close()
        return
    conn.send(
        (
            "ready",
            {
                "model": judge.backend.info.model_dump(),
                "pid": os.getpid(),
                "parallel": judge.backend.parallel,
                "deterministic": judge.backend.deterministic.to_dict(),
            },
        )
    )
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            results = run_jobs(judge, cfg, msg)
            conn.send((results, judge.backend.stats()))
    finally:
        if recorder:
            recorder.close()


def run_jobs(judge: Any, cfg: ServeConfig, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run a batch of jobs on a loaded Judge; a result (or an error and status) per job.
    Judge jobs follow the judge's one retry policy (`judge.judge_requests`): a sampled
    answer that cannot be read, or was cut at the cap, is asked again with the next seed."""
    from ..backends.base import Request
    from ..decoding import Sampling
    from ..images import load_image
    from ..judge import build_request, judge_requests, judgement_of

    built: list[tuple[int, Any, Any]] = []  # (job index, Request, reader or None)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    for i, job in enumerate(jobs):
        try:
            sampling = Sampling(**job["sampling"])
            if job["kind"] == "judge":
                jr = build_request(
                    job["gt"],
                    job["pred"],
                    job["profile"],
                    sampling=sampling,
                    free=job["free"],
                    max_errors=job.get("max_errors"),
                    image_tokens=cfg.image_tokens,
                    warn=False,
                )
                built.append((i, jr.request, _reader(judge, jr, judgement_of)))
            else:
                images = [load_image(b, image_tokens=cfg.chat_image_tokens) for b in job["images"]]
                built.append((i, Request(images, job["messages"], sampling, job["grammar"]), None))
        except VermError as exc:
            results[i] = {"error": str(exc), "status": 400}

    def generate(requests: list[Any]) -> list[Any]:
        try:
            return judge.generate_all(requests)
        except Exception as exc:  # noqa: BLE001 - a bug fails this batch, not the worker
            return [VermError(f"internal error: {exc.__class__.__name__}: {exc}")] * len(requests)

    out = judge_requests(generate, [r for _, r, _ in built], [read for _, _, read in built])
    for (i, _, read), result in zip(built, out):
        if isinstance(result, Exception):
            results[i] = {"error": str(result), "status": 500}
        elif read is None:
            results[i] = {
                "text": result.text,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "deterministic": result.deterministic,
            }
        else:
            results[i] = {"judgement": result.model_dump(mode="json")}
    return [r or {"error": "no result", "status": 500} for r in results]


def _reader(judge: Any, jr: Any, judgement_of: Any) -> Any:
    """The Judgement of one of a judge job's answers: after its last try an unreadable
    answer is scored with the task's failure values, as the authors' RL scores it."""

    def read(gen: Any, last: bool) -> Any:
        return judgement_of(
            jr.profile,
            gen,
            prompt_source=jr.prompt.source,
            model=judge.backend.info,
            load_s=judge.backend.load_s,
            unreadable="score" if last else "raise",
        )

    return read


class Worker:
    """The model process and the pipe to it; restarted when it dies."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.proc: Any = None
        self.conn: Any = None
        self.info: dict[str, Any] = {}
        self.crash_log: Path | None = None

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.crash_log = new_log_path("serve-worker")
        cfg = self.cfg.model_copy(update={"crash_log": str(self.crash_log)})
        self.proc = self.ctx.Process(target=_worker_main, args=(cfg, child), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        kind, info = self._recv(None)
        if kind != "ready":
            self.proc.join(5)
            raise VermError(info if kind == "failed" else "the model worker did not start")
        self.info = info

    def _recv(self, timeout: float | None) -> Any:
        while True:
            if self.conn.poll(0.2):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    return ("died", self.death())
            if not self.proc.is_alive():
                if self.conn.poll(0):
                    continue
                return ("died", self.death())
            if timeout is not None:
                timeout -= 0.2
                if timeout <= 0:
                    return ("died", "the model worker did not answer in time")

    def death(self) -> str:
        """Why the worker is gone, in one line (a crash names its signal, stage and log)."""
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            return "the model worker " + crash_report("", -code, self.crash_log).lstrip()
        return f"the model worker exited (code {code})"

    def run(self, jobs: list[dict[str, Any]], timeout: float) -> Any:
        """(results, stats), or raise RuntimeError if the worker died or hung."""
        try:
            self.conn.send(jobs)
        except (BrokenPipeError, OSError):
            raise RuntimeError(self.death()) from None
        msg = self._recv(timeout)
        if isinstance(msg, tuple) and msg and msg[0] == "died":
            raise RuntimeError(msg[1])
        return msg

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@dataclass
class Job:
    payload: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    cancelled: bool = False

    def finish(self, result: dict[str, Any]) -> None:
        def set_result() -> None:
            if not self.future.done():
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(set_result)


class Scheduler:
    """Bounded queue -> batches of up to `parallel` jobs -> the worker."""

    def __init__(self, cfg: ServeConfig, worker: Worker, metrics: Metrics):
        self.cfg, self.worker, self.metrics = cfg, worker, metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=cfg.queue_size)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="verm-dispatch", daemon=True)

    def submit(self, payload: dict[str, Any]) -> Job:
        if self.stopping:
            raise APIError(503, "the server is shutting down")
        loop = asyncio.get_running_loop()
        job = Job(payload, loop, loop.create_future())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(
                429, f"the queue is full ({self.cfg.queue_size} waiting); retry later"
            ) from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return job

    def _take(self) -> list[Job]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        jobs = [first]
        window = self.cfg.batch_window
        deadline = time.monotonic() + 10 * window
        while len(jobs) < self.cfg.parallel:
            wait = min(window, deadline - time.monotonic())
            try:
                jobs.append(self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self.queue.qsize())
        return [j for j in jobs if not j.cancelled]

    def _loop(self) -> None:
        while not (self.stopping and self.queue.empty()):
            jobs = self._take()
            if not jobs:
                continue
            self.metrics.in_flight.set(len(jobs))
            try:
                results, stats = self.worker.run(
                    [j.payload for j in jobs], self.cfg.timeout * 2 + 60
                )
                self.metrics.worker_stats(stats)
                self.metrics.batches.inc()
                self.metrics.batched_requests.inc(len(jobs))
            except RuntimeError as exc:
                results = [
                    {
                        "error": f"{exc}; the request failed and the worker was restarted",
                        "status": 500,
                    }
                ] * len(jobs)
                self._restart(str(exc))
            self.metrics.in_flight.set(0)
            for job, res in zip(jobs, results):
                job.finish(res)

    def _restart(self, why: str) -> None:
        self.metrics.restarted()
        code = self.worker.proc.exitcode if self.worker.proc is not None else None
        if code is not None and code < 0:
            from ..crash import signal_name

            self.metrics.worker_crashes.labels(signal_name(-code)).inc()
        log.error("%s; restarting it", why)
        self.worker.stop()
        while not self.stopping:
            try:
                self.worker.start()
                return
            except VermError as exc:
                log.error("restart failed: %s", exc)
                time.sleep(1)
