"""API bodies to worker jobs: images decoded and checked (size 413, content 400), sampling
fields checked and capped, a client's JSON schema turned into grammar text (or refused
with 400 naming the keyword), the judge's task decoding resolved."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from ..backends.grammar import json_schema_grammar
from ..decoding import Sampling
from ..errors import InputError
from ..tasks import decoding, profile
from .config import ServeConfig
from .errors import APIError
from .types import ChatCompletionRequest, CritiqueRequest, ImageURL, JudgeRequest, SamplingFields


def decode_image(url: Any, cfg: ServeConfig) -> bytes:
    """Bytes of an image part: a data URL (or bare base64); remote URLs and local paths
    only when enabled."""
    if isinstance(url, ImageURL):
        url = url.url
    if not isinstance(url, str) or not url:
        raise APIError(400, "an image part needs a URL")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise APIError(400, "image data URLs must be base64-encoded")
        raw = _b64(data, cfg)
    elif url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise APIError(
                400,
                "remote image URLs are refused (start the server with "
                "--allow-remote-images to fetch them)",
            )
        raw = _fetch(url, cfg)
    elif url.startswith("file://") or url.startswith("/"):
        if not cfg.allow_local_images:
            raise APIError(
                400,
                "local image paths are refused (start the server with "
                "--allow-local-images to read them)",
            )
        path = Path(url.removeprefix("file://"))
        try:
            if path.stat().st_size > cfg.max_image_bytes:
                raise APIError(413, f"image over {cfg.max_image_bytes} bytes")
            raw = path.read_bytes()
        except OSError:
            raise APIError(400, f"{path}: cannot read the image") from None
    else:
        raw = _b64(url, cfg)
    _check_image(raw)
    return raw


def _b64(data: str, cfg: ServeConfig) -> bytes:
    if len(data) * 3 // 4 > cfg.max_image_bytes + 3:
        raise APIError(413, f"image over {cfg.max_image_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "bad base64 in an image") from None


def _fetch(url: str, cfg: ServeConfig) -> bytes:
    """A remote image (the package's HTTP client), read no further than the size limit."""
    from ..errors import FetchError, TooLargeError
    from ..net import get_bytes

    try:
        return get_bytes(url, max_bytes=cfg.max_image_bytes, timeout=30)
    except TooLargeError:
        raise APIError(413, f"image over {cfg.max_image_bytes} bytes") from None
    except FetchError as exc:
        raise APIError(400, f"cannot fetch the image: {exc}") from None


def _check_image(raw: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, "an image part is not a readable image") from None


def _sampling(body: SamplingFields, base: Sampling, cap: int) -> dict[str, Any]:
    """`base` with the body's fields over it, the answer capped at the server's cap."""
    max_tokens = body.max_completion_tokens or body.max_tokens or base.max_tokens
    if body.top_k is not None and body.top_k < -1:
        raise APIError(400, "top_k must be -1 (off) or more", param="top_k")
    s = base.with_(
        max_tokens=min(max_tokens, cap),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0) if body.top_k is not None else None,
        presence_penalty=body.presence_penalty,
        repeat_penalty=body.repetition_penalty,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    return s.to_dict()


def chat_job(body: ChatCompletionRequest, cfg: ServeConfig) -> dict[str, Any]:
    """A chat completion request -> a worker job (images decoded, parts normalised)."""
    images: list[bytes] = []
    norm = []
    for m in body.messages:
        if isinstance(m.content, str):
            norm.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for p in m.content:
            if p.type == "text" and isinstance(p.text, str):
                parts.append({"type": "text", "text": p.text})
            elif p.type in ("image_url", "image") and (p.image_url or p.image) is not None:
                images.append(decode_image(p.image_url or p.image, cfg))
                parts.append({"type": "image"})
            else:
                raise APIError(
                    400, f"unsupported content part {p.type!r} (text and image_url are understood)"
                )
        norm.append({"role": m.role, "content": parts})
    return {
        "kind": "chat",
        "messages": norm,
        "images": images,
        "grammar": _grammar(body),
        "sampling": _sampling(body, Sampling(), cfg.answer_cap),
    }


def _grammar(body: ChatCompletionRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        if not isinstance(schema, dict):
            raise APIError(
                400, "response_format.json_schema.schema must be an object", param="response_format"
            )
    else:
        schema = fmt.schema_ if isinstance(fmt.schema_, dict) else {"type": "object"}
    try:
        return json_schema_grammar(schema)
    except InputError as exc:
        raise APIError(400, str(exc), param="response_format") from None


def critique_job(body: CritiqueRequest, cfg: ServeConfig) -> tuple[dict[str, Any] | None, Any]:
    """A /v1/critique request: its code rendered in the sandbox (or its image decoded),
    then a judge job; (the job, None), or (None, the render error's message) when the
    code does not render."""
    from ..errors import RenderError
    from ..render import render_code

    try:
        p = profile(body.task)
    except InputError as exc:
        raise APIError(400, str(exc), param="task") from None
    if (body.code is None) == (body.pred is None):
        raise APIError(400, "give either code (rendered here) or pred (its rendered image)")
    if body.code is not None:
        try:
            pred = render_code(body.code, p.name, unsafe=cfg.unsafe_render)
        except RenderError as exc:
            return None, str(exc)
        job = judge_job(
            JudgeRequest(**{**body.model_dump(exclude={"code", "pred"}), "pred": _data(pred)}),
            cfg,
        )
    else:
        job = judge_job(JudgeRequest(**body.model_dump(exclude={"code"})), cfg)
    return job, None


def _data(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def judge_job(body: JudgeRequest, cfg: ServeConfig) -> dict[str, Any]:
    """A /v1/judge request -> a worker job: the task's own decoding (mode `sampling`),
    the body's sampling fields over it."""
    try:
        p = profile(body.task)
    except InputError as exc:
        raise APIError(400, str(exc), param="task") from None
    base = decoding(p, body.sampling)
    return {
        "kind": "judge",
        "profile": p,
        "free": body.free,
        "max_errors": body.max_errors,
        "gt": decode_image(body.gt, cfg),
        "pred": decode_image(body.pred, cfg),
        "sampling": _sampling(body, base, min(cfg.answer_cap, base.max_tokens)),
    }
