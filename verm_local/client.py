"""Reward client for RL trainers: spread judgements over verm-local or vLLM servers, and
compute the authors' reward per task.

    from verm_local.client import RewardClient
    rc = RewardClient(["http://gpu0:8000/v1", "http://gpu1:8000/v1"])
    rc.judge(gt_png, pred_png, task="chart").reward
    rc.compute_score("chart2code", response_text, "gt.png")   # extract, render, judge

A verm-local endpoint is asked on /v1/judge; a vLLM endpoint (no /v1/judge) on
/v1/chat/completions with the task's exact request (`judge.build_request`: the authors'
message layout, images prepared and encoded as they send them, their decoding), and its
answer is read here, asked again once when unreadable. A failed request (connection
error, 5xx, 429, timeout) is retried on the next endpoint.

`compute_score` follows the authors' RL reward (`reward.py`, README): chart and svg take the
last ```python / ```svg block of the response (or a bare <svg>), render it (matplotlib;
cairosvg at 336x336 on white), and give `render_fail` (0.0) for no code, a failed render
or an all-white one, else 1 + clip(1 - S/50, 0, 1); table renders the response as HTML
(Chromium) and gives -S, or -4 on any failure."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .errors import EndpointError, InputError, RenderError, VermError
from .render import RENDER_TIMEOUTS, run_renderer
from .reward import with_settings
from .schema import Judgement, extract_json
from .tasks import TaskProfile, decoding, profile

__all__ = ["EndpointError", "RenderError", "RewardClient", "extract_code", "render_prediction"]


def data_url(image: str | Path | bytes, media_type: str | None = None) -> str:
    """A PNG/JPEG file or its bytes as a base64 data URL (what vLLM's clients send)."""
    raw = image if isinstance(image, bytes) else Path(image).read_bytes()
    kind = media_type or ("image/jpeg" if raw[:3] == b"\xff\xd8\xff" else "image/png")
    return f"data:{kind};base64," + base64.b64encode(raw).decode()


class RewardClient:
    def __init__(
        self,
        endpoints: list[str],
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 300.0,
        retries: int = 2,
        reward_scale: float | None = None,
        max_errors: int | None = None,
        sampling: str = "rl",
        tries: int = 2,
    ):
        if not endpoints:
            raise InputError("RewardClient needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.endpoints = [e if e.endswith("/v1") else e + "/v1" for e in self.endpoints]
        self.api_key, self.model, self.timeout = api_key, model, timeout
        self.retries = retries
        self.reward_scale = reward_scale
        self.max_errors = max_errors  # caps the answer on verm-local endpoints
        self.sampling = sampling  # the task's decoding: rl (the authors'), default, greedy
        self.tries = tries  # answers asked for before an unreadable one counts as failed
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self._kind: dict[str, str] = {}  # endpoint -> "verm" | "openai"

    # -- HTTP -----------------------------------------------------------------------------

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _once(
        self, endpoint: str, gt: bytes, pred: bytes, p: TaskProfile, overrides: dict[str, Any]
    ) -> Judgement:
        if self._kind.get(endpoint, "verm") == "verm":
            try:
                out = self._post(
                    endpoint + "/judge",
                    {
                        "gt": data_url(gt),
                        "pred": data_url(pred),
                        "task": p.name,
                        "sampling": self.sampling,
                        "max_errors": self.max_errors,
                        **overrides,
                    },
                )
                return Judgement.model_validate(out)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                self._kind[endpoint] = "openai"  # a vLLM server: no /v1/judge
        return self._chat(endpoint, gt, pred, p, overrides)

    def _chat(
        self, endpoint: str, gt: bytes, pred: bytes, p: TaskProfile, overrides: dict[str, Any]
    ) -> Judgement:
        """The authors' own request to an OpenAI-compatible server, read here."""
        from .judge import build_request

        sampling = decoding(p, self.sampling).with_(**_sampling_fields(overrides))
        jr = build_request(gt, pred, p, sampling=sampling, free=True, warn=False)
        messages = jr.messages_with(
            lambda img: {
                "type": "image_url",
                "image_url": {"url": data_url(img.encoded or b"", img.media_type)},
            }
        )
        s = jr.request.sampling
        body: dict[str, Any] = {
            "model": self.model or self._model_of(endpoint),
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "presence_penalty": s.presence_penalty,
            "seed": s.seed,
        }
        if s.top_k > 0:
            body["top_k"] = s.top_k
        if s.repeat_penalty != 1.0:
            body["repetition_penalty"] = s.repeat_penalty
        problem = ""
        for _ in range(max(1, self.tries)):
            out = self._post(endpoint + "/chat/completions", body)
            choice = out["choices"][0]
            if choice.get("finish_reason") == "length":
                problem = f"the answer was cut at {s.max_tokens} tokens"
                continue
            try:
                return Judgement.from_answer(
                    p,
                    extract_json(choice["message"]["content"]),
                    reward_scale=self.reward_scale,
                    prompt_source=jr.prompt.source,
                )
            except VermError as exc:
                problem = str(exc)
        return Judgement.failed(
            p, problem, reward_scale=self.reward_scale, prompt_source=jr.prompt.source
        )

    def _model_of(self, endpoint: str) -> str:
        req = urllib.request.Request(endpoint + "/models")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())["data"][0]["id"]

    def judge(
        self,
        gt: str | Path | bytes,
        pred: str | Path | bytes,
        task: str | TaskProfile = "chart",
        **overrides: Any,
    ) -> Judgement:
        """Judge one pair on some endpoint, retrying failures on the others. `overrides`:
        sampling fields (temperature, top_p, top_k, presence_penalty, repetition_penalty,
        seed, max_tokens) over the task's decoding."""
        p = profile(task)
        gt_b = gt if isinstance(gt, bytes) else Path(gt).read_bytes()
        pred_b = pred if isinstance(pred, bytes) else Path(pred).read_bytes()
        tries = len(self.endpoints) * (self.retries + 1)
        last: Exception | None = None
        for _ in range(tries):
            with self._lock:
                endpoint = self.endpoints[next(self._next)]
            try:
                return self._once(endpoint, gt_b, pred_b, p, overrides)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    raise EndpointError(f"{endpoint}: {exc.code} {_message(exc)}") from None
                last = exc
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                last = exc
        raise EndpointError(f"every endpoint failed ({tries} tries); last: {last}")

    def judge_many(
        self, pairs: list[tuple[Any, Any, str]], workers: int = 16
    ) -> list[Judgement | Exception]:
        """Judge pairs concurrently (so a server batches them); errors returned in place."""
        from concurrent.futures import ThreadPoolExecutor

        def one(p: tuple[Any, Any, str]) -> Judgement | Exception:
            try:
                return self.judge(*p)
            except VermError as exc:
                return exc

        with ThreadPoolExecutor(max(1, min(workers, len(pairs)))) as ex:
            return list(ex.map(one, pairs))

    # -- RL reward ---------------------------------------------------------------------------

    def compute_score(
        self,
        data_source: str,
        solution_str: str,
        ground_truth: Any,
        extra_info: dict[str, Any] | None = None,
    ) -> float:
        """verl-style reward function: the authors' reward for `solution_str` (the policy's
        response) against the ground-truth image. `data_source` (or extra_info["task"])
        names the task: chart (chart2code), svg (icon2svg) or table."""
        extra = extra_info or {}
        p = profile(extra.get("task") or task_of(data_source))
        recipe = with_settings(p.reward, self.reward_scale)
        gt = extra.get("gt_img_path") or ground_truth
        try:
            image = render_prediction(solution_str, p.name, timeout=extra.get("render_timeout"))
        except RenderError:
            return recipe.unrendered()
        return self.judge(gt, image, p).reward


def task_of(data_source: str) -> str:
    """The task a verl data source names (chart2code -> chart, icon2svg -> svg, ...)."""
    s = (data_source or "").lower()
    for key, task in (("table", "table"), ("svg", "svg"), ("chart", "chart")):
        if key in s:
            return task
    raise InputError(
        f"cannot tell the task of data source {data_source!r}; pass "
        "extra_info={'task': 'chart' | 'table' | 'svg'}"
    )


def _sampling_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    names = {"repetition_penalty": "repeat_penalty"}
    keep = {
        "temperature",
        "top_p",
        "top_k",
        "presence_penalty",
        "repetition_penalty",
        "seed",
        "max_tokens",
    }
    return {names.get(k, k): v for k, v in overrides.items() if k in keep}


# ---------------------------------------------------------------- rendering predictions

_BLOCK = re.compile(r"```([a-zA-Z0-9_+-]+)\s*(.*?)\s*```", re.DOTALL)
_SVG = re.compile(r"<svg[^>]*>.*", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> tuple[str, str] | None:
    """(language, code) of a response, as the authors' RL reads it: the last ```python or
    ```svg block with code in it, else a bare <svg ...> to the end (an unclosed tag cut,
    </svg> added when missing); None when there is no code."""
    for m in reversed(list(_BLOCK.finditer(text or ""))):
        lang, code = m.group(1).strip().lower(), m.group(2).strip()
        if lang in ("python", "svg") and code:
            return lang, code
    m = _SVG.search(text or "")
    if m:
        svg = re.sub(r"<[^>]*$", "", m.group(0))
        if not svg.strip().endswith("</svg>"):
            svg += "</svg>"
        return "svg", svg
    return None


# The page a predicted table is rendered in (the authors' styling: white page with a
# 20 px margin, collapsed 1 px borders, Arial 14 px, cells padded 6 x 10 px).
_TABLE_PAGE = """<html><head><meta charset="utf-8"><style>
body {{ background: white; margin: 20px; }}
table {{ border-collapse: collapse; font-family: Arial, sans-serif; font-size: 14px; }}
td {{ border: 1px solid #333; padding: 6px 10px; }}
</style></head><body>
{body}
</body></html>
"""
TABLE_WINDOW = (3600, 2400)


def render_prediction(response: str, task: str, timeout: float | None = None) -> bytes:
    """PNG bytes of a policy's response rendered as the authors' RL does for `task`;
    RenderError when there is no code, the render fails or times out, or comes out
    all white. Matplotlib and cairosvg run in a child process with a timeout."""
    if task == "table":
        png = _render_html(response, timeout or RENDER_TIMEOUTS["html"])
    else:
        found = extract_code(response)
        if found is None:
            raise RenderError("no ```python or ```svg code in the response")
        lang, code = found
        png = run_renderer(lang, code, timeout)
    if all_white(png):
        raise RenderError("the render is all white")
    return png


def browser() -> str:
    """The Chromium/Chrome that renders tables: VERM_LOCAL_BROWSER, else one on PATH."""
    from .settings import settings

    chosen = settings().browser
    if chosen:
        return chosen
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return name
    raise VermError(
        "rendering a predicted table needs Chromium or Chrome (apt-get install "
        "chromium), or VERM_LOCAL_BROWSER=/path/to/chrome"
    )


def _render_html(html: str, timeout: float) -> bytes:
    exe = browser()
    with tempfile.TemporaryDirectory() as d:
        page, out = Path(d, "table.html"), Path(d, "table.png")
        page.write_text(_TABLE_PAGE.format(body=html), encoding="utf-8")
        w, h = TABLE_WINDOW
        cmd = [
            exe,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={d}/profile",
            f"--window-size={w},{h}",
            f"--screenshot={out}",
            page.as_uri(),
        ]
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RenderError(f"table render timed out after {timeout:g} s") from None
        except OSError as exc:
            raise VermError(f"{exe}: cannot run the browser ({exc})") from None
        if not out.is_file() or out.stat().st_size == 0:
            raise RenderError("the browser wrote no screenshot")
        return out.read_bytes()


def all_white(png: bytes) -> bool:
    """Every pixel white (in grey levels), or not an image at all."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            lo, hi = im.convert("L").getextrema()
    except OSError:
        return True
    return lo == 255


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except Exception:  # noqa: BLE001
        return exc.reason
