"""`verm-local pull hf.co/USER/REPO[:QUANT]`: any GGUF repository of the judge on the hub,
as Ollama's `hf.co/` and llama.cpp's `-hf` pull one, into the store as a variant.

The quant is chosen by its tag (llama.cpp's rule: the tag followed by `.` or `-` in a file
name, any case; a split model's parts are one model), the projector is the file whose name
holds `mmproj` (f16 > bf16 > q8_0, or `--mmproj-quant`). Nothing is stored before it is
verified: each file's sha256 against the hub's LFS metadata, and each GGUF's header (the
text model must be Qwen3-VL of Visual-ERM's shape, the projector a Qwen3-VL projector),
read from the hub before the download and from the files after it. The variant records
where it came from (repository, commit, files, sha256); a variant from another source is
never replaced without `--force`."""

from __future__ import annotations

import io
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import GB, gguf_variant
from .constants import MANIFEST_NAME
from .errors import FetchError, InputError, ModelError
from .fileio import atomic_directory, read_manifest, write_json_atomic
from .gguf_meta import check_depth, parse_metadata, read_metadata
from .hub import glob_escape, hub_call, hub_endpoint, offline, repo_files, verify_download
from .paths import home_dir, variant_dir
from .store import check_files, ensure_free, variant_lock

log = logging.getLogger("verm_local.store")

PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.I)
_TAG = re.compile(r"[-.]([A-Za-z0-9_]+)$")
# Files of a GGUF repository that are not the model (llama.cpp's list): projectors,
# importance matrices, draft models.
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
MMPROJ_PREFERENCE = ("F16", "BF16", "Q8_0")
# What a header read from the hub covers: the architecture and shape keys come before the
# vocabulary in every converter's output.
HEADER_BYTES = 1 << 20

# Visual-ERM's text shape (Qwen3-VL-8B) and the test shapes (`convert tiny-model`).
SHAPE_KEYS = (
    "embedding_length",
    "block_count",
    "attention.head_count",
    "attention.head_count_kv",
    "feed_forward_length",
)
SHAPES = {
    "Visual-ERM 8B": (4096, 36, 32, 8, 12288),
    "test shape 8b-text4 / 8b-vision": (4096, 4, 32, 8, 12288),
    "test shape tiny": (256, 4, 2, 1, 512),
}


@dataclass(frozen=True)
class HubRef:
    """A GGUF repository on the hub and the quant's tag (None: the plan's quant)."""

    repo: str
    tag: str | None

    def __str__(self) -> str:
        return f"hf.co/{self.repo}" + (f":{self.tag}" if self.tag else "")


def parse_ref(text: str) -> HubRef | None:
    """`hf.co/USER/REPO[:QUANT]` (or huggingface.co/..., or `USER/REPO[:QUANT]`: a catalog
    variant never holds a `/`); None for a catalog variant name."""
    t = text.strip()
    explicit = False
    for prefix in PREFIXES:
        if t.lower().startswith(prefix):
            t, explicit = t[len(prefix) :], True
            break
    if "/" not in t and not explicit:
        return None
    repo, _, tag = t.partition(":")
    repo = repo.strip("/")
    if not _REPO.match(repo):
        raise InputError(f"{text!r}: not a hub repository; write hf.co/USER/REPO[:QUANT]")
    if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise InputError(f"{text!r}: {tag!r} is not a quant tag (e.g. Q4_K_M)")
    return HubRef(repo, tag or None)


@dataclass(frozen=True)
class GgufFile:
    """A GGUF of the repository: its path, the model it belongs to (split parts share one),
    its quant tag (upper case; "" when the name carries none), its part number."""

    path: str
    model: str
    tag: str
    part: int = 1
    parts: int = 1


def gguf_file(path: str) -> GgufFile | None:
    """llama.cpp's reading of a GGUF file name (common/download.cpp): an optional
    `-0000i-of-0000n` split suffix, the tag after the last `-` or `.`."""
    name = path.rsplit("/", 1)[-1]
    if not name.lower().endswith(".gguf"):
        return None
    prefix, part, parts = path[: -len(".gguf")], 1, 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, part, parts = m.group(1), int(m.group(2)), int(m.group(3))
    t = _TAG.search(prefix.rsplit("/", 1)[-1])
    return GgufFile(path, prefix, t.group(1).upper() if t else "", part, parts)


def is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and not any(k in name for k in _NOT_MODEL)


def _tag_pattern(tag: str) -> re.Pattern[str]:
    # llama.cpp: the tag followed by "." or "-", any case; here also not inside a longer
    # tag ("Q4_K_M" does not match "IQ4_K_M").
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(tag) + r"[.-]", re.I)


def choose_model(names: list[str], tag: str) -> list[str]:
    """The files of the one model `tag` names (a split model's parts in order). InputError
    naming the repository's tags when none or several models match."""
    models: dict[str, list[GgufFile]] = {}
    for n in names:
        g = gguf_file(n)
        if g is not None and is_model(n):
            models.setdefault(g.model, []).append(g)
    if not models:
        raise ModelError("it holds no GGUF model file")
    pattern = _tag_pattern(tag)
    hits = [m for m, parts in models.items() if any(pattern.search(p.path) for p in parts)]
    tags = sorted({p[0].tag or Path(m).name for m, p in models.items()})
    if not hits:
        raise InputError(f"no file matches the tag {tag}; the repository has: {', '.join(tags)}")
    if len(hits) > 1:
        raise InputError(
            f"the tag {tag} matches {len(hits)} models ({', '.join(sorted(hits))}); "
            f"name one of: {', '.join(tags)}"
        )
    parts = sorted(models[hits[0]], key=lambda g: g.part)
    if len(parts) != parts[0].parts:
        raise ModelError(f"{hits[0]}: {len(parts)} of its {parts[0].parts} split parts are there")
    return [p.path for p in parts]


def choose_mmproj(names: list[str], quant: str | None = None) -> str:
    """The projector: `quant` when given, else f16 > bf16 > q8_0, else the only one."""
    found = {n: gguf_file(n) for n in names if "mmproj" in n.rsplit("/", 1)[-1].lower()}
    found = {n: g for n, g in found.items() if g is not None}
    if not found:
        raise ModelError("it holds no mmproj (vision projector) file; Visual-ERM needs one")
    order = [quant.upper()] if quant else list(MMPROJ_PREFERENCE)
    for want in order:
        pattern = _tag_pattern(want)
        hit = sorted(n for n in found if pattern.search(n) or found[n].tag == want)
        if hit:
            return hit[0]
    if quant:
        have = ", ".join(sorted(g.tag or n for n, g in found.items()))
        raise InputError(f"no mmproj of quant {quant.upper()}; the repository has: {have}")
    if len(found) == 1:
        return next(iter(found))
    raise InputError(
        f"several projectors and none f16, bf16 or q8_0 ({', '.join(sorted(found))}); "
        "choose one with --mmproj-quant"
    )


def check_text_header(meta: dict[str, Any], where: str) -> str:
    """The text model is Qwen3-VL of Visual-ERM's shape (or a test shape): the shape's
    name, or ModelError saying what was found."""
    arch = meta.get("general.architecture")
    if arch == "clip":
        raise ModelError(f"{where}: this is a vision projector, not a text model")
    shape = tuple(int(meta.get(f"{arch}.{k}", 0) or 0) for k in SHAPE_KEYS)
    found = (
        f"architecture {arch!r}, hidden {shape[0]}, {shape[1]} layers, "
        f"{shape[2]} heads ({shape[3]} KV), feed-forward {shape[4]}"
    )
    if arch != "qwen3vl":
        raise ModelError(f"{where}: not Visual-ERM: {found}, not qwen3vl (Qwen3-VL)")
    for name, want in SHAPES.items():
        if shape == want:
            return name
    raise ModelError(
        f"{where}: a Qwen3-VL model, but not Visual-ERM's shape: {found} (Visual-ERM: "
        "hidden 4096, 36 layers, 32 heads (8 KV))"
    )


def check_projector_header(meta: dict[str, Any], where: str, width: int | None = None) -> None:
    arch, proj = meta.get("general.architecture"), meta.get("clip.projector_type")
    if arch != "clip" or proj not in ("qwen3vl_merger", None):
        raise ModelError(
            f"{where}: not a Qwen3-VL vision projector: architecture {arch!r}, projector {proj!r}"
        )
    dim = meta.get("clip.vision.projection_dim")
    if width is not None and dim is not None and int(dim) != int(width):
        raise ModelError(f"{where}: projects to width {dim}, the text model is {width} wide")


def _remote_header(ref: HubRef, commit: str, name: str, endpoint: str | None) -> dict | None:
    """The header of a file on the hub (its first MB, a Range request): None when it does
    not fit there (checked after the download instead)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from . import net

    url = hf_hub_url(ref.repo, name, revision=commit, endpoint=hub_endpoint(endpoint))
    headers = {**build_hf_headers(), "Range": f"bytes=0-{HEADER_BYTES - 1}"}
    try:
        data = net.get_head(url, HEADER_BYTES, headers=headers)
    except FetchError as exc:
        raise FetchError(f"{ref}: cannot read the header of {name} ({exc})") from None
    return parse_metadata(io.BytesIO(data), name, partial=True)


def pull_gguf(
    ref: HubRef,
    *,
    plan_quant: str,
    revision: str | None = None,
    mmproj_quant: str | None = None,
    force: bool = False,
    endpoint: str | None = None,
    home: Path | None = None,
) -> Path:
    """Make the repository's model of `ref.tag` (else `plan_quant`) a verified variant in
    the store; return its directory."""
    tag = (ref.tag or plan_quant).upper()
    home = home or home_dir()
    variant = gguf_variant(tag)
    final = variant_dir(variant.name, home)
    with variant_lock(variant.name, home):
        stored = read_manifest(final) if final.is_dir() else None
        if offline():
            if stored and _same_repo(stored, ref) and not check_files(final, stored, True):
                log.info("%s (%s) is in the store and verified: %s", variant.name, ref, final)
                return final
            raise FetchError(f"{ref}: HF_HUB_OFFLINE is set and it is not in the store")
        commit, siblings = repo_files(ref.repo, revision, endpoint)
        try:
            files = choose_model(list(siblings), tag)
            mmproj = choose_mmproj(list(siblings), mmproj_quant)
        except (InputError, ModelError) as exc:
            raise type(exc)(f"{ref}: {exc}") from None
        wanted = [*files, mmproj]
        source = {"repository": ref.repo, "revision": commit, "tag": tag}
        origin = (stored or {}).get("store", {})
        same = stored is not None and origin.get("repository") == ref.repo
        same = same and origin.get("revision") == commit
        same = same and sorted(e["file"] for e in stored.get("files", [])) == sorted(
            n.rsplit("/", 1)[-1] for n in wanted
        )
        if same and not check_files(final, stored, full=True):
            log.info("%s from %s is in the store and verified: %s", variant.name, ref, final)
            return final
        # The headers, read from the hub: a wrong repository costs no download.
        width = None
        text_meta = _remote_header(ref, commit, files[0], endpoint)
        if text_meta is not None:
            check_text_header(text_meta, f"{ref}: {files[0]}")
            width = text_meta.get("qwen3vl.embedding_length")
        proj_meta = _remote_header(ref, commit, mmproj, endpoint)
        if proj_meta is not None:
            check_projector_header(proj_meta, f"{ref}: {mmproj}", width)
        if stored is not None and not same and not force:
            raise ModelError(
                f"{variant.name} is in the store from {origin.get('source', '?')}; "
                f"pulling {ref} would replace it: add --force to replace it (the one "
                "there stays until the new files are verified), or `verm-local rm "
                f"{variant.name}` first"
            )
        staging = home / ".staging" / variant.name
        digests = _download(ref, commit, siblings, wanted, staging, endpoint)
        try:
            shape = _check_downloaded(ref, staging, files, mmproj)
        except ModelError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        source["shape"] = shape
        return _store(variant, ref, staging, final, files, mmproj, digests, source)


def _same_repo(manifest: dict[str, Any], ref: HubRef) -> bool:
    return manifest.get("store", {}).get("repository") == ref.repo


def _download(
    ref: HubRef,
    commit: str,
    siblings: dict[str, Any],
    wanted: list[str],
    staging: Path,
    endpoint: str | None,
) -> dict[str, str]:
    """The files into staging (resumed where a download stopped), each verified against
    the hub's LFS sha256 (a mismatch removes it and stores nothing)."""
    from huggingface_hub import snapshot_download

    staging.mkdir(parents=True, exist_ok=True)
    todo = [n for n in wanted if not (staging / n).is_file()]
    need = sum(int(siblings[n].size or 0) for n in todo)
    ensure_free(staging, need, f"{ref} ({len(todo)} files)")
    log.info(
        "pulling %s@%s: %s, %.2f GB to download", ref, commit[:12], ", ".join(wanted), need / GB
    )
    hub_call(
        ref.repo,
        snapshot_download,
        ref.repo,
        revision=commit,
        local_dir=staging,
        endpoint=hub_endpoint(endpoint),
        allow_patterns=sorted(glob_escape(n) for n in wanted),
        max_workers=4,
    )
    digests = {}
    for name in wanted:
        sibling = siblings.get(name)
        if getattr(getattr(sibling, "lfs", None), "sha256", None) is None:
            raise FetchError(f"{ref}: the hub states no sha256 for {name}; nothing was stored")
        digests[name] = verify_download(staging / name, name, sibling, None)
    return digests


def _check_downloaded(ref: HubRef, staging: Path, files: list[str], mmproj: str) -> str:
    """The headers of the downloaded files (a header the hub's first MB did not hold, and
    the text model's depth against its deepstack layers)."""
    meta = read_metadata(staging / files[0])
    shape = check_text_header(meta, f"{ref}: {files[0]}")
    proj = read_metadata(staging / mmproj)
    check_projector_header(proj, f"{ref}: {mmproj}", meta.get("qwen3vl.embedding_length"))
    check_depth(
        f"{ref}: {files[0]}",
        int(meta.get("qwen3vl.block_count", 0)),
        int(meta.get("qwen3vl.n_deepstack_layers", 0)),
    )
    return shape


def _store(
    variant: Any,
    ref: HubRef,
    staging: Path,
    final: Path,
    files: list[str],
    mmproj: str,
    digests: dict[str, str],
    source: dict[str, Any],
) -> Path:
    """The verified files into the store in one rename, with a manifest naming their
    source (the file names kept: llama.cpp finds a split model's parts by them)."""
    from time import gmtime, strftime

    entries = []
    with atomic_directory(final) as tmp:
        for name in [*files, mmproj]:
            base = name.rsplit("/", 1)[-1]
            dst = tmp / base
            shutil.move(str(staging / name), dst)
            g = gguf_file(name)
            kind = "mmproj" if name == mmproj else ("text" if name == files[0] else "text-part")
            entries.append(
                {
                    "file": base,
                    "kind": kind,
                    "quant": (g.tag if g else "") if name == mmproj else variant.quant,
                    "size": dst.stat().st_size,
                    "sha256": digests[name],
                }
            )
        manifest = {
            "format": "gguf",
            "files": entries,
            "mmproj": mmproj.rsplit("/", 1)[-1],
            "store": {
                "variant": variant.name,
                "source": f"{HubRef(ref.repo, source['tag'])}@{source['revision'][:12]}",
                **source,
                "files": {e["file"]: e["sha256"] for e in entries},
                "stored_at": strftime("%Y-%m-%dT%H:%M:%SZ", gmtime()),
            },
        }
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("%s stored and verified: %s (from %s)", variant.name, final, ref)
    return final
