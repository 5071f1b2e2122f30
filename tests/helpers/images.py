"""Real images encoded by Pillow, and tiny image folders for training."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cat")


def encode(fmt: str, seed: int, size: tuple[int, int] = (80, 60), **save: Any) -> bytes:
    """Random pixels of ``size`` (width, height) in format ``fmt``; ``save`` goes to ``Image.save``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format=fmt, **save)
    return out.getvalue()


def images(n: int, seed: int = 0) -> list[bytes]:
    formats = ["JPEG", "PNG", "WEBP", "BMP"]
    return [encode(formats[i % 4], seed * 100 + i) for i in range(n)]


def png(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """One flat colour: the smallest valid image, for tests of the HTTP layer."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def make_folder(root: Path, splits: dict[str, int], classes: tuple[str, ...] = CLASSES) -> Path:
    """An image folder (``root/<split>/<class>/<j>.png``); class ``i`` is a noisy image of one colour, so a
    few images per class are learnable."""
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                pixels = rng.integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
                pixels[..., i % 3] += 180
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{j}.png")
    return root
