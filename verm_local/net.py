"""One HTTP client for the package: a shared httpx connection pool with timeouts, and one
retry policy for what is worth retrying (a connection that failed or timed out, 429 and
5xx answers): exponential backoff with jitter, a `Retry-After` the server sends honoured.

Calls that are OpenAI calls (a matcher, a policy model, a vLLM judge) go through the
`openai` client instead (`openai_client`), which applies the same rule itself."""

from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from .errors import FetchError, TooLargeError

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait: attempt k (from 0) waits `base_s * 2**k` seconds,
    at most `max_s`, times a jitter in [0.5, 1]; a server's Retry-After wins (up to
    `max_s`)."""

    retries: int = 3
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_s))
        return min(self.max_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_POLICY = RetryPolicy()
NO_RETRY = RetryPolicy(retries=0)

# Tests replace it to count the waits without spending them.
sleep: Callable[[float], None] = time.sleep


def retry_after(response: httpx.Response) -> float | None:
    """Seconds a `Retry-After` header asks for (delta seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retryable_status(code: int) -> bool:
    return code in RETRY_STATUS


_lock = threading.Lock()
_client: httpx.Client | None = None


def client() -> httpx.Client:
    """The package's shared client (one connection pool, thread-safe)."""
    global _client
    with _lock:
        if _client is None or _client.is_closed:
            _client = httpx.Client(
                timeout=httpx.Timeout(DEFAULT_TIMEOUT, connect=10.0),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                follow_redirects=True,
                headers={"User-Agent": _user_agent()},
            )
        return _client


def _user_agent() -> str:
    from .constants import package_version

    return f"verm-local/{package_version()}"


def request(
    method: str,
    url: str,
    *,
    json: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> httpx.Response:
    """One request, retried by `policy` on a transport failure, 429 or 5xx. The last
    answer is returned whatever its status (`raise_for_status` is the caller's); the last
    transport failure is raised (httpx.TransportError)."""
    attempt = 0
    while True:
        try:
            r = client().request(
                method,
                url,
                json=json,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError:
            if attempt >= policy.retries:
                raise
            sleep(policy.delay(attempt))
            attempt += 1
            continue
        if retryable_status(r.status_code) and attempt < policy.retries:
            wait = policy.delay(attempt, retry_after(r))
            r.close()
            sleep(wait)
            attempt += 1
            continue
        return r


def post_json(
    url: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Any:
    """POST a JSON body and read a JSON answer; httpx.HTTPStatusError for a non-2xx
    answer after the retries, httpx.TransportError for a failed connection."""
    r = request("POST", url, json=body, headers=headers, timeout=timeout, policy=policy)
    r.raise_for_status()
    return r.json()


def get_json(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Any:
    r = request("GET", url, headers=headers, timeout=timeout, policy=policy)
    r.raise_for_status()
    return r.json()


def get_bytes(
    url: str,
    *,
    max_bytes: int | None = None,
    timeout: float | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> bytes:
    """The body of a GET (retried by `policy`), read in chunks so that more than
    `max_bytes` stops the read: FetchError for any failure, naming the URL."""

    def take(chunks: Any) -> bytes:
        out, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise TooLargeError(f"{url}: over {max_bytes} bytes")
            out.append(chunk)
        return b"".join(out)

    return _stream(url, take, timeout=timeout, policy=policy)


def get_head(
    url: str,
    nbytes: int,
    *,
    headers: dict[str, str] | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> bytes:
    """At most the first `nbytes` of a URL (ask with a Range header; a server that sends
    the whole body is read no further): FetchError for any failure, naming the URL."""

    def take(chunks: Any) -> bytes:
        out, size = [], 0
        for chunk in chunks:
            out.append(chunk)
            size += len(chunk)
            if size >= nbytes:
                break
        return b"".join(out)[:nbytes]

    return _stream(url, take, headers=headers, policy=policy)


def _stream(
    url: str,
    take: Callable[[Any], bytes],
    *,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> bytes:
    """A GET whose body `take` reads from its chunks, retried by `policy` on a transport
    failure, 429 or 5xx; FetchError for any failure left, naming the URL."""
    attempt = 0
    while True:
        try:
            with client().stream(
                "GET",
                url,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            ) as r:
                if retryable_status(r.status_code) and attempt < policy.retries:
                    wait = policy.delay(attempt, retry_after(r))
                else:
                    if r.status_code >= 400:
                        raise FetchError(f"{url}: HTTP {r.status_code}")
                    return take(r.iter_bytes())
        except httpx.TransportError as exc:
            if attempt >= policy.retries:
                raise FetchError(f"{url}: cannot fetch ({exc.__class__.__name__}: {exc})") from None
            wait = policy.delay(attempt)
        except httpx.InvalidURL as exc:
            raise FetchError(f"{url}: not a URL ({exc})") from None
        sleep(wait)
        attempt += 1


def error_message(exc: httpx.HTTPStatusError) -> str:
    """The status and the server's own message (an OpenAI-shaped error body, or text)."""
    r = exc.response
    try:
        body = r.json()
        detail = body["error"]["message"] if isinstance(body.get("error"), dict) else body
    except Exception:  # noqa: BLE001 - any body at all: fall back to its text
        detail = r.text[:200]
    return f"HTTP {r.status_code}: {detail}"


def openai_client(
    base_url: str,
    api_key: str | None = None,
    *,
    timeout: float = 300.0,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Any:
    """The openai client for an OpenAI-compatible endpoint (vLLM, llama-server, Ollama,
    verm-local serve, a cloud API). It retries 429, 5xx and failed connections with
    exponential backoff and honours Retry-After, `policy.retries` times. Servers without
    authentication get a placeholder key."""
    from openai import OpenAI

    return OpenAI(
        base_url=base_url.rstrip("/"),
        api_key=api_key or "none",
        timeout=timeout,
        max_retries=policy.retries,
    )
