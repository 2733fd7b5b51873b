"""Reward client for RL trainers: spread judgements over verm-local or vLLM servers.

    from verm_local.client import RewardClient
    rc = RewardClient(["http://gpu0:8000/v1", "http://gpu1:8000/v1"])
    rc.judge(gt_png, pred_png, task="chart").score
    rc.compute_score("chart", predicted_code, "gt.png")   # render, judge, reward

A verm-local endpoint is asked on /v1/judge; a vLLM endpoint (no /v1/judge) on
/v1/chat/completions with Visual-ERM's own message layout, and its answer is parsed here.
A failed request (connection error, 5xx, 429, timeout) is retried on the next endpoint."""

from __future__ import annotations

import base64
import io
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .constants import MIN_REWARD, TASKS
from .errors import InputError, VermError
from .schema import Judgement, extract_json


class EndpointError(VermError):
    exit_code = 6


def data_url(image: str | Path | bytes) -> str:
    """A PNG/JPEG file or its bytes as a base64 data URL (what vLLM's clients send)."""
    raw = image if isinstance(image, bytes) else Path(image).read_bytes()
    kind = "jpeg" if raw[:3] == b"\xff\xd8\xff" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


class RewardClient:
    def __init__(self, endpoints: list[str], *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 300.0, retries: int = 2,
                 reward_scale: float | None = None, max_errors: int | None = None):
        if not endpoints:
            raise InputError("RewardClient needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.endpoints = [e if e.endswith("/v1") else e + "/v1" for e in self.endpoints]
        self.api_key, self.model, self.timeout = api_key, model, timeout
        self.retries = retries
        self.reward_scale = reward_scale
        self.max_errors = max_errors  # caps the answer on verm-local endpoints
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self._kind: dict[str, str] = {}  # endpoint -> "verm" | "openai"

    # -- HTTP -----------------------------------------------------------------------------

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _once(self, endpoint: str, gt: bytes, pred: bytes, task: str,
              sampling: dict[str, Any]) -> Judgement:
        kind = self._kind.get(endpoint, "verm")
        if kind == "verm":
            try:
                out = self._post(endpoint + "/judge", {"gt": data_url(gt), "pred": data_url(pred),
                                                       "task": task,
                                                       "max_errors": self.max_errors,
                                                       **sampling})
                return Judgement.model_validate(out)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                self._kind[endpoint] = "openai"  # a vLLM server: no /v1/judge
        from .prompts import load_prompt

        content = [{"type": "image_url", "image_url": {"url": data_url(gt)}},
                   {"type": "image_url", "image_url": {"url": data_url(pred)}},
                   {"type": "text", "text": load_prompt(task, None)}]
        out = self._post(endpoint + "/chat/completions",
                         {"model": self.model or self._model_of(endpoint),
                          "messages": [{"role": "user", "content": content}], **sampling})
        text = out["choices"][0]["message"]["content"]
        return Judgement.from_answer(task, extract_json(text), reward_scale=self.reward_scale)

    def _model_of(self, endpoint: str) -> str:
        req = urllib.request.Request(endpoint + "/models")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())["data"][0]["id"]

    def judge(self, gt: str | Path | bytes, pred: str | Path | bytes, task: str = "chart",
              **sampling: Any) -> Judgement:
        """Judge one pair on some endpoint, retrying failures on the others."""
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        gt_b = gt if isinstance(gt, bytes) else Path(gt).read_bytes()
        pred_b = pred if isinstance(pred, bytes) else Path(pred).read_bytes()
        tries = len(self.endpoints) * (self.retries + 1)
        last: Exception | None = None
        for _ in range(tries):
            with self._lock:
                endpoint = self.endpoints[next(self._next)]
            try:
                return self._once(endpoint, gt_b, pred_b, task, sampling)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    raise EndpointError(f"{endpoint}: {exc.code} {_message(exc)}") from None
                last = exc
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                last = exc
        raise EndpointError(f"every endpoint failed ({tries} tries); last: {last}")

    def judge_many(self, pairs: list[tuple[Any, Any, str]], workers: int = 16
                   ) -> list[Judgement | Exception]:
        """Judge pairs concurrently (so a server batches them); errors returned in place."""
        from concurrent.futures import ThreadPoolExecutor

        def one(p):
            try:
                return self.judge(*p)
            except VermError as exc:
                return exc

        with ThreadPoolExecutor(max(1, min(workers, len(pairs)))) as ex:
            return list(ex.map(one, pairs))

    # -- RL reward ---------------------------------------------------------------------------

    def compute_score(self, data_source: str, solution_str: str, ground_truth: Any,
                      extra_info: dict[str, Any] | None = None) -> float:
        """verl-style reward function: render the predicted code, judge it against the
        ground-truth image, return the reward. A render that fails, times out or comes out
        blank gets the minimum reward. `data_source` (or extra_info["task"]) names the task:
        chart (matplotlib Python) or svg."""
        task = (extra_info or {}).get("task") or _task_of(data_source)
        try:
            image = render_prediction(solution_str, task,
                                      timeout=(extra_info or {}).get("render_timeout", 30))
        except RenderError:
            return MIN_REWARD
        return self.judge(ground_truth, image, task).score


class RenderError(Exception):
    pass


def _task_of(data_source: str) -> str:
    s = (data_source or "").lower()
    for task in TASKS:
        if task in s:
            return task
    return "chart"


_MPL_RUNNER = r"""
import sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
code = open(sys.argv[1], encoding="utf-8").read()
plt.savefig = lambda *a, **k: None  # the runner saves the figure itself
plt.show = lambda *a, **k: None
exec(compile(code, "prediction", "exec"), {"__name__": "__main__"})
fig = plt.gcf()
import matplotlib.figure
matplotlib.figure.Figure.savefig(fig, sys.argv[2], format="png", dpi=100)
"""


def render_prediction(code: str, task: str, timeout: float = 30) -> bytes:
    """PNG bytes of predicted code: matplotlib Python (chart) run in a subprocess with a
    timeout, or SVG through cairosvg. Raises RenderError on failure or a blank image."""
    code = _strip_fence(code)
    if task == "svg" or code.lstrip().startswith(("<svg", "<?xml")):
        try:
            import cairosvg

            png = cairosvg.svg2png(bytestring=code.encode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - any SVG failure is a failed render
            raise RenderError(f"svg: {exc}") from None
    elif task == "chart":
        with tempfile.TemporaryDirectory() as d:
            src, out = Path(d, "pred.py"), Path(d, "pred.png")
            src.write_text(code, encoding="utf-8")
            try:
                r = subprocess.run([sys.executable, "-c", _MPL_RUNNER, str(src), str(out)],
                                   cwd=d, capture_output=True, timeout=timeout,
                                   env={"MPLBACKEND": "Agg", "MPLCONFIGDIR": d,
                                        "PATH": "/usr/bin:/bin"})
            except subprocess.TimeoutExpired:
                raise RenderError(f"render timed out after {timeout} s") from None
            if r.returncode != 0 or not out.is_file():
                raise RenderError(r.stderr.decode(errors="replace")[-300:])
            png = out.read_bytes()
    else:
        raise RenderError(f"no renderer for task {task!r} (chart and svg are rendered)")
    if _blank(png):
        raise RenderError("blank render")
    return png


def _strip_fence(code: str) -> str:
    s = code.strip()
    if s.startswith("```"):
        s = s.split("\n", 1)[1] if "\n" in s else ""
        s = s.rsplit("```", 1)[0]
    return s


def _blank(png: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            lo, hi = zip(*im.convert("RGB").getextrema())
    except OSError:
        return True
    return all(a == b for a, b in zip(lo, hi))


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except Exception:  # noqa: BLE001
        return exc.reason
