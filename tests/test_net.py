"""The package's edges: one HTTP client (backoff, Retry-After, a shared pool), image limits
without global state, and one retry policy for unreadable answers at every entry point."""

from __future__ import annotations

import io
import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from verm_local import net
from verm_local.errors import FetchError, InputError, TooLargeError

from .conftest import serve_in_thread


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers, body) of the server's script
    (the last one repeats), and notes the client's port of each request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        srv = self.server
        srv.ports.append(self.client_address[1])
        status, headers, body = srv.script[min(srv.calls, len(srv.script) - 1)]
        srv.calls += 1
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@pytest.fixture
def scripted():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.daemon_threads = True
    srv.script, srv.calls, srv.ports = [(200, {}, b"{}")], 0, []
    serve_in_thread(srv)
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture
def waits(monkeypatch):
    seen: list[float] = []
    monkeypatch.setattr(net, "sleep", seen.append)
    return seen


def test_retry_after_is_honoured_then_the_answer_read(scripted, waits):
    srv, url = scripted
    srv.script = [
        (503, {"Retry-After": "2"}, b"busy"),
        (429, {"Retry-After": "1"}, b"slow down"),
        (200, {"Content-Type": "application/json"}, b'{"ok": true}'),
    ]
    assert net.post_json(url + "/x", {"a": 1}) == {"ok": True}
    assert srv.calls == 3 and waits == [2.0, 1.0]


def test_backoff_grows_and_gives_up(scripted, waits):
    srv, url = scripted
    srv.script = [(500, {}, b"down")]
    policy = net.RetryPolicy(retries=3, base_s=1.0, max_s=30.0)
    with pytest.raises(httpx.HTTPStatusError):
        net.post_json(url + "/x", {}, policy=policy)
    assert srv.calls == 4
    assert [0.5 <= w <= 1 for w in waits[:1]] == [True]
    assert 1 <= waits[1] <= 2 and 2 <= waits[2] <= 4  # exponential, with jitter


def test_a_client_error_is_not_retried(scripted, waits):
    srv, url = scripted
    srv.script = [(400, {}, b'{"error": {"message": "bad task"}}')]
    with pytest.raises(httpx.HTTPStatusError) as exc:
        net.post_json(url + "/x", {})
    assert srv.calls == 1 and waits == []
    assert net.error_message(exc.value) == "HTTP 400: bad task"


def test_one_pool_keeps_the_connection(scripted):
    srv, url = scripted
    for _ in range(5):
        net.get_json(url + "/x")
    assert len(set(srv.ports)) == 1  # five requests, one connection


def test_a_download_stops_at_its_limit(scripted, waits):
    srv, url = scripted
    srv.script = [(200, {}, b"x" * 5000)]
    assert net.get_bytes(url + "/f", max_bytes=5000) == b"x" * 5000
    with pytest.raises(TooLargeError):
        net.get_bytes(url + "/f", max_bytes=4999)
    srv.script = [(404, {}, b"")]
    with pytest.raises(FetchError, match="HTTP 404"):
        net.get_bytes(url + "/f")


def test_unreachable_is_one_fetch_error(waits):
    with pytest.raises(FetchError, match="cannot fetch"):
        net.get_bytes("http://127.0.0.1:9/x", policy=net.RetryPolicy(retries=1))
    assert len(waits) == 1


# ---------------------------------------------------------------- images


def test_concurrent_decoding_with_the_bomb_limit_leaves_global_state_alone():
    from verm_local.images import load_image

    def png(size, mode="RGB"):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, "PNG")
        return buf.getvalue()

    bomb, good = png((9000, 9000), "1"), png((640, 480))
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    results: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            load_image(bomb if i % 2 else good)
            results[i] = "ok"
        except InputError as exc:
            results[i] = str(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == "ok" for i in range(0, 16, 2))
    assert all("too large" in results[i] for i in range(1, 16, 2))
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before


# ---------------------------------------------------------------- one retry policy


ANSWER = {
    "structure_error_count": 0,
    "data_error_count": 1,
    "text_error_count": 0,
    "style_error_count": 0,
    "errors": [
        {"category": "data_error", "severity": 3, "location": "bar 2", "description": "5 -> 4"}
    ],
}


class SecondTryBackend:
    """A model whose first answer to a sampled request cannot be read and whose next one
    can (it answers by the request's seed): an answer that needs its second try."""

    parallel = 4
    load_s = 0.0

    def __init__(self):
        from verm_local.schema import ModelInfo

        self.info = ModelInfo(path="scripted")
        self.seeds: list[int] = []

    def generate_all(self, requests):
        from verm_local.backends.base import Generation

        out = []
        for r in requests:
            self.seeds.append(r.sampling.seed)
            text = "the bars differ" if r.sampling.seed % 2 == 0 else json.dumps(ANSWER)
            out.append(Generation(text, "stop", 10, 0, 5, 0.0, 0.0, 0.0))
        return out

    def close(self):
        pass


def _pair(tmp_path):
    from .conftest import draw_chart

    return (
        draw_chart(tmp_path / "gt.png", [3, 5, 2, 6]),
        draw_chart(tmp_path / "pred.png", [3, 4, 2, 6], colour="orange"),
    )


def test_the_same_reward_from_judge_pairs_and_the_server(tmp_path):
    from verm_local.judge import Judge
    from verm_local.server.config import ServeConfig
    from verm_local.server.requests import judge_job
    from verm_local.server.scheduler import run_jobs
    from verm_local.server.types import JudgeRequest
    from verm_local.tasks import decoding, profile

    gt, pred = _pair(tmp_path)
    rl = decoding(profile("chart"), "rl")
    backend = SecondTryBackend()
    judge = Judge(backend=backend)
    one = judge.judge(gt, pred, "chart", sampling=rl)  # `verm-local judge --sampling rl`
    assert backend.seeds == [0, 1]
    many = judge.judge_many([(gt, pred, "chart")] * 3, sampling="rl")  # `judge --pairs`
    assert backend.seeds[2:] == [0, 0, 0, 1, 1, 1]  # the three asked again as one batch
    body = JudgeRequest(gt=net_url(gt), pred=net_url(pred), task="chart", sampling="rl")
    job = judge_job(body, ServeConfig())
    served = run_jobs(judge, ServeConfig(), [job])[0]["judgement"]  # `/v1/judge`
    assert one.complete and one.total_severity == 3
    assert {one.reward, *(m.reward for m in many), served["reward"]} == {one.reward}
    # Greedy decoding would answer the same again: one try, and the unreadable answer
    # raises (judge), is an error (judge --pairs) or is scored as failed (the server).
    backend.seeds.clear()
    from verm_local.errors import AnswerError

    with pytest.raises(AnswerError):
        judge.judge(gt, pred, "chart")
    assert backend.seeds == [0]


def net_url(path) -> str:
    from verm_local.images import data_url

    return data_url(path)
