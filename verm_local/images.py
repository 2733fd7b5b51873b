"""Load and normalise the two images a judge sees. Every problem a user can cause ends as
an InputError naming the file; the pixels handed on are RGB, upright, on white, within
the visual-token budget."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .constants import DEFAULT_IMAGE_TOKEN_BUDGET, MAX_IMAGE_PIXELS, PIXELS_PER_TOKEN_SIDE
from .errors import InputError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# Qwen3-VL's image processor: at least 65,536 pixels (64 tokens), aspect at most 200:1.
MIN_IMAGE_TOKENS = 64
MAX_ASPECT = 200


@dataclass(frozen=True)
class PreparedImage:
    """RGB pixels ready for the vision encoder, plus where they came from."""

    image: Image.Image
    source: str
    original_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def visual_tokens(self) -> int:
        return visual_tokens(*self.image.size)

    def rgb_bytes(self) -> bytes:
        return self.image.tobytes()


def visual_tokens(width: int, height: int) -> int:
    """Tokens Qwen3-VL spends on an image of this size (one per 32x32 pixels)."""
    s = PIXELS_PER_TOKEN_SIDE
    return max(1, math.ceil(width / s)) * max(1, math.ceil(height / s))


def fit_to_budget(width: int, height: int, budget: int,
                  min_tokens: int = MIN_IMAGE_TOKENS) -> tuple[int, int]:
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
    token_budget: int = DEFAULT_IMAGE_TOKEN_BUDGET,
    name: str | None = None,
) -> PreparedImage:
    """Open an image file (or bytes) and normalise it; raise InputError on any problem."""
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
    return _decode(data, label, token_budget)


def _decode(data: bytes, label: str, token_budget: int) -> PreparedImage:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in FORMATS:
                raise InputError(f"{label}: {fmt} images are not supported ({', '.join(FORMATS)})")
            img.seek(0)  # GIF and animated WebP: the first frame
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{label}: image is too large (over {MAX_IMAGE_PIXELS} pixels; "
                         "possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise InputError(f"{label}: not an image (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise InputError(f"{label}: truncated or corrupt image ({msg})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    original = img.size
    rgb = to_rgb(img)
    w, h = rgb.size
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(f"{label}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is beyond "
                         f"{MAX_ASPECT}:1, which the vision encoder cannot take")
    size = fit_to_budget(w, h, token_budget)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return PreparedImage(image=rgb, source=label, original_size=original)


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
