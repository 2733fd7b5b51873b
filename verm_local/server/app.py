"""`verm-local serve`: the routes of the OpenAI-compatible reward server, on FastAPI and
uvicorn. Endpoints: POST /v1/chat/completions, GET /v1/models, POST /v1/judge,
GET /health, GET /metrics (Prometheus text, prometheus-client)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import VermError
from ..schema import Critique
from .config import ServeConfig
from .errors import APIError, error_body, install
from .metrics import Metrics
from .requests import chat_job, critique_job, judge_job
from .scheduler import Scheduler, Worker
from .types import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    ChunkDelta,
    CritiqueRequest,
    JudgeRequest,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("verm_local.server")


class Server:
    """The model worker, the scheduler and the metrics behind one app."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.worker = Worker(cfg)
        self.scheduler = Scheduler(cfg, self.worker, self.metrics)

    @property
    def model_name(self) -> str:
        if self.cfg.served_name:
            return self.cfg.served_name
        return Path((self.worker.info.get("model") or {}).get("path", "verm-local")).name

    def start(self) -> None:
        """Load the model (in the worker) and start dispatching."""
        self.worker.start()
        self.scheduler.thread.start()

    def stop(self) -> None:
        self.scheduler.stopping = True
        if self.scheduler.thread.is_alive():
            self.scheduler.thread.join(self.cfg.timeout + 5)
        self.worker.stop()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "worker_pid": self.worker.info.get("pid"),
            "parallel": self.cfg.parallel,
            "deterministic": self.worker.info.get("deterministic"),
        }

    async def wait(self, payload: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        job = self.scheduler.submit(payload)
        try:
            res = await asyncio.wait_for(asyncio.shield(job.future), self.cfg.timeout)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise APIError(504, f"no answer within {self.cfg.timeout:g} s") from None
        if "error" in res:
            raise APIError(res.get("status", 500), res["error"])
        return res


def fingerprint(deterministic: bool) -> str:
    """OpenAI's `system_fingerprint` of an answer: whether the same request gets the same
    greedy answer whatever else the server runs beside it."""
    return "verm-local-batch-invariant" if deterministic else "verm-local-batch-dependent"


def create_app(server: Any) -> FastAPI:
    """The FastAPI app of a started (or starting) `Server`, or of anything with its face:
    `cfg`, `metrics`, `model_name`, `health()`, `wait(job)`, `stop()` (the Ray Serve
    ingress, `ray_serve.py`)."""
    cfg = server.cfg

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("shutting down; requests in flight have finished")
        await run_in_threadpool(server.stop)

    app = FastAPI(title="verm-local", lifespan=lifespan, docs_url=None, redoc_url=None)
    install(app)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        """Size limit (413 before reading an oversized body), metrics for every request."""
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_request_bytes):
            status = 400 if not length.isdigit() else 413
            msg = (
                "bad Content-Length"
                if status == 400
                else f"request over {cfg.max_request_bytes} bytes"
            )
            response: Response = JSONResponse(
                error_body(status, msg), status_code=status, headers={"Connection": "close"}
            )
        else:
            response = await call_next(request)
        server.metrics.observe(
            request.url.path.rstrip("/") or "/", response.status_code, time.perf_counter() - t0
        )
        return response

    def authorised(request: Request) -> None:
        if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            raise APIError(401, "missing or wrong API key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return await run_in_threadpool(server.health)

    @app.get("/metrics", dependencies=[Depends(authorised)])
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorised)], response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.model_name)])

    @app.post(
        "/v1/chat/completions",
        dependencies=[Depends(authorised)],
        response_model=ChatCompletionResponse,
    )
    async def chat(body: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        res = await server.wait(await run_in_threadpool(chat_job, body, cfg))
        head = dict(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model or server.model_name,
        )
        usage = Usage(
            prompt_tokens=res["prompt_tokens"],
            completion_tokens=res["completion_tokens"],
            total_tokens=res["prompt_tokens"] + res["completion_tokens"],
        )
        finish = res["finish_reason"] or "stop"
        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _events(head, res["text"], finish, usage if with_usage else None),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return ChatCompletionResponse(
            **head,
            choices=[
                ChatChoice(message=ChatChoiceMessage(content=res["text"]), finish_reason=finish)
            ],
            usage=usage,
            system_fingerprint=fingerprint(res.get("deterministic", False)),
            deterministic=bool(res.get("deterministic", False)),
        )

    @app.post("/v1/judge", dependencies=[Depends(authorised)])
    async def judge(body: JudgeRequest) -> dict[str, Any]:
        """The Judgement of (gt, pred) with the task's reward recipe."""
        return (await server.wait(await run_in_threadpool(judge_job, body, cfg)))["judgement"]

    @app.post("/v1/critique", dependencies=[Depends(authorised)], response_model=Critique)
    async def critique(body: CritiqueRequest) -> Critique:
        """For agents running their own loop: the code rendered in the sandbox (or the
        image given) judged against the ground truth, the reward, and the revision
        message `refine` would send the policy."""
        from ..refine import revision_message
        from ..reward import with_settings
        from ..schema import Judgement
        from ..tasks import profile

        job, render_error = await run_in_threadpool(critique_job, body, cfg)
        p = profile(body.task)
        judgement = None
        if job is not None:
            found = (await server.wait(job))["judgement"]
            judgement = Judgement.model_validate(found)
        return Critique(
            judgement=judgement,
            reward=judgement.reward if judgement else with_settings(p.reward).unrendered(),
            render_error=render_error,
            revision_message=revision_message(p, body.code, judgement, render_error),
        )

    return app


def _events(head: dict[str, Any], text: str, finish: str, usage: Usage | None) -> Iterator[str]:
    """`stream: true` in OpenAI's server-sent events. The engine decodes a batch of answers
    together and hands each back whole, so the answer arrives as one content chunk (after
    the role chunk), then the finish reason, the usage if asked for, and `[DONE]`."""

    def event(choices: list[ChunkChoice], **extra: Any) -> str:
        # OpenAI's chunks carry `finish_reason: null`, but no null role/content in a delta
        # and no usage until the last one.
        chunk = ChatCompletionChunk(**head, choices=choices, **extra).model_dump(mode="json")
        for choice in chunk["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if chunk["usage"] is None:
            del chunk["usage"]
        return f"data: {json.dumps(chunk)}\n\n"

    yield event([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
    yield event([ChunkChoice(delta=ChunkDelta(content=text))])
    yield event([ChunkChoice(delta=ChunkDelta(), finish_reason=finish)])
    if usage is not None:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


def serve(cfg: ServeConfig) -> None:
    """Load the model, then serve until SIGINT/SIGTERM; requests in flight finish first."""
    import uvicorn

    server = Server(cfg)
    server.start()
    app = create_app(server)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        timeout_graceful_shutdown=int(cfg.timeout) + 5,
        access_log=False,
        lifespan="on",
    )
    userver = uvicorn.Server(config)
    # uvicorn stops on SIGINT/SIGTERM after the requests in flight, then raises the signal
    # again under the handlers it found: with these, that ends the process normally (0).
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    log.info(
        "serving %s on http://%s:%s/v1 (%s parallel, worker pid %s)",
        server.model_name,
        cfg.host,
        cfg.port,
        cfg.parallel,
        server.worker.info.get("pid"),
    )
    try:
        userver.run()
    except OSError as exc:  # the port is taken
        server.stop()
        raise VermError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
    if not userver.started:
        server.stop()
        raise VermError(f"cannot listen on {cfg.host}:{cfg.port}")
