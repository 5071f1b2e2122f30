"""Real-photo tasks built from images that ship inside scikit-image (no download), VTAB-1k-like budgets.

- ``faces``: scikit-image's LFW subset, 100 real face crops vs 100 real non-face crops (25x25 grey).
  ``N`` train images per class, 10 per class for validation, the rest (``90 - N`` per class) for test.
- ``patches``: which of ten real photographs a grey patch comes from (astronaut, brick, camera, cat,
  coffee, coins, grass, gravel, moon, rocket): texture and structure recognition in the spirit of VTAB's
  DTD. Train and val patches are cut from the left 55 % of each photo, test patches from the right 45 %,
  so no test pixel was ever seen in training. Patch side 25-40 % of the photo's short side, random
  position and mirror, all a pure function of (split, index): reproducible, nothing stored on disk.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PATCH_PHOTOS: tuple[str, ...] = ("astronaut", "brick", "camera", "chelsea", "coffee")
PATCH_PHOTOS += ("coins", "grass", "gravel", "moon", "rocket")
PATCH_LABELS = ["astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel", "moon", "rocket"]
FACE_LABELS = ["face", "non-face"]
PATCH_TEST_PER_CLASS = 40
PATCH_VAL_PER_CLASS = 10
FACE_VAL_PER_CLASS = 10
Item = tuple[Callable[[], Image.Image], int]


class PhotoError(ValueError):
    """A photo task cannot be built (scikit-image missing, or a budget larger than the data)."""


def _skimage_data() -> Any:
    try:
        from skimage import data
    except ModuleNotFoundError:
        raise PhotoError("real-photo tasks need scikit-image: pip install scikit-image") from None
    return data


@functools.cache
def _grey_photo(name: str) -> np.ndarray:
    img = np.asarray(getattr(_skimage_data(), name)())
    return np.asarray(Image.fromarray(img).convert("L")) if img.ndim == 3 else img.astype(np.uint8)


def patch_box(label: int, split: str, index: int) -> tuple[int, int, int, bool]:
    """(x0, y0, side, mirrored) of patch ``index``: test patches right of 55 % of the width, others left."""
    h, w = _grey_photo(PATCH_PHOTOS[label]).shape
    rng = np.random.default_rng([label, index, 0 if split == "test" else 1])
    side = int(rng.uniform(0.25, 0.40) * min(h, w))
    lo, hi = (int(0.55 * w), w) if split == "test" else (0, int(0.55 * w))
    x0 = int(rng.integers(lo, max(lo + 1, hi - side + 1)))
    return x0, int(rng.integers(0, h - side + 1)), side, bool(rng.random() < 0.5)


def _patch_loader(label: int, split: str, index: int) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        photo = _grey_photo(PATCH_PHOTOS[label])
        x0, y0, side, mirrored = patch_box(label, split, index)
        patch = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
        if mirrored:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return patch.convert("RGB")

    return load


def patches(per_class: int) -> tuple[list[str], list[Item], list[Item], list[Item]]:
    """(labels, train, val, test): ``per_class`` train, 10 val and 40 test patches per photo."""
    train, val, test = [], [], []
    for label in range(len(PATCH_PHOTOS)):
        left = [_patch_loader(label, "train", i) for i in range(per_class + PATCH_VAL_PER_CLASS)]
        train += [(f, label) for f in left[:per_class]]
        val += [(f, label) for f in left[per_class:]]
        test += [(_patch_loader(label, "test", i), label) for i in range(PATCH_TEST_PER_CLASS)]
    return PATCH_LABELS, train, val, test


def _face_loader(pixels: np.ndarray) -> Callable[[], Image.Image]:
    return lambda: Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), "L").convert("RGB")


def faces(per_class: int) -> tuple[list[str], list[Item], list[Item], list[Item]]:
    """(labels, train, val, test) from the LFW subset; every image in exactly one split."""
    images = np.asarray(_skimage_data().lfw_subset())  # 100 faces, then 100 non-faces
    available = len(images) // 2 - FACE_VAL_PER_CLASS - 10
    if per_class > available:
        raise PhotoError(f"faces has 100 images per class; at most {available} can train (10 val, 10+ test)")
    rng = np.random.default_rng(0)
    train, val, test = [], [], []
    for label in range(2):
        idx = rng.permutation(np.arange(label * 100, (label + 1) * 100))
        items = [(_face_loader(images[i]), label) for i in idx]
        train += items[:per_class]
        val += items[per_class : per_class + FACE_VAL_PER_CLASS]
        test += items[per_class + FACE_VAL_PER_CLASS :]
    return FACE_LABELS, train, val, test


def export(spec: str, root: Path) -> dict[str, int]:
    """Write a task as an image folder (``root/{train,val,test}/<class>/NNNN.png``), the layout
    ``--data imagefolder:DIR`` reads: a real dataset to try the whole train -> upload -> predict path on."""
    tasks = {"faces": faces, "patches": patches}
    kind, _, n = spec.partition(":")
    if kind not in tasks or not (n or "10").isdigit():
        raise PhotoError(f"expected faces[:N] or patches[:N], got {spec!r}")
    labels, *splits = tasks[kind](int(n or "10"))  # type: ignore[operator]
    counts = {}
    for name, items in zip(("train", "val", "test"), splits, strict=True):
        for i, (load, label) in enumerate(items):
            folder = root / name / labels[label]
            folder.mkdir(parents=True, exist_ok=True)
            load().save(folder / f"{i:04d}.png")
        counts[name] = len(items)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.photos", description="A real-photo task as folders.")
    p.add_argument("spec", help="faces[:N] or patches[:N] (N train images per class)")
    p.add_argument("out", type=Path, help="folder to write train/, val/, test/ into")
    args = p.parse_args(argv)
    try:
        counts = export(args.spec, args.out)
    except PhotoError as e:
        print(f"photos: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"photos: wrote {counts} images under {args.out}")


if __name__ == "__main__":
    main()
