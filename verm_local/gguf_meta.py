"""Read a GGUF file's header key/values without llama.cpp, so a file llama.cpp would abort
on (wrong architecture, no text layer after the deepstack ones) is refused with one line
before it is loaded. Pure Python, reads only the header."""

from __future__ import annotations

import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import ModelError

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# Large arrays (the vocabulary) are skipped, not kept.
_KEEP_ARRAY_MAX = 64


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    if n > 1 << 26:
        raise ValueError("string too long")
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, n = _read(f, "<I"), _read(f, "<Q")
        if n > _KEEP_ARRAY_MAX:
            _skip_array(f, etype, n)
            return None
        return [_value(f, etype) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {vtype}")


def _skip_array(f: BinaryIO, etype: int, n: int) -> None:
    if etype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[etype]) * n, 1)
        return
    for _ in range(n):
        if etype == _STRING:
            f.seek(_read(f, "<Q"), 1)
        else:
            _value(f, etype)


def _array(f: BinaryIO, etype: int, n: int) -> list[Any]:
    """A whole array: numbers in one unpack, strings one by one (151k of them in 0.2 s)."""
    if etype in _SCALARS:
        fmt = _SCALARS[etype]
        data = f.read(struct.calcsize(fmt) * n)
        return list(struct.unpack(f"<{n}{fmt[1:]}", data))
    return [_value(f, etype) for _ in range(n)]


@contextmanager
def _header(path: Path) -> Iterator[tuple[BinaryIO, int, int]]:
    """The file open past its magic and version, with its tensor and key/value counts;
    an unreadable, cut or corrupt header is one ModelError."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{path}: not a GGUF file (corrupt or wrong file)")
            _read(f, "<I")  # version
            n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
            yield f, n_tensors, n_kv
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (EOFError, ValueError, struct.error, UnicodeDecodeError):
        raise ModelError(f"{path}: GGUF header is truncated or corrupt") from None


def _key_values(f: BinaryIO, n_kv: int, keys: set[str]) -> dict[str, Any]:
    """Reads all `n_kv` key/values; returns those named in `keys`, arrays in full."""
    found: dict[str, Any] = {}
    for _ in range(n_kv):
        key, vtype = _string(f), _read(f, "<I")
        if vtype == _ARRAY:
            etype, n = _read(f, "<I"), _read(f, "<Q")
            if key in keys:
                found[key] = _array(f, etype, n)
            else:
                _skip_array(f, etype, n)
        else:
            value = _value(f, vtype)
            if key in keys:
                found[key] = value
    return found


def read_values(path: str | Path, keys: set[str]) -> dict[str, Any]:
    """The values of the header keys named in `keys`, arrays in full (the vocabulary's
    tokens, types and merges), the others skipped. Raises ModelError if unreadable."""
    with _header(Path(path)) as (f, _, n_kv):
        return _key_values(f, n_kv, keys)


def read_tensor_types(path: str | Path) -> dict[str, int]:
    """Each tensor's name and ggml type id (gguf's GGMLQuantizationType: 1 F16, 8 Q8_0,
    12 Q4_K, 14 Q6_K, ...), read from the header's tensor list without loading any data
    (the vocabulary arrays are skipped, not parsed). Raises ModelError if unreadable."""
    with _header(Path(path)) as (f, n_tensors, n_kv):
        _key_values(f, n_kv, set())
        types = {}
        for _ in range(n_tensors):
            name = _string(f)
            f.seek(8 * _read(f, "<I"), 1)  # the dimensions
            types[name] = _read(f, "<I")
            _read(f, "<Q")  # the data's offset
        return types


def read_metadata(path: str | Path, stop_at: str = "tokenizer.ggml.tokens") -> dict[str, Any]:
    """Header key/values up to (not including) `stop_at`. Raises ModelError if unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return parse_metadata(f, path, stop_at=stop_at)  # type: ignore[return-value]
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def parse_metadata(
    f: BinaryIO, where: str | Path, stop_at: str = "tokenizer.ggml.tokens", partial: bool = False
) -> dict[str, Any] | None:
    """The key/values of a GGUF header read from `f` (a file, or the first bytes of one
    fetched from the hub: `partial`, where running out of bytes before `stop_at` gives None
    instead of an error)."""
    try:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{where}: not a GGUF file (corrupt or wrong file)")
        _read(f, "<I")  # version
        _read(f, "<Q")  # tensor count
        n_kv = _read(f, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            if key == stop_at:
                break
            meta[key] = _value(f, _read(f, "<I"))
        return meta
    except EOFError:
        if partial:
            return None
        raise ModelError(f"{where}: GGUF header is truncated or corrupt") from None
    except (ValueError, struct.error, UnicodeDecodeError):
        raise ModelError(f"{where}: GGUF header is truncated or corrupt") from None


def check_depth(what: str | Path, depth: int, n_deepstack: int) -> None:
    """Refuse a text model with no layer after its deepstack layers. llama.cpp's Qwen3-VL
    graph (0.3.36) selects the output rows in the last layer, then adds that layer's
    deepstack slice for every token: with depth <= deepstack layers the shapes differ on
    any text chunk that needs fewer outputs than tokens, and GGML_ASSERT(ggml_can_repeat)
    aborts the process."""
    if depth <= n_deepstack:
        raise ModelError(
            f"{what}: text depth {depth} leaves no layer after its {n_deepstack} deepstack "
            "layers, which llama.cpp cannot run (it aborts on the first text after an "
            f"image); a Qwen3-VL text model needs more than {n_deepstack} layers"
        )


def check_pair(model: Path, mmproj: Path) -> None:
    """Refuse a text model / projector pair that is not a usable Qwen3-VL."""
    meta = read_metadata(model)
    arch = meta.get("general.architecture")
    if arch == "clip":
        raise ModelError(f"{model}: this is a vision projector; pass it as --mmproj")
    if arch != "qwen3vl":
        raise ModelError(f"{model}: architecture {arch!r} is not qwen3vl (Visual-ERM)")
    check_depth(
        model,
        int(meta.get("qwen3vl.block_count", 0)),
        int(meta.get("qwen3vl.n_deepstack_layers", 0)),
    )
    proj = read_metadata(mmproj)
    if proj.get("general.architecture") != "clip" or proj.get("clip.projector_type") not in (
        "qwen3vl_merger",
        None,
    ):
        raise ModelError(f"{mmproj}: not a Qwen3-VL vision projector")
    width = proj.get("clip.vision.projection_dim")
    hidden = meta.get("qwen3vl.embedding_length")
    if width is not None and hidden is not None and int(width) != int(hidden):
        raise ModelError(
            f"{mmproj}: projects to width {width} but the text model is {hidden} "
            "wide; they are not from the same checkpoint"
        )
