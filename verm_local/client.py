"""Reward client for RL trainers: spread judgements over verm-local or vLLM servers, and
compute the authors' reward per task.

    from verm_local.client import RewardClient
    rc = RewardClient(["http://gpu0:8000/v1", "http://gpu1:8000/v1"])
    rc.judge(gt_png, pred_png, task="chart").reward
    rc.compute_score("chart2code", response_text, "gt.png")   # extract, render, judge

A verm-local endpoint is asked on /v1/judge; a vLLM endpoint (no /v1/judge) on
/v1/chat/completions with the task's exact request (`judge.build_request`: the authors'
message layout, images prepared and encoded as they send them, their decoding), and its
answer is read here, asked again by the judge's one retry policy (a sampled answer that is
unreadable or cut at the cap: the next seed, two answers in all). A failed request
(connection error, timeout, 429, 5xx) is tried on the next endpoint after an exponential
backoff that honours a server's Retry-After (`net.py`).

`compute_score` follows the authors' RL reward (`reward.py`, README): chart and svg take the
last ```python / ```svg block of the response (or a bare <svg>), render it (matplotlib;
cairosvg at 336x336 on white), and give `render_fail` (0.0) for no code, a failed render
or an all-white one, else 1 + clip(1 - S/50, 0, 1); table renders the response as HTML
(Chromium) and gives -S, or -4 on any failure."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

from . import net
from .errors import EndpointError, InputError, RenderError, VermError
from .images import data_url
from .judge import ANSWER_TRIES
from .render import extract_code, render_prediction
from .reward import with_settings
from .schema import Judgement, extract_json
from .tasks import TaskProfile, decoding, profile

__all__ = ["EndpointError", "RenderError", "RewardClient", "extract_code", "render_prediction"]


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
        tries: int = ANSWER_TRIES,
        policy: net.RetryPolicy | None = None,
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
        # The wait between tries (a failed endpoint, 429, 5xx): the package's policy.
        self.policy = policy or net.DEFAULT_POLICY
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self._kind: dict[str, str] = {}  # endpoint -> "verm" | "openai"
        self._openai: dict[str, Any] = {}

    # -- HTTP -----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _client(self, endpoint: str) -> Any:
        """The openai client of an OpenAI-compatible endpoint; it does not retry by itself:
        `judge` moves to the next endpoint, with the package's backoff."""
        with self._lock:
            if endpoint not in self._openai:
                self._openai[endpoint] = net.openai_client(
                    endpoint, self.api_key, timeout=self.timeout, policy=net.NO_RETRY
                )
            return self._openai[endpoint]

    def _once(
        self, endpoint: str, gt: bytes, pred: bytes, p: TaskProfile, overrides: dict[str, Any]
    ) -> Judgement:
        if self._kind.get(endpoint, "verm") == "verm":
            r = net.request(
                "POST",
                endpoint + "/judge",
                json={
                    "gt": data_url(gt),
                    "pred": data_url(pred),
                    "task": p.name,
                    "sampling": self.sampling,
                    "max_errors": self.max_errors,
                    **overrides,
                },
                headers=self._headers(),
                timeout=self.timeout,
                policy=net.NO_RETRY,
            )
            if r.status_code != 404:
                r.raise_for_status()
                return Judgement.model_validate(r.json())
            self._kind[endpoint] = "openai"  # a vLLM server: no /v1/judge
        return self._chat(endpoint, gt, pred, p, overrides)

    def _chat(
        self, endpoint: str, gt: bytes, pred: bytes, p: TaskProfile, overrides: dict[str, Any]
    ) -> Judgement:
        """The authors' own request to an OpenAI-compatible server, read here; asked again
        by the judge's one retry policy (`judge.answer_tries`)."""
        from .judge import answer_tries, build_request, retry_sampling, worth_retrying

        sampling = decoding(p, self.sampling).with_(**_sampling_fields(overrides))
        jr = build_request(gt, pred, p, sampling=sampling, free=True, warn=False)
        messages = jr.messages_with(
            lambda img: {"type": "image_url", "image_url": {"url": data_url(img)}}
        )
        client = self._client(endpoint)
        model = self.model or client.models.list().data[0].id
        problem, judgement = "", None
        for attempt in range(answer_tries(jr.request.sampling, self.tries)):
            s = retry_sampling(jr.request.sampling, attempt)
            extra: dict[str, Any] = {}
            if s.top_k > 0:
                extra["top_k"] = s.top_k
            if s.repeat_penalty != 1.0:
                extra["repetition_penalty"] = s.repeat_penalty
            out = client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                presence_penalty=s.presence_penalty,
                seed=s.seed,
                extra_body=extra or None,
            )
            choice = out.choices[0]
            if choice.finish_reason == "length":
                problem, judgement = f"the answer was cut at {s.max_tokens} tokens", None
            else:
                try:
                    judgement = Judgement.from_answer(
                        p,
                        extract_json(choice.message.content or ""),
                        reward_scale=self.reward_scale,
                        prompt_source=jr.prompt.source,
                    )
                except VermError as exc:
                    problem, judgement = str(exc), None
            if not worth_retrying(judgement):
                return judgement
        return Judgement.failed(
            p, problem, reward_scale=self.reward_scale, prompt_source=jr.prompt.source
        )

    def judge(
        self,
        gt: str | Path | bytes,
        pred: str | Path | bytes,
        task: str | TaskProfile = "chart",
        **overrides: Any,
    ) -> Judgement:
        """Judge one pair on some endpoint; a failed connection, 429 or 5xx is tried again
        on the next endpoint after the package's backoff (a server's Retry-After
        honoured). `overrides`: sampling fields (temperature, top_p, top_k,
        presence_penalty, repetition_penalty, seed, max_tokens) over the task's decoding."""
        p = profile(task)
        gt_b = gt if isinstance(gt, bytes) else Path(gt).read_bytes()
        pred_b = pred if isinstance(pred, bytes) else Path(pred).read_bytes()
        tries = len(self.endpoints) * (self.retries + 1)
        last = ""
        for attempt in range(tries):
            with self._lock:
                endpoint = self.endpoints[next(self._next)]
            try:
                return self._once(endpoint, gt_b, pred_b, p, overrides)
            except Exception as exc:  # noqa: BLE001 - sorted into retry or fail just below
                wait = _retry_wait(exc)
                if wait is False:
                    raise EndpointError(f"{endpoint}: {_describe(exc)}") from None
                last = f"{endpoint}: {_describe(exc)}"
            if attempt + 1 < tries:
                net.sleep(self.policy.delay(attempt // len(self.endpoints), wait))
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


def _retry_wait(exc: Exception) -> float | None | bool:
    """False when `exc` is not worth another try (a 4xx other than 429, a bad answer);
    else the seconds a Retry-After asks for, or None (the policy's backoff)."""
    import httpx
    import openai

    if isinstance(exc, httpx.HTTPStatusError):
        if not net.retryable_status(exc.response.status_code):
            return False
        return net.retry_after(exc.response)
    if isinstance(exc, openai.APIStatusError):
        if not net.retryable_status(exc.status_code):
            return False
        return net.retry_after(exc.response)
    if isinstance(exc, (httpx.TransportError, openai.APIConnectionError)):
        return None
    if isinstance(exc, (ValueError, KeyError, IndexError, TypeError)):
        return None  # a garbled answer from a server in trouble
    return False


def _describe(exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return net.error_message(exc)
    return f"{exc.__class__.__name__}: {exc}"


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
