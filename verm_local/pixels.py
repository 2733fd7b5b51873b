"""Pixel helpers shared by image preparation and rendering (Pillow only): cropping to the
content, PNG bytes, an all-white check."""

from __future__ import annotations

import io

from PIL import Image


def crop_to_content(img: Image.Image, padding: int = 12) -> Image.Image:
    """Crop to what differs from the background (the top-left pixel's colour), keeping
    `padding` pixels around it; an image of one colour is kept whole."""
    from PIL import ImageChops

    background = Image.new("RGB", img.size, img.getpixel((0, 0)))
    box = ImageChops.difference(img, background).getbbox()
    if not box:
        return img
    left, top, right, bottom = box
    return img.crop(
        (
            max(0, left - padding),
            max(0, top - padding),
            min(img.width, right + padding),
            min(img.height, bottom + padding),
        )
    )


def png_bytes(img: Image.Image) -> bytes:
    """Pixels as a PNG file (lossless)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def all_white(png: bytes) -> bool:
    """Every pixel white (in grey levels), or not an image at all."""
    try:
        with Image.open(io.BytesIO(png)) as im:
            lo, hi = im.convert("L").getextrema()
    except OSError:
        return True
    return lo == 255
