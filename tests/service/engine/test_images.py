"""Untrusted image bytes: only JPEG/PNG/WebP/BMP, EXIF orientation applied, bombs refused before decoding,
every failure a domain error that names the image."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

from service.engine.images import Preprocessor
from service.engine.protocol import BadImage, ImageTooLarge, UnsupportedMediaType
from service.settings import EngineConfig
from tests.helpers.images import encode, images
from tests.helpers.real_engine import run, vit_engine


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(
        timm.create_model("test_vit", pretrained=False), EngineConfig(max_images_per_request=4)
    )


def test_every_allowed_format_and_mode_decodes(pre: Preprocessor) -> None:
    batch = [*images(4), encode("PNG", 1, size=(30, 200))]
    gray = io.BytesIO()
    Image.new("L", (50, 50), 128).save(gray, format="PNG")
    rgba = io.BytesIO()
    Image.new("RGBA", (50, 50), (1, 2, 3, 4)).save(rgba, format="PNG")
    pal = io.BytesIO()
    Image.new("P", (50, 50), 3).save(pal, format="BMP")
    for data in (*batch, gray.getvalue(), rgba.getvalue(), pal.getvalue()):
        x = pre([data])
        assert tuple(x.shape) == (1, 3, 160, 160)  # test_vit's pretrained_cfg size, not a hard-coded 224


def test_exif_orientation_is_applied(pre: Preprocessor) -> None:
    img = Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8))  # 80 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = io.BytesIO()
    img.save(out, format="JPEG", exif=exif)
    assert pre.decode(out.getvalue(), 0).size == (40, 80)


def test_truncated_and_random_bytes_are_bad_images_naming_the_index(pre: Preprocessor) -> None:
    jpeg = encode("JPEG", 3, size=(200, 200))
    with pytest.raises(BadImage, match="image 1"):
        pre([images(1)[0], jpeg[: len(jpeg) // 2]])
    rng = np.random.default_rng(0)
    with pytest.raises(BadImage, match="image 0"):
        pre([rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()])
    with pytest.raises(BadImage):
        pre([b""])
    with pytest.raises(BadImage):
        pre([])


def test_unsupported_formats_are_415(pre: Preprocessor) -> None:
    for fmt in ("GIF", "TIFF"):
        with pytest.raises(UnsupportedMediaType, match="image 0"):
            pre([encode(fmt, 1)])


def test_decompression_bomb_is_refused_before_decoding(pre: Preprocessor) -> None:
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, format="PNG")  # 400 Mpx in a few tens of KB
    assert len(out.getvalue()) < 1_000_000
    with pytest.raises(ImageTooLarge, match="image 0"):
        pre([out.getvalue()])
    small_limit = Preprocessor(
        timm.create_model("test_vit", pretrained=False), EngineConfig(max_image_pixels=1000)
    )
    with pytest.raises(ImageTooLarge, match="80x60"):
        small_limit([encode("PNG", 0)])


def test_extreme_aspect_ratio_cannot_blow_up_in_the_resize(pre: Preprocessor) -> None:
    out = io.BytesIO()
    Image.new("L", (65535, 1)).save(out, format="PNG")  # 65535 pixels, but billions after the resize
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match="65535x1"):
        pre([out.getvalue()])
    assert time.monotonic() - started < 1.0
    assert tuple(pre([encode("PNG", 0, size=(400, 40))]).shape) == (1, 3, 160, 160)  # a 10:1 strip is fine


def test_odd_modes_and_sizes_are_accepted(pre: Preprocessor) -> None:
    for mode, fmt in (("CMYK", "JPEG"), ("LA", "PNG"), ("I;16", "PNG"), ("1", "BMP"), ("P", "WEBP")):
        out = io.BytesIO()
        Image.new(mode, (50, 40)).save(out, format=fmt)
        assert tuple(pre([out.getvalue()]).shape) == (1, 3, 160, 160), mode
    assert tuple(pre([encode("PNG", 0, size=(1, 1))]).shape) == (1, 3, 160, 160)


def test_count_and_byte_limits(pre: Preprocessor) -> None:
    with pytest.raises(ImageTooLarge, match="5 images"):
        pre(images(5))
    tight = Preprocessor(timm.create_model("test_vit", pretrained=False), EngineConfig(max_body_bytes=1024))
    bmp = encode("BMP", 0)
    assert len(bmp) > 1024
    with pytest.raises(ImageTooLarge, match="image 0"):
        tight([bmp])


def test_engine_answers_bad_images_with_domain_errors(weights_dir: Path) -> None:
    from tests.helpers.deltas import delta_bytes, make_task
    from tests.helpers.models import FAMILY_VIT

    async def scenario(engine) -> None:  # type: ignore[no-untyped-def]
        await engine.add_task(delta_bytes(FAMILY_VIT, make_task(FAMILY_VIT, 60), "img"), None, False)
        with pytest.raises(BadImage, match="image 1"):
            await engine.predict("img", [images(1)[0], b"\x00" * 100], 1)
        with pytest.raises(UnsupportedMediaType):
            await engine.predict("img", [encode("GIF", 0)], 1)
        assert (await engine.predict("img", images(2), 1)).version == 1

    run(vit_engine(weights_dir), scenario)


def test_truncations_and_bit_flips_only_ever_raise_domain_errors(pre: Preprocessor) -> None:
    """A small S1: every cut point class and random bit flips, per format; never an unhandled exception."""
    rng = np.random.default_rng(1)
    outcomes: dict[str, int] = {}
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        data = encode(fmt, 5, size=(64, 48))
        cases = [data[: int(len(data) * f)] for f in np.linspace(0.02, 0.98, 12)]
        for _ in range(25):
            flipped = bytearray(data)
            for pos in rng.integers(0, len(data), 4):
                flipped[pos] ^= 1 << int(rng.integers(0, 8))
            cases.append(bytes(flipped))
        for case in cases:
            try:
                pre([case])
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except (BadImage, ImageTooLarge, UnsupportedMediaType) as e:
                outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
    assert outcomes.get("BadImage", 0) > 20  # the corpus really was broken
