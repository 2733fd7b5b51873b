"""The hub, as verm-local talks to it: huggingface_hub calls with the package's retry
policy and one error line per failure (typed by huggingface_hub's errors), repository
listings with LFS metadata, small JSON files, and the integrity check of a download
(sha256 against what the repository states and its LFS metadata)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .errors import FetchError, VermError, first_line
from .fileio import sha256_file
from .settings import hub_endpoint, hub_offline_now

_log = logging.getLogger("verm_local.store")


def offline() -> bool:
    """HF_HUB_OFFLINE as the environment says it now, or as huggingface_hub read it at
    import (settings.hub_endpoint says why both)."""
    from huggingface_hub.constants import is_offline_mode

    return is_offline_mode() or hub_offline_now()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: what the hub reports for files not stored in LFS."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def root_cause(exc: BaseException) -> BaseException:
    """The HTTP or connection error behind a huggingface_hub error: hf_hub_download
    reports a server error or a lost connection as LocalEntryNotFoundError (nothing in
    the cache to fall back on), with the real failure as its cause."""
    import httpx
    from huggingface_hub import errors as hub

    seen = exc
    while seen is not None:
        if isinstance(seen, (hub.HfHubHTTPError, httpx.TransportError)) and seen is not exc:
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def hub_error(exc: Exception, repo: str) -> VermError:
    """One line for a huggingface_hub failure, told apart by its type."""
    from huggingface_hub import errors as hub

    if isinstance(exc, hub.LocalEntryNotFoundError):
        cause = root_cause(exc)
        if cause is not exc:
            return hub_error(cause, repo)  # type: ignore[arg-type]
    if isinstance(exc, hub.GatedRepoError):  # a subclass of RepositoryNotFoundError
        return FetchError(f"{repo} is gated: accept its terms on the hub and set HF_TOKEN")
    if isinstance(exc, hub.RepositoryNotFoundError):
        return FetchError(f"repository {repo} not found on the hub (or it needs HF_TOKEN)")
    if isinstance(exc, hub.RevisionNotFoundError):
        return FetchError(f"{repo}: revision not found")
    if isinstance(exc, hub.EntryNotFoundError):
        return FetchError(f"{repo}: a file it lists is not there ({first_line(exc)})")
    if isinstance(exc, (hub.OfflineModeIsEnabled, hub.LocalEntryNotFoundError)):
        return FetchError("HF_HUB_OFFLINE is set (or the hub is unreachable); nothing was fetched")
    if isinstance(exc, hub.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return FetchError(f"cannot download from {repo}: HTTP {status} ({first_line(exc)})")
    return FetchError(f"cannot download from {repo}: {first_line(exc)}")


def hub_call(repo: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A huggingface_hub call, tried again with the package's backoff (a Retry-After
    honoured) when the hub answers 429 or 5xx or the connection fails; any failure left
    is one FetchError line (exit 6), and the caller stores nothing."""
    import httpx
    from huggingface_hub import errors as hub

    from . import net

    policy = net.DEFAULT_POLICY
    for attempt in range(policy.retries + 1):
        try:
            try:
                return fn(*args, **kwargs)
            except hub.LocalEntryNotFoundError as exc:
                cause = root_cause(exc)
                if cause is exc or offline():
                    raise
                raise cause from None
        except hub.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            final = attempt == policy.retries or not net.retryable_status(status)
            if final or isinstance(exc, (hub.RepositoryNotFoundError, hub.EntryNotFoundError)):
                raise hub_error(exc, repo) from None
            wait = net.retry_after(exc.response) if exc.response is not None else None
        except (httpx.TransportError, ConnectionError, TimeoutError) as exc:
            if attempt == policy.retries:
                raise hub_error(exc, repo) from None
            wait = None
        except Exception as exc:  # noqa: BLE001 - every other hub failure is one line
            raise hub_error(exc, repo) from None
        _log.info(
            "%s: the hub did not answer; trying again (%d/%d)", repo, attempt + 1, policy.retries
        )
        net.sleep(policy.delay(attempt, wait))
    raise AssertionError("unreachable")


def repo_files(repo: str, revision: str | None, endpoint: str | None) -> tuple[str, dict[str, Any]]:
    """(commit, {path: sibling}) with sizes, git blob ids and LFS sha256 from the hub."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint(endpoint))
    info = hub_call(repo, api.model_info, repo, revision=revision, files_metadata=True)
    return info.sha, {s.rfilename: s for s in info.siblings or []}


def download_json(repo: str, commit: str, name: str, endpoint: str | None) -> dict[str, Any]:
    """A JSON file the repository lists (its manifest): a hub failure or a file that is
    not a JSON object is an error, never an empty manifest that would skip its checks."""
    import tempfile

    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory() as tmp:
        path = hub_call(
            repo, hf_hub_download, repo, name, revision=commit, local_dir=tmp,
            endpoint=hub_endpoint(endpoint),
        )  # fmt: skip
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FetchError(f"{repo}: {name} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FetchError(f"{repo}: {name} is not a JSON object")
    return data


def glob_escape(name: str) -> str:
    """A file name as an fnmatch pattern that matches it alone."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def verify_download(path: Path, name: str, sibling: Any, stated: str | None) -> str:
    """sha256 against what the catalog or the repo's manifest states and the hub's LFS
    metadata (git blob id for small non-LFS files). A mismatch removes the file."""
    digest = sha256_file(path)
    expected = [s for s in (stated, getattr(getattr(sibling, "lfs", None), "sha256", None)) if s]
    bad = next((e for e in expected if e != digest), None)
    if bad is None and not expected and sibling is not None and sibling.blob_id:
        if git_blob_sha1(path) != sibling.blob_id:
            bad = f"git blob {sibling.blob_id}"
    if bad is not None:
        path.unlink()
        raise FetchError(
            f"{name}: integrity check failed (expected {bad[:16]}..., got "
            f"{digest[:16]}...); the file was removed and nothing was stored"
        )
    return digest
