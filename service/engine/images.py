"""Image decoding and preprocessing: untrusted bytes in, a normalized (N, 3, H, W) tensor out.

Only JPEG, PNG, WebP and BMP are decoded; the format is checked after ``Image.open`` (which only reads the
header), and ``width * height`` is checked against the engine's pixel limit before ``load()`` decodes
anything, so a decompression bomb costs nothing. Every failure is a domain error naming the image index;
nothing here lets a Pillow exception escape.

Every task shares the backbone's preprocessing (``data_config``): requests of many tasks ride in one batch,
and a delta only scales and shifts features of that backbone. The ``preprocess`` field a delta carries
records what training used (for offline and edge users of the file); the server does not read it.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image, ImageOps
from torch import nn

import ssf
from service.engine.protocol import BadImage, ImageTooLarge, InvalidParameter, UnsupportedMediaType
from service.settings import EngineConfig

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})


def data_config(model: nn.Module) -> dict[str, Any]:
    """The backbone's preprocessing (ssf.data_config: pretrained_cfg, the patch embed's fixed size wins)."""
    return ssf.data_config(model)


class Preprocessor:
    """Decode, orient, convert to RGB and transform, within the engine's limits (``max_images_per_request``,
    ``max_body_bytes`` per image, ``max_image_pixels``)."""

    def __init__(self, model: nn.Module, limits: EngineConfig) -> None:
        self.limits = limits
        self.config = data_config(model)
        self.transform: Callable[[Image.Image], torch.Tensor] = timm.data.create_transform(
            **self.config, is_training=False
        )
        # The transform first resizes the short side to about input / crop_pct: a 65535x1 image is only
        # 65535 pixels but would grow to billions, so the resized size is checked too.
        _, height, width = self.config["input_size"]
        self.resize_short = math.ceil(max(height, width) / float(self.config.get("crop_pct") or 1.0)) + 1

    def check_count(self, images: Sequence[bytes]) -> None:
        if not images:
            raise BadImage("the request holds no image")
        limit = self.limits.max_images_per_request
        if len(images) > limit:
            raise ImageTooLarge(f"{len(images)} images in one request; the limit is {limit}")
        for i, data in enumerate(images):
            if len(data) > self.limits.max_body_bytes:
                raise ImageTooLarge(
                    f"image {i} is {len(data)} bytes; the limit is {self.limits.max_body_bytes}"
                )

    def check_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """Preprocessed input from a client: float32 (N, 3, H, W) at the backbone's input size, finite,
        at most ``max_images_per_request`` images; a copy the client can no longer change."""
        want = tuple(self.config["input_size"])
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.float32:
            kind = getattr(pixels, "dtype", type(pixels).__name__)
            raise InvalidParameter(f"pixels must be float32, not {kind}", code="invalid_tensor")
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want or pixels.shape[0] == 0:
            raise InvalidParameter(
                f"pixels have shape {list(pixels.shape)}; this backbone takes "
                f"[N, {', '.join(map(str, want))}] with N >= 1",
                code="invalid_tensor",
            )
        limit = self.limits.max_images_per_request
        if pixels.shape[0] > limit:
            raise ImageTooLarge(f"{pixels.shape[0]} images in one request; the limit is {limit}")
        if not np.isfinite(pixels).all():
            raise InvalidParameter("pixels hold NaN or infinite values", code="invalid_tensor")
        return torch.from_numpy(np.array(pixels, dtype=np.float32, order="C", copy=True))

    def __call__(self, images: Sequence[bytes]) -> torch.Tensor:
        """``check_count``, then ``decode_all``."""
        self.check_count(images)
        return self.decode_all(images)

    def decode_all(self, images: Sequence[bytes]) -> torch.Tensor:
        """All images of one request as one batch, already counted (runs off the event loop)."""
        return torch.stack([self.tensor(self.decode(data, i), i) for i, data in enumerate(images)])

    def tensor(self, img: Image.Image, index: int) -> torch.Tensor:
        try:
            return self.transform(img)
        except Exception as e:  # a decoded image the transform cannot take (degenerate sizes)
            raise BadImage(
                f"image {index} could not be preprocessed: {type(e).__name__}: {str(e)[:200]}"
            ) from e

    def decode(self, data: bytes, index: int) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return self._decode(data, index)
        except (BadImage, ImageTooLarge, UnsupportedMediaType):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge(f"image {index} has too many pixels ({e})") from e
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
            raise BadImage(f"image {index} could not be decoded: {type(e).__name__}: {str(e)[:200]}") from e

    def _decode(self, data: bytes, index: int) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
        except Image.UnidentifiedImageError as e:
            kind = _sniff(data)
            if kind is not None:
                raise UnsupportedMediaType(f"image {index} is {kind}; send JPEG, PNG, WebP or BMP") from e
            raise BadImage(f"image {index} is not a JPEG, PNG, WebP or BMP image") from e
        if img.format not in ALLOWED_FORMATS:  # belt and braces: formats= already restricts the plugins
            raise UnsupportedMediaType(f"image {index} is {img.format}; send JPEG, PNG, WebP or BMP")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise BadImage(f"image {index} has an empty size {width}x{height}")
        if width * height > self.limits.max_image_pixels:
            raise ImageTooLarge(
                f"image {index} is {width}x{height} = {width * height} pixels; "
                f"the limit is {self.limits.max_image_pixels}"
            )
        scale = self.resize_short / min(width, height)
        if scale > 1 and width * height * scale * scale > self.limits.max_image_pixels:
            grown = int(width * height * scale * scale)
            raise ImageTooLarge(
                f"image {index} is {width}x{height}: resizing its short side to {self.resize_short} px "
                f"would make {grown} pixels; the limit is {self.limits.max_image_pixels}"
            )
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
)


def _sniff(data: bytes) -> str | None:
    """Name a real image format we refuse, so the client gets 415 rather than 'undecodable'."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "HEIF/AVIF"
    return None
