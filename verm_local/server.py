"""`verm-local serve`: an OpenAI-compatible reward endpoint for RL trainers.

Layout: the HTTP front end (stdlib ThreadingHTTPServer, one thread per connection) checks
each request, decodes its images and puts a job on a bounded queue (full -> 429). A
dispatcher thread takes up to `parallel` waiting jobs at once and hands them to the model
worker, a separate process that holds the loaded model and runs them as one batch
(shared ground-truth prefix, batched decoding: `backends/batch.py`). llama.cpp aborts the
process on some internal asserts; in the worker that fails only the jobs in flight, and
the dispatcher starts a fresh worker and goes on.

Endpoints: POST /v1/chat/completions, GET /v1/models, POST /v1/judge, GET /health,
GET /metrics (Prometheus text)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import multiprocessing as mp
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .constants import TASKS
from .errors import VermError

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class ServeConfig:
    model: str | None = None
    variant: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int = 4
    api_key: str | None = None
    max_image_bytes: int = 20 << 20
    max_request_bytes: int = 64 << 20
    timeout: float = 300.0
    queue_size: int = 64
    batch_window: float = 0.02
    prefix_cache: int = 4
    image_tokens: int = 1024
    max_tokens: int = 1024
    threads: int | None = None
    gpu_layers: int | None = None
    vision: str = "auto"
    allow_remote_images: bool = False
    allow_local_images: bool = False
    served_name: str | None = None


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# -- the model worker (its own process) -------------------------------------------------


def _worker_main(cfg: ServeConfig, conn) -> None:
    """Load the model, then run batches of jobs sent over `conn` until told to stop."""
    import os

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent shuts us down
    from .backends.base import Sampling
    from .backends.batch import BatchRequest
    from .images import load_image
    from .judge import Judge, judge_request

    try:
        judge = Judge(cfg.model, variant=cfg.variant, threads=cfg.threads,
                      n_gpu_layers=cfg.gpu_layers, vision=cfg.vision,
                      image_token_budget=cfg.image_tokens, max_tokens=cfg.max_tokens,
                      parallel=cfg.parallel, prefix_cache=cfg.prefix_cache)
    except VermError as exc:
        conn.send(("failed", str(exc)))
        return
    engine = getattr(judge.backend, "batch", None)
    conn.send(("ready", {"model": judge.backend.info.model_dump(), "pid": os.getpid(),
                         "batched": engine is not None}))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        jobs: list[dict[str, Any]] = msg
        requests, results = [], [None] * len(jobs)
        for i, job in enumerate(jobs):
            try:
                images = [load_image(b, token_budget=cfg.image_tokens) for b in job["images"]]
                sampling = Sampling(**job["sampling"])
                if job["kind"] == "judge":
                    req = judge_request(images, job["task"], sampling, bool(job.get("free")),
                                        job.get("max_errors"))
                else:
                    req = BatchRequest(images, job["messages"], sampling, job.get("schema"))
                requests.append((i, req))
            except VermError as exc:
                results[i] = {"error": str(exc), "status": 400}
        try:
            gens = judge.generate_all([r for _, r in requests])
        except Exception as exc:  # noqa: BLE001 - a bug fails this batch, not the worker
            gens = [VermError(f"internal error: {exc.__class__.__name__}: {exc}")] * len(requests)
        for (i, req), gen in zip(requests, gens):
            job = jobs[i]
            if isinstance(gen, Exception):
                results[i] = {"error": str(gen), "status": 500}
            elif job["kind"] == "judge":
                try:
                    results[i] = {"judgement": judge._judgement(job["task"], gen, req.sampling)
                                  .model_dump(mode="json")}
                except VermError as exc:
                    results[i] = {"error": str(exc), "status": 422}
            else:
                results[i] = {"text": gen.text, "finish_reason": gen.finish_reason,
                              "prompt_tokens": gen.prompt_tokens,
                              "completion_tokens": gen.completion_tokens}
        stats = ({"prefix_hits": engine.cache.hits, "prefix_misses": engine.cache.misses}
                 if engine is not None else {})
        conn.send((results, stats))


@dataclass
class Job:
    payload: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    cancelled: bool = False


class Worker:
    """The model process and the pipe to it; restarted when it dies."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(self.cfg, child), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        kind, info = self._recv(None)
        if kind != "ready":
            self.proc.join(5)
            raise VermError(info if kind == "failed" else "the model worker did not start")
        self.info = info

    def _recv(self, timeout: float | None):
        while True:
            if self.conn.poll(0.2):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    return ("died", "the model worker exited")
            if not self.proc.is_alive():
                if self.conn.poll(0):
                    continue
                return ("died", f"the model worker exited (code {self.proc.exitcode})")
            if timeout is not None:
                timeout -= 0.2
                if timeout <= 0:
                    return ("died", "the model worker did not answer in time")

    def run(self, jobs: list[dict[str, Any]], timeout: float):
        """(results, stats), or raise RuntimeError if the worker died or hung."""
        try:
            self.conn.send(jobs)
        except (BrokenPipeError, OSError):
            raise RuntimeError("the model worker exited") from None
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


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list[float]] = {}  # endpoint -> [count per bucket..., sum, n]
        self.prefix_hits = self.prefix_misses = 0
        self._base_hits = self._base_misses = 0
        self.worker_restarts = 0
        self.batches = 0
        self.batched_requests = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            h = self.latency.setdefault(endpoint, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def worker_stats(self, stats: dict[str, int]) -> None:
        with self.lock:
            if "prefix_hits" in stats:
                self.prefix_hits = self._base_hits + stats["prefix_hits"]
                self.prefix_misses = self._base_misses + stats["prefix_misses"]

    def restarted(self) -> None:
        with self.lock:
            self.worker_restarts += 1
            self._base_hits, self._base_misses = self.prefix_hits, self.prefix_misses

    def render(self, queue_depth: int, in_flight: int) -> str:
        out = ["# HELP verm_requests_total Requests by endpoint and HTTP status.",
               "# TYPE verm_requests_total counter"]
        with self.lock:
            for (ep, status), n in sorted(self.requests.items()):
                out.append(f'verm_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
            out += ["# HELP verm_request_seconds Request latency.",
                    "# TYPE verm_request_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                for i, b in enumerate(LATENCY_BUCKETS):
                    out.append(f'verm_request_seconds_bucket{{endpoint="{ep}",le="{b}"}} {int(h[i])}')
                out.append(f'verm_request_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {int(h[-1])}')
                out.append(f'verm_request_seconds_sum{{endpoint="{ep}"}} {h[-2]:.6f}')
                out.append(f'verm_request_seconds_count{{endpoint="{ep}"}} {int(h[-1])}')
            gauges = (("verm_queue_depth", "gauge", "Requests waiting for the model.", queue_depth),
                      ("verm_in_flight", "gauge", "Requests running in the model.", in_flight),
                      ("verm_prefix_cache_hits_total", "counter",
                       "Requests whose ground-truth prefix was already evaluated.", self.prefix_hits),
                      ("verm_prefix_cache_misses_total", "counter",
                       "Ground-truth prefixes evaluated.", self.prefix_misses),
                      ("verm_batches_total", "counter", "Batches run by the model.", self.batches),
                      ("verm_batched_requests_total", "counter", "Requests run in batches.",
                       self.batched_requests),
                      ("verm_worker_restarts_total", "counter",
                       "Model worker processes restarted after a crash.", self.worker_restarts))
            for name, kind, help_, value in gauges:
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"


class Scheduler:
    """Bounded queue -> batches of up to `parallel` jobs -> the worker."""

    def __init__(self, cfg: ServeConfig, worker: Worker, metrics: Metrics):
        self.cfg, self.worker, self.metrics = cfg, worker, metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=cfg.queue_size)
        self.in_flight = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="verm-dispatch", daemon=True)

    def submit(self, payload: dict[str, Any]) -> Job:
        if self.stopping:
            raise HTTPError(503, "the server is shutting down", "server_error")
        job = Job(payload)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise HTTPError(429, f"the queue is full ({self.cfg.queue_size} waiting); retry "
                                 "later", "rate_limit_error") from None
        return job

    def _take(self) -> list[Job]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.cfg.batch_window
        while len(jobs) < self.cfg.parallel:
            left = deadline - time.monotonic()
            try:
                jobs.append(self.queue.get(timeout=max(left, 0)) if left > 0
                            else self.queue.get_nowait())
            except queue.Empty:
                break
        return [j for j in jobs if not j.cancelled]

    def _loop(self) -> None:
        while not (self.stopping and self.queue.empty()):
            jobs = self._take()
            if not jobs:
                continue
            self.in_flight = len(jobs)
            try:
                results, stats = self.worker.run([j.payload for j in jobs],
                                                 self.cfg.timeout * 2 + 60)
                self.metrics.worker_stats(stats)
                with self.metrics.lock:
                    self.metrics.batches += 1
                    self.metrics.batched_requests += len(jobs)
            except RuntimeError as exc:
                results = [{"error": f"{exc}; the request failed and the worker was restarted",
                            "status": 500}] * len(jobs)
                self._restart()
            self.in_flight = 0
            for job, res in zip(jobs, results):
                job.result = res
                job.done.set()

    def _restart(self) -> None:
        self.metrics.restarted()
        print("verm-local: the model worker died; restarting it", file=sys.stderr, flush=True)
        self.worker.stop()
        while not self.stopping:
            try:
                self.worker.start()
                return
            except VermError as exc:
                print(f"verm-local: restart failed: {exc}", file=sys.stderr, flush=True)
                time.sleep(1)


# -- requests -----------------------------------------------------------------------------


def decode_image(url: Any, cfg: ServeConfig) -> bytes:
    """Bytes of an image part: a data URL (or bare base64); remote URLs and local paths
    only when enabled. Size checked (413), content checked as an image (400)."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise HTTPError(400, "an image part needs a URL")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise HTTPError(400, "image data URLs must be base64-encoded")
        raw = _b64(data, cfg)
    elif url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise HTTPError(400, "remote image URLs are refused (start the server with "
                                 "--allow-remote-images to fetch them)")
        raw = _fetch(url, cfg)
    elif url.startswith("file://") or url.startswith("/"):
        if not cfg.allow_local_images:
            raise HTTPError(400, "local image paths are refused (start the server with "
                                 "--allow-local-images to read them)")
        path = Path(url.removeprefix("file://"))
        try:
            if path.stat().st_size > cfg.max_image_bytes:
                raise HTTPError(413, f"image over {cfg.max_image_bytes} bytes")
            raw = path.read_bytes()
        except OSError:
            raise HTTPError(400, f"{path}: cannot read the image") from None
    else:
        raw = _b64(url, cfg)
    _check_image(raw)
    return raw


def _b64(data: str, cfg: ServeConfig) -> bytes:
    if len(data) * 3 // 4 > cfg.max_image_bytes + 3:
        raise HTTPError(413, f"image over {cfg.max_image_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "bad base64 in an image") from None


def _fetch(url: str, cfg: ServeConfig) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            raw = r.read(cfg.max_image_bytes + 1)
    except OSError as exc:
        raise HTTPError(400, f"cannot fetch {url}: {exc}") from None
    if len(raw) > cfg.max_image_bytes:
        raise HTTPError(413, f"image over {cfg.max_image_bytes} bytes")
    return raw


def _check_image(raw: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise HTTPError(400, "an image part is not a readable image") from None


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise HTTPError(400, f"{key} must be a number within [{lo}, {hi}]")
    return v


def sampling_from(body: dict, cfg: ServeConfig) -> dict[str, Any]:
    """OpenAI sampling fields plus vLLM's extras (top_k, repetition_penalty)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or cfg.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise HTTPError(400, "max_tokens must be a positive integer")
    if body.get("n", 1) not in (1, None):
        raise HTTPError(400, "n > 1 is not supported; send one request per sample")
    top_k = body.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise HTTPError(400, "top_k must be an integer")
    seed = body.get("seed") or 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise HTTPError(400, "seed must be an integer")
    return {"max_tokens": min(max_tokens, cfg.max_tokens),
            "temperature": _number(body, "temperature", 0.0, 0.0, 5.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
            "top_k": max(top_k, 0),
            "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
            "repeat_penalty": _number(body, "repetition_penalty", 1.0, 0.01, 5.0),
            "seed": seed}


def chat_job(body: dict, cfg: ServeConfig) -> dict[str, Any]:
    """A chat completion request -> a worker job (images decoded, parts normalised)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages must be a non-empty list")
    images: list[bytes] = []
    norm = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise HTTPError(400, "each message needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            norm.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise HTTPError(400, "message content must be a string or a list of parts")
        parts = []
        for p in content:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind in ("image_url", "image"):
                images.append(decode_image(p.get("image_url", p.get("image")), cfg))
                parts.append({"type": "image"})
            else:
                raise HTTPError(400, f"unsupported content part {kind!r} (text and image_url "
                                     "are understood)")
        norm.append({"role": m["role"], "content": parts})
    schema = None
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise HTTPError(400, "response_format.json_schema.schema must be an object")
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        schema = fmt.get("schema") if isinstance(fmt.get("schema"), dict) else {"type": "object"}
    return {"kind": "chat", "messages": norm, "images": images, "schema": schema,
            "sampling": sampling_from(body, cfg)}


def judge_job(body: dict, cfg: ServeConfig) -> dict[str, Any]:
    task = body.get("task", "chart")
    if task not in TASKS:
        raise HTTPError(400, f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if "gt" not in body or "pred" not in body:
        raise HTTPError(400, "a judge request needs gt and pred images (data URLs or base64)")
    cap = body.get("max_errors")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise HTTPError(400, "max_errors must be a non-negative integer")
    return {"kind": "judge", "task": task, "free": bool(body.get("free", False)),
            "max_errors": cap, "images": [decode_image(body["gt"], cfg),
                                          decode_image(body["pred"], cfg)],
            "sampling": sampling_from(body, cfg)}


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.worker = Worker(cfg)
        self.scheduler = Scheduler(cfg, self.worker, self.metrics)
        self.httpd: ThreadingHTTPServer | None = None
        self.connections: dict[Any, bool] = {}  # open keep-alive sockets -> busy
        self.conn_lock = threading.Lock()
        self.closing = False

    @property
    def model_name(self) -> str:
        if self.cfg.served_name:
            return self.cfg.served_name
        path = (self.worker.info.get("model") or {}).get("path", "verm-local")
        return Path(path).name

    def start(self) -> None:
        """Load the model (in the worker) and bind; `serve_forever` runs it."""
        self.worker.start()
        handler = type("Handler", (_Handler,), {"server_ref": self})
        try:
            self.httpd = ThreadingHTTPServer((self.cfg.host, self.cfg.port), handler)
        except OSError as exc:
            self.worker.stop()
            raise VermError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: "
                            f"{exc.strerror}") from None
        self.httpd.daemon_threads = False  # shutdown waits for requests in flight
        self.scheduler.thread.start()

    def serve_forever(self) -> None:
        assert self.httpd is not None
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def shutdown(self) -> None:
        """Stop taking connections; requests already accepted finish (see close)."""
        if self.httpd is not None:
            threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    def close(self) -> None:
        self.closing = True
        with self.conn_lock:  # idle keep-alive connections: end their wait for a request
            for sock, busy in self.connections.items():
                if not busy:
                    _shutdown_read(sock)
        if self.httpd is not None:
            self.httpd.server_close()  # joins the handler threads: their jobs complete
        self.scheduler.stopping = True
        if self.scheduler.thread.is_alive():
            self.scheduler.thread.join(self.cfg.timeout + 5)
        self.worker.stop()

    def handle(self, method: str, path: str, headers: Any, body: bytes | None
               ) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/health" and method == "GET":
            return _json(200, {"status": "ok", "model": self.model_name,
                               "worker_pid": self.worker.info.get("pid"),
                               "parallel": self.cfg.parallel})
        if path.startswith("/v1/") or path == "/metrics":
            self._auth(headers)
        if path == "/metrics" and method == "GET":
            text = self.metrics.render(self.scheduler.queue.qsize(), self.scheduler.in_flight)
            return 200, "text/plain; version=0.0.4", text.encode()
        if path == "/v1/models" and method == "GET":
            return _json(200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0,
                 "owned_by": "verm-local"}]})
        routes = {"/v1/chat/completions": self._chat, "/v1/judge": self._judge}
        if path in routes:
            if method != "POST":
                raise HTTPError(405, f"{path} takes POST")
            try:
                data = json.loads(body or b"")
            except (ValueError, UnicodeDecodeError):
                raise HTTPError(400, "the body is not valid JSON") from None
            if not isinstance(data, dict):
                raise HTTPError(400, "the body must be a JSON object")
            return routes[path](data)
        raise HTTPError(404, f"no route {method} {path}", "not_found_error")

    def _auth(self, headers: Any) -> None:
        if not self.cfg.api_key:
            return
        got = headers.get("Authorization", "")
        if got != f"Bearer {self.cfg.api_key}":
            raise HTTPError(401, "missing or wrong API key", "authentication_error")

    def _wait(self, payload: dict[str, Any]) -> dict[str, Any]:
        job = self.scheduler.submit(payload)
        if not job.done.wait(self.cfg.timeout):
            job.cancelled = True
            raise HTTPError(504, f"no answer within {self.cfg.timeout:g} s", "timeout_error")
        res = job.result or {"error": "no result", "status": 500}
        if "error" in res:
            raise HTTPError(res.get("status", 500), res["error"],
                            "server_error" if res.get("status", 500) >= 500
                            else "invalid_request_error")
        return res

    def _chat(self, body: dict) -> tuple[int, str, bytes]:
        res = self._wait(chat_job(body, self.cfg))
        usage = {"prompt_tokens": res["prompt_tokens"],
                 "completion_tokens": res["completion_tokens"],
                 "total_tokens": res["prompt_tokens"] + res["completion_tokens"]}
        return _json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model") or self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                         "finish_reason": res["finish_reason"] or "stop", "logprobs": None}],
            "usage": usage})

    def _judge(self, body: dict) -> tuple[int, str, bytes]:
        return _json(200, self._wait(judge_job(body, self.cfg))["judgement"])


def _shutdown_read(sock: Any) -> None:
    import socket

    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    server_ref: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: metrics count requests
        pass

    def setup(self) -> None:
        super().setup()
        with self.server_ref.conn_lock:
            self.server_ref.connections[self.request] = False

    def finish(self) -> None:
        with self.server_ref.conn_lock:
            self.server_ref.connections.pop(self.request, None)
        super().finish()

    def _busy(self, busy: bool) -> None:
        with self.server_ref.conn_lock:
            self.server_ref.connections[self.request] = busy

    def _serve(self, method: str) -> None:
        self._busy(True)
        try:
            self._serve_one(method)
        finally:
            self._busy(False)
            if self.server_ref.closing:
                self.close_connection = True

    def _serve_one(self, method: str) -> None:
        srv, t0 = self.server_ref, time.perf_counter()
        endpoint = self.path.split("?", 1)[0]
        try:
            body = None
            if method == "POST":
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    raise HTTPError(400, "bad Content-Length") from None
                if length > srv.cfg.max_request_bytes:
                    self.close_connection = True
                    raise HTTPError(413, f"request over {srv.cfg.max_request_bytes} bytes")
                body = self.rfile.read(length)
            status, ctype, data = srv.handle(method, self.path, self.headers, body)
        except HTTPError as exc:
            status, ctype = exc.status, "application/json"
            data = json.dumps({"error": {"message": exc.message, "type": exc.kind,
                                         "code": exc.status}}).encode()
        except Exception as exc:  # a bug must not kill the connection thread silently
            status, ctype = 500, "application/json"
            data = json.dumps({"error": {"message": f"internal error: {exc}",
                                         "type": "server_error", "code": 500}}).encode()
        known = endpoint if endpoint in ("/v1/chat/completions", "/v1/judge", "/v1/models",
                                         "/health", "/metrics") else "other"
        srv.metrics.observe(known, status, time.perf_counter() - t0)
        self.send_response(status)
        if srv.closing:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")


def serve(cfg: ServeConfig) -> None:
    """Run until SIGINT/SIGTERM; requests in flight finish before the process exits."""
    srv = Server(cfg)
    srv.start()

    def stop(*_: Any) -> None:
        print("verm-local: shutting down; finishing requests in flight", file=sys.stderr,
              flush=True)
        srv.shutdown()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"verm-local: serving {srv.model_name} on http://{cfg.host}:{cfg.port}/v1 "
          f"({cfg.parallel} parallel, worker pid {srv.worker.info.get('pid')})",
          file=sys.stderr, flush=True)
    srv.serve_forever()


# -- vLLM -----------------------------------------------------------------------------------


def vllm_command(model_dir: str | Path, cfg: ServeConfig, quant: str | None = None
                 ) -> list[str]:
    """The `vllm serve` command line for a bf16 or GPTQ checkpoint of Visual-ERM, with the
    same host, port, parallelism, key and image limits as `verm-local serve`."""
    cmd = ["vllm", "serve", str(model_dir), "--host", cfg.host, "--port", str(cfg.port),
           "--served-model-name", cfg.served_name or Path(model_dir).name,
           "--max-num-seqs", str(cfg.parallel),
           "--max-model-len", str(2 * cfg.image_tokens + 1024 + cfg.max_tokens),
           "--limit-mm-per-prompt", json.dumps({"image": 2}),
           "--mm-processor-kwargs", json.dumps({"max_pixels": cfg.image_tokens * 32 * 32}),
           "--enable-prefix-caching", "--trust-remote-code"]
    if quant and quant.startswith("gptq"):
        cmd += ["--quantization", "gptq_marlin"]
    else:
        cmd += ["--dtype", "bfloat16"]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    if cfg.allow_local_images:
        cmd += ["--allowed-local-media-path", "/"]
    return cmd
