"""`verm-local serve`, the batch engine behind it, `judge --pairs` and the RewardClient,
driven with the tiny model on loopback ports."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from verm_local.tasks import profile

from .conftest import CLI, draw_chart, run_cli

CHART = profile("chart")

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


class Served:
    def __init__(self, model: Path, *args: str, env: dict | None = None, startup: float = 120):
        self.port = _port()
        self.base = f"http://127.0.0.1:{self.port}"
        # The server's output goes to a file: an undrained pipe blocks a chatty server
        # (Ray's start-up logs fill it) before it ever listens.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="verm-serve-", suffix=".log")
        self.proc = subprocess.Popen(
            [
                str(CLI),
                "serve",
                "-m",
                str(model / "model-Q8_0.gguf"),
                "--port",
                str(self.port),
                "--vision",
                "gguf",
                "--max-tokens",
                "400",
                "--image-tokens",
                "64",
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.time() + startup
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                self.health = self.get("/health")
                return
            except (OSError, AssertionError):  # not listening yet, or not ready (Ray)
                time.sleep(0.1)
        raise AssertionError(f"server did not come up: {self.output()[-3000:]}")

    def output(self) -> str:
        """What the server printed so far (all of it, once stopped)."""
        if self.log.closed:
            return self.printed
        return Path(self.log.name).read_text(errors="replace")

    def request(
        self, method: str, path: str, body: bytes | None = None, key: str | None = "k"
    ) -> tuple[int, dict | str]:
        req = urllib.request.Request(
            self.base + path, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                raw, code, ctype = r.read(), r.status, r.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            raw, code, ctype = exc.read(), exc.code, exc.headers["Content-Type"]
        return code, json.loads(raw) if "json" in ctype else raw.decode()

    def get(self, path: str):
        code, out = self.request("GET", path)
        assert code == 200, out
        return out

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def kill_worker_during(self, body: bytes, sig: int) -> tuple[int, dict | str]:
        """POST `body` to /v1/judge, kill the model worker with `sig` once the request is
        in the model, and return the reply."""
        out = {}
        t = threading.Thread(target=lambda: out.update(r=self.request("POST", "/v1/judge", body)))
        t.start()
        deadline = time.time() + 60
        while self.metric("verm_in_flight") < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(self.get("/health")["worker_pid"], sig)
        t.join(120)
        return out["r"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if not self.log.closed:
                self.printed = self.output()
                self.log.close()


@pytest.fixture(scope="module")
def images(chart_group):
    """The session's ground truth and its 8 predictions."""
    return chart_group


@pytest.fixture
def server(served):
    """The session's served tiny model (conftest.served)."""
    return served


def _rl_message(gt: Path, pred: Path) -> list[dict]:
    from verm_local.prompts import load_prompt

    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _url(gt)}},
                {"type": "image_url", "image_url": {"url": _url(pred)}},
                {"type": "text", "text": load_prompt(CHART, None)},
            ],
        }
    ]


def test_openai_client_gets_schema_valid_json(server, images):
    from openai import OpenAI

    from verm_local.answer import answer_schema
    from verm_local.schema import Judgement

    gt, preds = images
    client = OpenAI(base_url=server.base + "/v1", api_key="k")
    assert [m.id for m in client.models.list().data] == ["model-Q8_0.gguf"]
    schema = answer_schema(CHART)
    r = client.chat.completions.create(
        model="model-Q8_0.gguf",
        messages=_rl_message(gt, preds[0]),
        max_tokens=400,
        temperature=0.7,
        top_p=0.8,
        presence_penalty=1.5,
        extra_body={"top_k": 20, "repetition_penalty": 1.05},
        response_format={"type": "json_schema", "json_schema": {"name": "verm", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop"
    answer = json.loads(r.choices[0].message.content)
    # The grammar bounds strings in characters as the model emits them; random weights emit
    # byte tokens that are not valid UTF-8, which detokenize to several U+FFFD each, so
    # string lengths are checked on the answer the Judgement keeps, not on the raw text.
    jsonschema.validate(answer, _without_max_length(schema))
    Judgement.from_answer(CHART, answer)
    assert r.usage.prompt_tokens > 2 * 16 and r.usage.completion_tokens > 0


def test_streaming_clients_get_the_same_answer_as_events(server, images):
    """`stream: true` (OpenAI SDKs, chat UIs): the answer as server-sent chunks, the
    same text and finish reason as the plain response, usage when asked for."""
    from openai import OpenAI

    gt, preds = images
    client = OpenAI(base_url=server.base + "/v1", api_key="k")
    kwargs = dict(
        model="model-Q8_0.gguf", messages=_rl_message(gt, preds[0]), max_tokens=24, temperature=0
    )
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def _without_max_length(schema):
    if isinstance(schema, dict):
        return {k: _without_max_length(v) for k, v in schema.items() if k != "maxLength"}
    if isinstance(schema, list):
        return [_without_max_length(v) for v in schema]
    return schema


def test_judge_endpoint_returns_a_judgement(server, images):
    from verm_local.schema import Judgement

    gt, preds = images
    code, out = server.request(
        "POST",
        "/v1/judge",
        json.dumps(
            {"gt": _url(gt), "pred": _url(preds[1]), "task": "chart", "max_errors": 2}
        ).encode(),
    )
    assert code == 200, out
    j = Judgement.model_validate(out)
    assert j.task == "chart" and 0 <= j.score <= 1 and len(j.errors) <= 2
    # The worker fixes no context: its streams were sized for this batch (256-aligned
    # prompt + answer cap of 400), never for every task's full cap.
    from verm_local.select import task_context

    n_ctx = server.metric("verm_context_tokens")
    assert 0 < n_ctx <= task_context(None, 64, 400) and n_ctx % 256 == 0


def test_concurrent_load_shares_the_prefix(server, images):
    """32 requests from 8 concurrent clients, all against one ground truth: all succeed,
    they run in batches, and the ground truth's prefix is evaluated once per batch at most."""
    gt, preds = images
    hits0 = server.metric("verm_prefix_cache_hits_total")
    batches0 = server.metric("verm_batches_total")

    def one(i):
        t0 = time.perf_counter()
        code, out = server.request(
            "POST",
            "/v1/judge",
            json.dumps({"gt": _url(gt), "pred": _url(preds[i % 8]), "max_errors": 2}).encode(),
        )
        return code, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(32)))
    wall = time.perf_counter() - t0
    assert [c for c, _ in results] == [200] * 32
    assert wall < 600
    lat = sorted(t for _, t in results)
    batches = server.metric("verm_batches_total") - batches0
    hits = server.metric("verm_prefix_cache_hits_total") - hits0
    assert batches < 32  # requests were batched
    assert hits >= 32 - batches  # every request but the first of each batch reused the prefix
    print(
        f"\n32 requests, 8 clients: {wall:.1f} s, p50 {lat[15]:.2f} s, p95 {lat[30]:.2f} s, "
        f"{batches:.0f} batches, {hits:.0f} prefix hits"
    )


@pytest.mark.parametrize(
    "body,code,needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "data:image/png;base64,@@@"},
                                }
                            ],
                        }
                    ]
                }
            ).encode(),
            400,
            "base64",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {
                                        "url": "data:image/png;base64,"
                                        + base64.b64encode(b"plain text").decode()
                                    },
                                }
                            ],
                        }
                    ]
                }
            ).encode(),
            400,
            "not a readable image",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "http://example.com/x.png"},
                                }
                            ],
                        }
                    ]
                }
            ).encode(),
            400,
            "remote image URLs are refused",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "data:image/png;base64," + "A" * 400_000},
                                }
                            ],
                        }
                    ]
                }
            ).encode(),
            413,
            "image over",
        ),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
    ],
)
def test_bad_requests_get_clear_errors(server, body, code, needle):
    got, out = server.request("POST", "/v1/chat/completions", body)
    assert got == code, out
    assert needle in out["error"]["message"]


def test_api_key_is_required(server):
    code, out = server.request("GET", "/v1/models", key="wrong")
    assert code == 401 and "API key" in out["error"]["message"]
    code, _ = server.request("GET", "/health", key=None)  # health stays open
    assert code == 200


def test_queue_full_worker_crash_and_graceful_shutdown(tiny_gguf, images):
    """A bounded queue answers 429; a worker killed mid-request fails only that request and
    the next one succeeds; SIGTERM lets the request in flight finish."""
    gt, preds = images
    s = Served(tiny_gguf, "--parallel", "1", "--queue", "1")
    body = json.dumps({"gt": _url(gt), "pred": _url(preds[2]), "max_errors": 2}).encode()
    try:
        with ThreadPoolExecutor(8) as ex:
            codes = [c for c, _ in ex.map(lambda _: s.request("POST", "/v1/judge", body), range(8))]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}

        code, res = s.kill_worker_during(body, signal.SIGKILL)
        assert code == 500 and "worker" in res["error"]["message"]
        code, res = s.request("POST", "/v1/judge", body)
        assert code == 200, res
        assert s.metric("verm_worker_restarts_total") == 1

        out = {}
        t = threading.Thread(target=lambda: out.update(r=s.request("POST", "/v1/judge", body)))
        t.start()
        while s.metric("verm_in_flight") < 1:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert out["r"][0] == 200
    finally:
        assert s.stop() == 0


def test_batch_engine_matches_the_single_path(tiny_gguf, images):
    """One request through the batch engine gives the single path's exact answer, and again
    from the cached prefix; four predictions against one ground truth evaluate it once."""
    from verm_local.answer import answer_schema
    from verm_local.backends.base import Sampling
    from verm_local.judge import Judge
    from verm_local.prompts import load_prompt
    from verm_local.schema import Judgement, extract_json

    gt, preds = images
    schema = answer_schema(CHART, 400, 2)
    with Judge(
        str(tiny_gguf / "model-Q8_0.gguf"),
        vision="gguf",
        image_tokens=64,
        max_tokens=400,
        parallel=4,
        prefix_cache=2,
    ) as j:
        images_ = [j.prepare(gt), j.prepare(preds[0])]
        single = j.backend.generate(
            images_, load_prompt(CHART, None), Sampling(max_tokens=400), schema
        )
        many = j.judge_many([(gt, preds[0], "chart")], max_errors=2)
        again = j.judge_many([(gt, preds[0], "chart")], max_errors=2)
        engine = j.backend.batch
        assert (engine.cache.misses, engine.cache.hits) == (1, 1)
        assert many[0].errors == again[0].errors
        assert many[0].errors == Judgement.from_answer(CHART, extract_json(single.text)).errors
        out = j.judge_many([(gt, p, "chart") for p in preds[:4]], max_errors=2)
        assert all(not isinstance(r, Exception) for r in out)
        assert engine.cache.misses == 1 and engine.cache.hits == 5
        # Each sequence has its own KV stream, so decoding four together leaves each answer
        # as the single path gives it (Q8_0 rounds the same at 1 and 4 rows on this CPU).
        for p, r in zip(preds[:4], out):
            alone = j.backend.generate(
                [j.prepare(gt), j.prepare(p)],
                load_prompt(CHART, None),
                Sampling(max_tokens=400),
                schema,
            )
            assert r.errors == Judgement.from_answer(CHART, extract_json(alone.text)).errors


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_sampler_shortlist_samples_what_the_whole_vocabulary_does(
    tiny_gguf, images, temperature, monkeypatch
):
    """RL sampling (top-k 20, top-p, presence penalty, seeded), and greedy with penalties,
    under the answer grammar: the chain run on the shortlist draws the same tokens as the
    chain run on all 151,936, in a batch and on the single path alike."""
    from verm_local.answer import answer_schema
    from verm_local.backends.base import Sampling
    from verm_local.backends.sampling import TokenSampler
    from verm_local.judge import Judge, build_request
    from verm_local.prompts import load_prompt

    gt, preds = images
    sampling = Sampling(
        max_tokens=300,
        temperature=temperature,
        top_p=0.8,
        top_k=20,
        presence_penalty=1.5,
        repeat_penalty=1.05,
        seed=7,
    )
    with Judge(
        str(tiny_gguf / "model-Q8_0.gguf"),
        vision="gguf",
        image_tokens=64,
        max_tokens=300,
        parallel=2,
        prefix_cache=1,
    ) as j:
        imgs = [j.prepare(gt), j.prepare(preds[1])]
        texts = {}
        for short in (True, False):
            monkeypatch.setattr(TokenSampler, "shortlist", short)
            out = j.generate_all(
                [build_request(*imgs, CHART, sampling=sampling, max_errors=2).request]
            )
            texts[short] = out[0].text
            single = j.backend.generate(
                imgs,
                load_prompt(CHART, None),
                sampling,
                answer_schema(CHART, 300, 2),
            )
            assert single.text == out[0].text
        assert texts[True] == texts[False]
        assert out[0].completion_tokens > 20


def test_judge_pairs_batch_mode(tiny_gguf, images, tmp_path):
    gt, preds = images
    other = draw_chart(tmp_path / "gt2.png", [1, 2, 3, 4])
    rows = [
        {"gt": str(gt), "pred": str(preds[0]), "id": "a"},
        {"gt": str(other), "pred": str(preds[1]), "id": "b"},
        {"gt": str(gt), "pred": str(preds[2]), "id": "c", "task": "chart"},
        {"gt_img_path": "gt2.png", "pred_img_path": str(preds[3]), "id": "d", "category": "chart"},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "judge",
        "--pairs",
        src,
        "--out",
        out,
        "-m",
        tiny_gguf / "model-Q8_0.gguf",
        "--vision",
        "gguf",
        "--image-tokens",
        "64",
        "--max-errors",
        "2",
        "--max-tokens",
        "400",
        "--parallel",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    assert "judged 4/4 pairs" in proc.stderr
    assert proc.stdout == ""  # with --out the judgements go to the file only
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", "b", "c", "d"]
    assert all(0 <= g["rm_reward"] <= 1 and g["reward"] == 1 + g["rm_reward"] for g in got)
    # -q: nothing but errors (the pairs are in the file already: resumed, none judged again)
    flags = ["-m", tiny_gguf / "model-Q8_0.gguf", "--vision", "gguf", "--image-tokens", "64",
             "--max-errors", "2", "--max-tokens", "400", "--parallel", "4"]  # fmt: skip
    proc = run_cli("judge", "--pairs", src, "--out", out, *flags, "-q")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    # Without --out the judgements are the result, on stdout (with -q too), in file order.
    proc = run_cli("judge", "--pairs", src, *flags, "-q")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert [json.loads(ln)["id"] for ln in proc.stdout.splitlines()] == ["a", "b", "c", "d"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"gt": "missing.png", "pred": "x.png"}\n')
    proc = run_cli("judge", "--pairs", bad, "-m", tiny_gguf / "model-Q8_0.gguf")
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reward_client_retries_and_scores(server, images, tmp_path):
    from verm_local.client import RewardClient
    from verm_local.constants import MIN_REWARD

    gt, preds = images
    dead = f"http://127.0.0.1:{_port()}"
    rc = RewardClient([dead, server.base], api_key="k", retries=1, timeout=300, max_errors=2)
    j = rc.judge(gt, preds[0])
    assert 0 <= j.score <= 1 and j.reward == pytest.approx(1 + j.rm_reward)
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.bar(['a', 'b', 'c', 'd'], [3, 5, 2, 6])\nplt.title('Sales 2024')\n"
    )
    # The authors' recipe: a rendered chart or SVG earns 1 plus the judge's clipped term.
    score = rc.compute_score("chart2code", f"```python\n{code}```", str(gt))
    assert 1 <= score <= 2
    assert rc.compute_score("chart", "```python\nraise SystemExit(3)\n```", str(gt)) == MIN_REWARD
    assert rc.compute_score("chart", "no code here", str(gt)) == MIN_REWARD
    assert (
        rc.compute_score(
            "chart", "```python\nwhile True: pass\n```", str(gt), {"render_timeout": 2}
        )
        == MIN_REWARD
    )
    assert (
        rc.compute_score(
            "svg", '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"></svg>', str(gt)
        )
        == MIN_REWARD
    )
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        '<rect x="8" y="8" width="30" height="40" fill="red"/></svg>'
    )
    assert 1 <= rc.compute_score("icon2svg", svg, str(gt)) <= 2


def test_vllm_command_line(tiny_hf, tiny_gguf):
    from verm_local.server import ServeConfig, vllm_command

    proc = run_cli(
        "serve",
        "--engine",
        "vllm",
        "--dry-run",
        "-m",
        tiny_hf,
        "--parallel",
        "16",
        "--api-key",
        "s3",
        "--port",
        "9001",
    )
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:3] == ["vllm", "serve", str(tiny_hf)]
    for flag, value in (
        ("--max-num-seqs", "16"),
        ("--port", "9001"),
        ("--api-key", "s3"),
        ("--dtype", "bfloat16"),
        ("--host", "127.0.0.1"),
    ):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--limit-mm-per-prompt" in cmd and "--enable-prefix-caching" in cmd
    gptq = vllm_command("/m/gptq-int4", ServeConfig(), quant="gptq-int4")
    assert gptq[gptq.index("--quantization") + 1] == "gptq_marlin" and "--dtype" not in gptq
    proc = run_cli("serve", "--engine", "vllm", "--dry-run", "-m", tiny_gguf / "model-Q8_0.gguf")
    assert proc.returncode == 2 and "not GGUF" in proc.stderr


def test_metrics_parse_with_prometheus_client(server):
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics"))}
    for name in (
        "verm_requests",
        "verm_request_seconds",
        "verm_queue_depth",
        "verm_in_flight",
        "verm_prefix_cache_hits",
        "verm_batches",
        "verm_worker_restarts",
        "verm_context_tokens",
        "verm_context_grows",
    ):
        assert name in families, sorted(families)
    assert families["verm_requests"].type == "counter"
    assert families["verm_request_seconds"].type == "histogram"


def test_response_format_bounds_are_enforced_or_refused(server, images):
    """A client's integer minimum/maximum is enforced (the grammar allows only 1..3);
    keywords the server cannot enforce are refused with 400 naming them, never loosened."""
    gt, preds = images
    schema = {
        "type": "object",
        "properties": {
            "severity": {"type": "integer", "minimum": 1, "maximum": 3},
            "note": {"type": "string", "maxLength": 12},
        },
        "required": ["severity", "note"],
    }

    def ask(s, seed=0):
        body = {
            "messages": _rl_message(gt, preds[0]),
            "max_tokens": 60,
            "temperature": 1.5,
            "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": s}},
        }
        return server.request("POST", "/v1/chat/completions", json.dumps(body).encode())

    for seed in range(3):
        code, out = ask(schema, seed)
        assert code == 200, out
        answer = json.loads(out["choices"][0]["message"]["content"])
        assert answer["severity"] in (1, 2, 3)
    for keyword, sub in (
        ("minimum", {"type": "number", "minimum": 0.5}),
        ("multipleOf", {"type": "integer", "multipleOf": 2}),
        ("exclusiveMaximum", {"type": "integer", "exclusiveMaximum": 9}),
    ):
        code, out = ask({"type": "object", "properties": {"x": sub}, "required": ["x"]})
        assert code == 400 and keyword in out["error"]["message"], out
        assert out["error"]["param"] == "response_format"
