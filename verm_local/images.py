"""Load and prepare the two images a judge sees. Every problem a user can cause ends as
an InputError naming the file.

`prepare_image` follows a task profile's `ImagePrep` (the authors' pipeline: crop to
content for a rendered table, thumbnail to the task's longest side, JPEG or PNG) and then
the vision processor's own resize (sides multiples of 32 px, 64 visual tokens at least),
so llama.cpp and transformers both receive pixels they leave as they are. `load_image` is
the processor's resize alone (images a client already prepared, the chat path)."""

from __future__ import annotations

import base64
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from .constants import DEFAULT_IMAGE_TOKEN_BUDGET, MAX_IMAGE_PIXELS, PIXELS_PER_TOKEN_SIDE
from .errors import InputError
from .pixels import crop_to_content, png_bytes
from .render import is_svg, svg_to_png
from .tasks import ImagePrep

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# Qwen3-VL's image processor: at least 65,536 pixels (64 tokens), at most 16,777,216
# (16,384 tokens), aspect at most 200:1.
MIN_IMAGE_TOKENS = 64
MAX_IMAGE_TOKENS = 16384
MAX_ASPECT = 200


@dataclass(frozen=True)
class PreparedImage:
    """RGB pixels ready for the vision encoder, where they came from, and the file a
    client would send for them (`encoded`: the prepared image as JPEG or PNG)."""

    image: Image.Image
    source: str
    original_size: tuple[int, int]
    encoding: str = "png"  # how the prepared image was (or would be) sent: jpeg | png
    sent_size: tuple[int, int] | None = None  # after crop and thumbnail, before the resize
    encoded: bytes | None = None

    @property
    def media_type(self) -> str:
        return f"image/{self.encoding}"

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def visual_tokens(self) -> int:
        return visual_tokens(*self.image.size)

    def rgb_bytes(self) -> bytes:
        return self.image.tobytes()


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def media_type_of(data: bytes) -> str:
    """The media type an image file's bytes say they are (PNG when they say nothing
    known)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _MAGIC if data.startswith(magic)), "image/png")


def data_url(image: bytes | str | Path | PreparedImage) -> str:
    """The one way an image becomes a base64 data URL: a PreparedImage as its task sends
    it (its JPEG or PNG file; PNG of its pixels when it has none), a file's bytes (or a
    path) under the media type they say they are."""
    if isinstance(image, PreparedImage):
        raw = image.encoded if image.encoded is not None else png_bytes(image.image)
        kind = image.media_type if image.encoded is not None else "image/png"
    else:
        raw = image if isinstance(image, bytes) else Path(image).read_bytes()
        kind = media_type_of(raw)
    return f"data:{kind};base64," + base64.b64encode(raw).decode()


def visual_tokens(width: int, height: int) -> int:
    """Tokens Qwen3-VL spends on an image of this size (one per 32x32 pixels)."""
    s = PIXELS_PER_TOKEN_SIDE
    return max(1, math.ceil(width / s)) * max(1, math.ceil(height / s))


def fit_to_budget(
    width: int, height: int, budget: int, min_tokens: int = MIN_IMAGE_TOKENS
) -> tuple[int, int]:
    """Qwen-VL's own smart resize with factor 32: sides multiples of 32, aspect kept as
    closely as possible, between `min_tokens` and `budget` visual tokens. Done here, once,
    so llama.cpp and transformers both receive pixels they leave as they are."""
    if budget < 1:
        raise InputError(f"image token budget must be at least 1, got {budget}")
    s = PIXELS_PER_TOKEN_SIDE
    max_pixels = budget * s * s
    min_pixels = min(min_tokens, budget) * s * s
    h_bar = max(s, round(height / s) * s)
    w_bar = max(s, round(width / s) * s)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(s, math.floor(height / beta / s) * s)
        w_bar = max(s, math.floor(width / beta / s) * s)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / s) * s
        w_bar = math.ceil(width * beta / s) * s
    return w_bar, h_bar


def load_image(
    path: str | Path | bytes,
    *,
    image_tokens: int | None = DEFAULT_IMAGE_TOKEN_BUDGET,
    name: str | None = None,
    token_budget: int | None = None,
) -> PreparedImage:
    """Open an image file (or bytes) and resize it as the vision processor would, to at
    most `image_tokens` visual tokens; raise InputError on any problem. (`token_budget`
    is the old name of `image_tokens`, kept for one release.)"""
    if token_budget is not None:
        import warnings

        warnings.warn("token_budget= is now image_tokens=", DeprecationWarning, stacklevel=2)
        image_tokens = token_budget
    label, data = _read(path, name)
    rgb, original = _decode(_raster(label, data, None), label)
    return PreparedImage(
        image=_fit(rgb, image_tokens), source=label, original_size=original, sent_size=rgb.size
    )


def prepare_image(
    path: str | Path | bytes,
    prep: ImagePrep,
    *,
    image_tokens: int | None = None,
    name: str | None = None,
) -> PreparedImage:
    """An image as the authors' pipeline sends it for a task (`prep`: crop, thumbnail,
    JPEG or PNG), then resized as the vision processor would (`image_tokens` caps the
    visual tokens further, a memory lever that costs fidelity)."""
    label, data = _read(path, name)
    rgb, original = _decode(_raster(label, data, prep), label)
    if prep.crop:
        rgb = crop_to_content(rgb, prep.crop_padding)
    rgb.thumbnail((prep.max_side, prep.max_side))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG" if prep.encoding == "jpeg" else "PNG")
    encoded = buf.getvalue()
    if prep.encoding == "jpeg":  # the model saw the JPEG's pixels, artefacts included
        with Image.open(io.BytesIO(encoded)) as im:
            rgb = im.convert("RGB")
    return PreparedImage(
        image=_fit(rgb, image_tokens),
        source=label,
        original_size=original,
        encoding=prep.encoding,
        sent_size=rgb.size,
        encoded=encoded,
    )


def _fit(rgb: Image.Image, image_tokens: int | None) -> Image.Image:
    size = fit_to_budget(*rgb.size, min(image_tokens or MAX_IMAGE_TOKENS, MAX_IMAGE_TOKENS))
    return rgb.resize(size, Image.Resampling.BICUBIC) if size != rgb.size else rgb


def _read(path: str | Path | bytes, name: str | None) -> tuple[str, bytes]:
    label = name or (str(path) if not isinstance(path, bytes) else "<image bytes>")
    if isinstance(path, bytes):
        data = path
    else:
        p = Path(path)
        if not p.exists():
            raise InputError(f"{label}: file not found")
        if p.is_dir():
            raise InputError(f"{label}: is a directory, not an image")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InputError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise InputError(f"{label}: empty file")
    return label, data


def _raster(label: str, data: bytes, prep: ImagePrep | None) -> bytes:
    """`data` itself, or an SVG file rendered where the task's preparation renders SVG."""
    if not is_svg(data):
        return data
    if prep is None or not prep.svg:
        raise InputError(
            f"{label}: an SVG file; it is rendered only where the task renders SVG "
            "(judge --task svg, as the authors do), so render it to PNG here"
        )
    return svg_to_png(data, label)


def check_image(path: str | Path, prep: ImagePrep | None = None) -> None:
    """Fail in one line on an image that cannot be judged with `prep`, cheaply: a raster
    image is decoded; an SVG file is only checked to be allowed (it renders when judged)."""
    label, data = _read(path, None)
    if is_svg(data) and prep is not None and prep.svg:
        return
    _decode(_raster(label, data, prep), label)


def _decode(data: bytes, label: str) -> tuple[Image.Image, tuple[int, int]]:
    """Decode safely: RGB, upright, alpha on white; the original size. The pixel count is
    checked from the header before any pixel is decoded, by this function alone: Pillow's
    own process-wide limit and warnings filters are left as they are, so threads decoding
    at once (and the application around verm-local) see no shared state change."""
    try:
        img = _open(data, label)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(
                f"{label}: image is too large ({w}x{h}, over {MAX_IMAGE_PIXELS} pixels; "
                "possible decompression bomb)"
            )
        img.seek(0)  # GIF and animated WebP: the first frame
        img.load()
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise InputError(f"{label}: truncated or corrupt image ({msg})") from None
    original = img.size
    rgb = to_rgb(img)
    w, h = rgb.size
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(
            f"{label}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is beyond "
            f"{MAX_ASPECT}:1, which the vision encoder cannot take"
        )
    return rgb, original


def _open(data: bytes, label: str) -> ImageFile.ImageFile:
    """The image's header read by the plugin of its format (as `Image.open` picks one, from
    the registry of `Image.register_open`), without `Image.open`'s bomb check, which reads
    the process-wide `Image.MAX_IMAGE_PIXELS` and warns through the global filters."""
    Image.init()
    prefix = data[:16]
    ours = [(f, entry) for f, entry in Image.OPEN.items() if f in FORMATS]
    others = [(f, entry) for f, entry in Image.OPEN.items() if f not in FORMATS]
    for fmt, (factory, accept) in ours + others:
        try:
            verdict = accept(prefix) if accept is not None else True
            if isinstance(verdict, str):  # the plugin knows the format, refuses this file
                raise InputError(f"{label}: {verdict}")
            if not verdict:
                continue
            img = factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, OSError, struct.error):
            continue
        if fmt not in FORMATS:
            raise InputError(f"{label}: {fmt} images are not supported ({', '.join(FORMATS)})")
        return img
    raise InputError(f"{label}: not an image (or a format Pillow cannot read)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright (EXIF), alpha composited on white, any mode to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA" or img.mode == "RGBa":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img
