import io

import pytest
from PIL import Image

from verm_local.errors import InputError
from verm_local.images import fit_to_budget, load_image, visual_tokens


def _save(img: Image.Image, path, fmt: str, **kw):
    img.save(path, format=fmt, **kw)
    return path


@pytest.mark.parametrize(
    "fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"), ("GIF", "gif")]
)
def test_supported_formats_load_as_rgb(tmp_path, fmt, ext):
    p = _save(Image.new("RGB", (320, 256), (200, 10, 10)), tmp_path / f"a.{ext}", fmt)
    img = load_image(p)
    assert img.image.mode == "RGB" and img.size == (320, 256)


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    r, g, b = load_image(p).image.getpixel((5, 5))
    assert r > 200 and b < 50


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (640, 320), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    assert load_image(p).size == (320, 640)


def test_alpha_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    p = _save(img, tmp_path / "t.png", "PNG")
    assert load_image(p).image.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "1", "I;16"])
def test_other_modes_convert_to_rgb(tmp_path, mode):
    img = Image.new("RGB", (16, 16), (30, 60, 90)).convert(mode)
    p = _save(img, tmp_path / f"m_{mode.replace(';', '')}.png", "PNG")
    assert load_image(p).image.mode == "RGB"


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    p = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG")
    r, g, b = load_image(p).image.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_budget_downscales_keeping_aspect(tmp_path):
    p = _save(Image.new("RGB", (2000, 1000), "white"), tmp_path / "big.png", "PNG")
    img = load_image(p, image_tokens=256)
    w, h = img.size
    assert img.visual_tokens <= 256
    assert w % 32 == 0 and h % 32 == 0
    assert abs(w / h - 2.0) < 0.15
    assert img.original_size == (2000, 1000)


def test_sizing_is_qwen_smart_resize_with_factor_32():
    assert fit_to_budget(320, 256, 1024) == (320, 256)  # already fine: untouched
    assert fit_to_budget(330, 250, 1024) == (320, 256)  # nearest multiples of 32
    w, h = fit_to_budget(64, 48, 1024)  # tiny: upscaled to at least 64 tokens
    assert w % 32 == h % 32 == 0 and visual_tokens(w, h) >= 64 and abs(w / h - 4 / 3) < 0.1
    assert fit_to_budget(4000, 3000, 16) == (128, 96)
    assert visual_tokens(320, 256) == 80
    assert visual_tokens(33, 1) == 2


def test_matches_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for w, h in [(320, 256), (333, 251), (1920, 1080), (50, 700), (4096, 4096), (64, 48)]:
        hh, ww = smart_resize(h, w, factor=32, min_pixels=64 * 1024, max_pixels=1024 * 1024)
        assert fit_to_budget(w, h, 1024) == (ww, hh)


def test_extreme_aspect_is_refused(tmp_path):
    p = _save(Image.new("RGB", (8000, 20), "white"), tmp_path / "strip.png", "PNG")
    with pytest.raises(InputError, match="aspect ratio"):
        load_image(p)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_non_image_and_truncated(tmp_path):
    (tmp_path / "text.png").write_text("hello, not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "text.png")
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused(tmp_path):
    p = _save(Image.new("1", (9000, 9000)), tmp_path / "bomb.png", "PNG")
    assert p.stat().st_size < 200_000
    with pytest.raises(InputError, match="too large"):
        load_image(p)


def test_svg_files_render_as_the_authors_do(tmp_path):
    """An SVG given as an image for the svg task is rendered the way the authors render SVG
    for the model (cairosvg, 336x336 on white), then prepared like any image; other tasks
    refuse it; a broken one is one error line."""
    from verm_local.images import check_image, prepare_image
    from verm_local.tasks import profile

    svg = tmp_path / "pred.svg"
    svg.write_text(
        '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="50" height="80">'
        '<rect x="0" y="0" width="25" height="80" fill="red"/></svg>'
    )
    sent = prepare_image(svg, profile("svg").pred, image_tokens=None)
    assert sent.original_size == sent.sent_size == (336, 336) and sent.encoding == "jpeg"
    # 50x80 scaled to fit 336x336 and centred (SVG's default xMidYMid meet): the red left
    # half spans x 63..168, the rest is the white background.
    rgb = sent.image.convert("RGB").resize((336, 336))
    red, left, right = (rgb.getpixel((x, 168)) for x in (110, 20, 300))
    assert red[0] > 200 and red[1] < 60 and left == right == (255, 255, 255)
    check_image(svg, profile("svg").gt)

    for task in ("chart", "table"):
        with pytest.raises(InputError, match="pred.svg: an SVG file; it is rendered only"):
            prepare_image(svg, profile(task).pred)
        with pytest.raises(InputError, match="pred.svg: an SVG file"):
            check_image(svg, profile(task).gt)
    with pytest.raises(InputError, match="pred.svg: an SVG file"):
        load_image(svg)

    broken = tmp_path / "broken.svg"
    broken.write_text('<svg xmlns="http://www.w3.org/2000/svg"><rect width="oops"')
    with pytest.raises(InputError, match="broken.svg: the SVG does not render"):
        prepare_image(broken, profile("svg").pred)
