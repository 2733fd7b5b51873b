"""The model store: pull (download, build or import), verify, list and remove variants.

Layout under VERM_LOCAL_HOME:

    <variant>/            a complete, verified variant: its files and manifest.json
                          (sha256 of every file, and a "store" record of where it came from)
    .staging/<variant>/   work in progress (downloads, builds, imports); never listed
    .locks/<variant>.lock one pull, import or removal of a variant at a time

A variant directory appears in one rename once every file is verified, so an interrupted
pull leaves nothing half-written in the store; the next pull resumes from .staging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .catalog import BF16_REPO, GB, Variant, get_variant, quantized_repo
from .constants import MANIFEST_NAME
from .errors import FetchError, InputError, ModelError
from .fileio import atomic_directory, read_manifest, sha256_file, write_json_atomic
from .hub import (
    download_json,
    glob_escape,
    hub_call,
    hub_endpoint,
    offline,
    repo_files,
    verify_download,
)
from .paths import home_dir, installed, variant_dir

# bf16 checkpoint files worth fetching (weights, configs, tokenizer, chat template).
HF_PATTERNS = (".safetensors", ".json", ".txt", ".jinja", ".model")
# Keep this much free beside what a download or build needs.
DISK_MARGIN = 256 * 2**20


_log = logging.getLogger(__name__)


def log(msg: str) -> None:
    _log.info("%s", msg)


@contextmanager
def variant_lock(name: str, home: Path | None = None) -> Iterator[None]:
    """One pull/import/removal of a variant at a time, across processes."""
    from filelock import FileLock, Timeout

    locks = (home or home_dir()) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"another verm-local is pulling {name}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------- verification


def check_files(directory: Path, manifest: dict[str, Any], full: bool) -> dict[str, str]:
    """{file: problem} for a variant's files: missing, wrong size, or (full) wrong sha256."""
    problems = {}
    for entry in manifest.get("files", []):
        name, path = entry["file"], directory / entry["file"]
        if not path.is_file():
            problems[name] = f"{name} is missing"
        elif path.stat().st_size != int(entry["size"]):
            problems[name] = f"{name} has size {path.stat().st_size}, expected {entry['size']}"
        elif full and sha256_file(path) != entry["sha256"]:
            problems[name] = f"{name} fails its sha256 check"
    if not manifest.get("files"):
        problems[MANIFEST_NAME] = "manifest lists no files"
    return problems


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free(path: Path, need: int, what: str) -> None:
    free = free_bytes(path)
    if need + DISK_MARGIN > free:
        raise FetchError(
            f"not enough disk space for {what}: needs {need / GB:.2f} GB in "
            f"{path}, {free / GB:.2f} GB free"
        )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- listing and removal


def list_models(verify: bool = False, home: Path | None = None) -> list[dict[str, Any]]:
    """Every variant in the store with size, path and state ('ok' = files present at their
    manifest sizes; with verify, 'verified' = every sha256 checked now)."""
    root = home or home_dir()
    rows = []
    if not root.is_dir():
        return rows
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = read_manifest(path)
        if manifest is None:
            continue
        problems = check_files(path, manifest, full=verify)
        state = (
            ("verified" if verify else "ok")
            if not problems
            else "corrupt: " + "; ".join(problems.values())
        )
        store = manifest.get("store", {})
        rows.append(
            {
                "variant": path.name,
                "size": dir_size(path),
                "path": str(path),
                "state": state,
                "source": store.get("source", "?"),
            }
        )
    return rows


def remove(name: str, home: Path | None = None) -> Path:
    get_variant(name)
    path = variant_dir(name, home)
    with variant_lock(name, home):
        if not path.exists():
            raise ModelError(f"{name} is not in the store ({path.parent})")
        trash = (home or home_dir()) / ".staging" / f".rm-{name}-{os.getpid()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, trash)  # gone from the store in one step
        shutil.rmtree(trash, ignore_errors=True)
    return path


# ---------------------------------------------------------------- pull


def pull_prompts(required: bool = False, home: Path | None = None) -> Path | None:
    """Fetch the authors' training prompts and their benchmark matcher's prompt into the
    store unless they are there (always with `required`); returns the training prompts'
    file. Without `required` a failure (offline, no network) is a warning: judge then
    says it uses the built-in prompts, bench score that its figures are not comparable."""
    from .prompts import (
        fetch_matcher,
        fetch_trained,
        prompts_path,
        stored_matcher,
        trained_record,
    )

    have = trained_record(home) is not None and stored_matcher(home) is not None
    if not required and have:
        return prompts_path(home)
    if offline():
        if required:
            raise FetchError("HF_HUB_OFFLINE is set; the training prompts cannot be fetched")
        return None
    try:
        path = fetch_trained(home=home)
        log(f"training prompts stored: {path}")
        log(f"the benchmark matcher's prompt stored: {fetch_matcher(home=home)}")
    except FetchError as exc:
        if required:
            raise
        _log.warning(
            "the authors' prompts were not fetched (%s); judge uses the built-in "
            "ones until `verm-local pull --prompts-only` succeeds",
            exc,
        )
        return prompts_path(home) if trained_record(home) is not None else None
    return path


def check_variant(name: str, path: Path, repack: bool | None = None) -> None:
    """A GGUF variant loads and runs on this machine (its text model, a few tokens), with
    the repack decision judge will use."""
    variant = get_variant(name)
    if variant.format != "gguf":
        return
    from .backends.llamacpp import repack_choice
    from .backends.native import check_runs
    from .modelref import resolve_model

    resolved = resolve_model(path)
    use, _ = repack_choice(repack, resolved.quant)
    check_runs(resolved.path, use)
    log(f"{name} runs on this machine ({'repacked' if use else 'plain'} weights)")


def pull(
    name: str,
    *,
    repo: str | None = None,
    revision: str | None = None,
    from_dir: Path | None = None,
    endpoint: str | None = None,
    home: Path | None = None,
) -> Path:
    """Make `name` present and verified in the store; return its directory."""
    variant = get_variant(name)
    home = home or home_dir()
    with variant_lock(variant.name, home):
        final = variant_dir(variant.name, home)
        staging = home / ".staging" / variant.name
        if installed(variant.name, home) and from_dir is None:
            problems = check_files(final, read_manifest(final) or {}, full=True)
            if not problems:
                log(f"{variant.name} is in the store and verified: {final}")
                return final
            log(
                f"{variant.name} in the store is corrupt ({'; '.join(problems.values())}); "
                "fetching again"
            )
            _reclaim(final, staging, set(problems))
        if from_dir is not None:
            return _import(variant, Path(from_dir), staging, final)
        if offline():
            raise FetchError(
                f"{variant.name} is not in the store and HF_HUB_OFFLINE is set; "
                "pull it online, or import files with --from DIR"
            )
        if variant.format == "hf":
            commit, siblings = repo_files(BF16_REPO, revision, endpoint)
            files = _fetch(BF16_REPO, commit, siblings, variant, staging, endpoint)
            return _finish(variant, staging, final, files, f"hf://{BF16_REPO}")
        qrepo = quantized_repo(repo)
        if qrepo:
            commit, siblings = repo_files(qrepo, revision, endpoint)
            published = _published(qrepo, commit, siblings, variant, endpoint)
            if published is not None:
                files = _fetch(
                    qrepo, commit, siblings, variant, staging, endpoint, wanted=published
                )
                return _finish(variant, staging, final, files, f"hf://{qrepo}")
            log(f"{qrepo} does not publish {variant.name}; building it from bf16")
        else:
            log(
                f"no repository of prebuilt variants set (--repo or VERM_LOCAL_REPO); "
                f"building {variant.name} from bf16"
            )
        # Lock order is always variant, then bf16 (which takes no other lock): no deadlock.
        bf16 = pull("bf16", revision=revision, endpoint=endpoint, home=home)
        return _build(variant, bf16, staging, final)


def cache_key(
    name: str,
    *,
    repo: str | None = None,
    revision: str | None = None,
    from_dir: Path | None = None,
    endpoint: str | None = None,
) -> str:
    """A key for a CI cache of the store that changes exactly when what `pull` would store
    changes: the variant's name and the sha256 of the manifest it comes with (--from DIR's,
    or the quantized repository's); a variant built from bf16 is keyed by the commit of
    the bf16 repository. Downloads the manifest only."""
    variant = get_variant(name)
    if from_dir is not None:
        manifest = read_manifest(Path(from_dir))
        if manifest is None:
            raise InputError(f"{from_dir}: no {MANIFEST_NAME} (a `convert` output has one)")
        source = json.dumps(manifest, sort_keys=True)
    else:
        qrepo = quantized_repo(repo) if variant.format != "hf" else None
        source = ""
        if qrepo:
            commit, siblings = repo_files(qrepo, revision, endpoint)
            if _published(qrepo, commit, siblings, variant, endpoint) is not None:
                manifest = (
                    download_json(qrepo, commit, MANIFEST_NAME, endpoint)
                    if MANIFEST_NAME in siblings
                    else {}
                )
                source = json.dumps(manifest, sort_keys=True) if manifest else f"{qrepo}@{commit}"
        if not source:
            commit, _ = repo_files(BF16_REPO, revision, endpoint)
            source = f"{BF16_REPO}@{commit}"
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return f"{variant.name}-{digest}"


def _reclaim(final: Path, staging: Path, bad: set[str]) -> None:
    """Move a corrupt variant out of the store into staging, without its bad files (as
    `check_files` found them), so the good ones are reused and nothing corrupt stays
    visible."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    os.replace(final, staging)
    for name in bad | {MANIFEST_NAME}:
        (staging / name).unlink(missing_ok=True)


def _published(
    repo: str, commit: str, files: dict[str, Any], variant: Variant, endpoint: str | None
) -> dict[str, str | None] | None:
    """The files of `variant` that `repo` publishes at `commit` (`files` as `repo_files`
    lists them), with the sha256 its manifest states (None where it states none), or
    None when it does not publish them all."""
    if variant.subfolder:
        prefix = variant.subfolder + "/"
        names = [f for f in files if f.startswith(prefix)]
        if not any(n.endswith(".safetensors") for n in names):
            return None
        return {n: None for n in names}
    if not all(f in files for f in variant.files):
        return None
    wanted: dict[str, str | None] = {f: variant.sha256.get(f) for f in variant.files}
    if MANIFEST_NAME in files:
        manifest = download_json(repo, commit, MANIFEST_NAME, endpoint)
        for entry in manifest.get("files", []):
            if entry.get("file") in wanted and entry.get("sha256") and not wanted[entry["file"]]:
                wanted[entry["file"]] = entry["sha256"]
    return wanted


def _fetch(
    repo: str,
    commit: str,
    siblings: dict[str, Any],
    variant: Variant,
    staging: Path,
    endpoint: str | None,
    wanted: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """Download the variant's files (default: the checkpoint files at the repo's root)
    into staging at `commit`, in parallel (huggingface_hub's snapshot_download with the
    files' names as its patterns), and verify each; returns {name: sha256}."""
    from huggingface_hub import snapshot_download

    if wanted is None:
        wanted = {n: None for n in siblings if n.endswith(HF_PATTERNS) and "/" not in n}
        if not any(n.endswith(".safetensors") for n in wanted):
            raise FetchError(f"{repo} has no safetensors weights at {commit[:12]}")
    staging.mkdir(parents=True, exist_ok=True)
    todo = [n for n in wanted if not (staging / n).is_file()]
    need = sum(int(siblings[n].size or 0) for n in todo if n in siblings)
    ensure_free(staging, need, f"{variant.name} ({len(todo)} files)")
    log(
        f"pulling {variant.name} from {repo}@{commit[:12]}: {len(wanted)} files, "
        f"{need / GB:.2f} GB to download"
    )
    hub_call(
        repo,
        snapshot_download,
        repo,
        revision=commit,
        local_dir=staging,
        endpoint=hub_endpoint(endpoint),
        allow_patterns=sorted(glob_escape(n) for n in wanted),
        max_workers=4,
    )
    return {
        name: verify_download(staging / name, name, siblings.get(name), wanted[name])
        for name in sorted(wanted)
    }


def _finish(
    variant: Variant, staging: Path, final: Path, digests: dict[str, str], source: str
) -> Path:
    """Move verified files from staging into the store in one step, with a manifest."""
    entries = []
    with atomic_directory(final) as tmp:
        for name, digest in sorted(digests.items()):
            rel = name[len(variant.subfolder) + 1 :] if variant.subfolder else name
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, dst)
            entries.append(_entry(variant, dst, rel, digest))
        _write_store_manifest(variant, tmp, entries, source)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"{variant.name} stored and verified: {final}")
    return final


def _entry(variant: Variant, path: Path, rel: str, digest: str) -> dict[str, Any]:
    if variant.format == "gguf":
        mmproj = rel.lower().startswith("mmproj")
        kind = "mmproj" if mmproj else "text"
        quant = rel[len("mmproj-") :].rsplit(".", 1)[0] if mmproj else variant.quant
    else:
        kind, quant = ("weights" if rel.endswith(".safetensors") else "config"), variant.quant
    return {
        "file": rel,
        "kind": kind,
        "quant": quant,
        "size": path.stat().st_size,
        "sha256": digest,
    }


def _write_store_manifest(
    variant: Variant,
    directory: Path,
    entries: list[dict[str, Any]],
    source: str,
    base: dict[str, Any] | None = None,
) -> None:
    manifest = dict(base or {})
    manifest["format"] = variant.format
    manifest["files"] = entries
    if variant.format == "gguf":
        manifest["mmproj"] = next(e["file"] for e in entries if e["kind"] == "mmproj")
    manifest["store"] = {
        "variant": variant.name,
        "source": source,
        "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(directory / MANIFEST_NAME, manifest)


# ---------------------------------------------------------------- build and import


def _build(variant: Variant, bf16: Path, staging: Path, final: Path) -> Path:
    """Convert the bf16 checkpoint into `variant` with the project's own converters."""
    shutil.rmtree(staging, ignore_errors=True)
    src = dir_size(bf16)
    extra = 1.0 if variant.format == "gguf" and variant.quant != "F16" else 0.0
    ensure_free(
        staging.parent,
        int(src * (variant.build_ratio + extra)),
        f"building {variant.name} from bf16",
    )
    source = f"built from bf16 ({(read_manifest(bf16) or {}).get('store', {}).get('source', bf16)})"
    if variant.format == "gguf":
        from .convert.gguf import convert_gguf

        quants = [] if variant.quant == "F16" else [variant.quant]
        manifest = convert_gguf(bf16, staging, quants, "f16", check=False)  # pull checks
        keep = {f"model-{variant.quant}.gguf", manifest["mmproj"]}
        for entry in manifest["files"]:
            if entry["file"] not in keep:
                (staging / entry["file"]).unlink()  # the F16 intermediate
        digests = {e["file"]: e["sha256"] for e in manifest["files"] if e["file"] in keep}
        return _finish(variant, staging, final, digests, source)
    from .convert.gptq import convert_gptq

    bits = int(variant.quant.rsplit("int", 1)[1])
    manifest = convert_gptq(bf16, staging, bits=bits)
    digests = {e["file"]: e["sha256"] for e in manifest["files"]}
    flat = Variant(**{**variant.__dict__, "subfolder": ""})
    return _finish(flat, staging, final, digests, source)


def _import(variant: Variant, src: Path, staging: Path, final: Path) -> Path:
    """Copy a user's files (a `convert` output directory, or GGUF files in a directory)
    into the store after verifying them; the user's files are left as they are."""
    from .modelref import resolve_model

    if not src.is_dir():
        raise ModelError(f"--from {src}: not a directory")
    manifest = read_manifest(src) or {}
    if variant.format == "gguf":
        resolved = _resolve_or_explain(resolve_model, src, variant)
        names = [resolved.path.name, resolved.mmproj.name]
    else:
        resolved = resolve_model(src)
        if resolved.format != variant.format or (
            variant.format == "gptq" and resolved.quant != variant.quant
        ):
            raise ModelError(
                f"--from {src}: holds a {resolved.quant} checkpoint, not {variant.name}"
            )
        names = [
            p.relative_to(src).as_posix()
            for p in src.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME and ".cache" not in p.parts
        ]
    stated = {e["file"]: e.get("sha256") for e in manifest.get("files", [])}
    need = sum((src / n).stat().st_size for n in names)
    ensure_free(staging.parent, need, f"importing {variant.name}")
    shutil.rmtree(staging, ignore_errors=True)
    digests = {}
    log(f"importing {variant.name} from {src}: {len(names)} files, {need / GB:.2f} GB")
    for name in names:
        dst = staging / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst)
        digest = sha256_file(dst)
        if stated.get(name) and stated[name] != digest:
            shutil.rmtree(staging, ignore_errors=True)
            raise FetchError(
                f"{src / name}: sha256 differs from {src / MANIFEST_NAME}; "
                "the file is corrupt, nothing was imported"
            )
        digests[name] = digest
    flat = Variant(**{**variant.__dict__, "subfolder": ""})
    return _finish(flat, staging, final, digests, f"imported from {src.resolve()}")


def _resolve_or_explain(resolve_model: Any, src: Path, variant: Variant) -> Any:
    try:
        return resolve_model(src, quant=variant.quant)
    except ModelError as exc:
        manifest = read_manifest(src)
        if manifest is None:
            # GGUF files without a manifest: the text model by its quant in the name.
            texts = [
                p
                for p in src.glob("*.gguf")
                if variant.quant in p.name.upper() and not p.name.lower().startswith("mmproj")
            ]
            if len(texts) == 1:
                return resolve_model(texts[0])
        raise ModelError(f"--from {src}: {exc}") from None
