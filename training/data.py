"""Datasets behind ``--data SPEC`` and the preprocessing recipes, all checked before any training starts.

Specs:

- ``imagefolder:DIR``: ``DIR/train`` (required), ``DIR/val`` and ``DIR/test`` (optional), one sub-folder
  per class; class names are the sorted sub-folder names (docs/cli.md). Without ``val`` a stratified 10%
  of train is held out for model selection: we never select on test.
- ``vtab:DIR``: VTAB-1k list files (``path label`` lines): ``train800.txt`` + ``val200.txt`` when present,
  else ``train800val200.txt`` with 10% held out, and ``test.txt``.
- ``digits[:N]``: scikit-learn's real 8x8 handwritten digits, upsampled; N train images per class.
- ``faces[:N]`` and ``patches[:N]``: real-photo tasks from images inside scikit-image
  (training/photos.py), N train images per class.
- ``procedural:TASK[:N]``: a procedural task (training/procedural.py), N train images per class.

Preprocessing comes from the backbone's ``pretrained_cfg`` through ``timm.data``; the recipe only chooses
the augmentation (``vtab``: resize, none; ``fgvc``: random resized crop + flip; ``strong``: the timm
ImageNet recipe with RandAugment and random erasing; mixup/cutmix and smoothing live in the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch import nn
from torch.utils.data import Dataset

import ssf
from training import photos, procedural

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
RECIPES = ("vtab", "fgvc", "strong")


class DataError(ValueError):
    """The data spec or the data behind it cannot be used; the message says what to fix."""


class ImageList(Dataset):
    """Images from ``(path or loader, label)`` items; a loader is a zero-argument callable."""

    def __init__(self, items: list[tuple[Any, int]], transform: Callable | None = None) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Image.Image:
        source = self.items[i][0]
        if callable(source):
            return source()
        try:
            with Image.open(source) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {str(source)!r} ({type(e).__name__})") from e

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.image(i)
        return (self.transform(img) if self.transform else img), self.items[i][1]


@dataclass
class Splits:
    """Train/val/test items and the class names they index."""

    labels: list[str]
    train: list[tuple[Any, int]]
    val: list[tuple[Any, int]]
    test: list[tuple[Any, int]] | None


def _holdout(items: list[tuple[Any, int]], fraction: float = 0.1) -> tuple[list, list]:
    """Stratified, deterministic split: every class keeps at least one training image."""
    train, val = [], []
    for label in sorted({y for _, y in items}):
        mine = [it for it in items if it[1] == label]
        k = int(len(mine) * fraction) if len(mine) > 1 else 0
        k = max(k, 1) if len(mine) > 1 else 0
        val += mine[len(mine) - k :] if k else []
        train += mine[: len(mine) - k]
    return train, val


def _folder(split: Path, labels: list[str] | None) -> tuple[list[str], list[tuple[Any, int]]]:
    if not split.is_dir():
        raise DataError(f"missing split folder {str(split)!r}")
    classes = sorted(p.name for p in split.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"split folder {str(split)!r} has no class sub-folders")
    if labels is not None and classes != labels:
        raise DataError(f"{str(split)!r} has classes {classes[:5]} that differ from train's {labels[:5]}")
    items = [
        (f, i)
        for i, c in enumerate(classes)
        for f in sorted((split / c).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DataError(f"split folder {str(split)!r} holds no images")
    empty = [c for i, c in enumerate(classes) if not any(y == i for _, y in items)]
    if empty:
        raise DataError(f"class folder {str(split / empty[0])!r} holds no images")
    return classes, items


def imagefolder(root: Path) -> Splits:
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    labels, train = _folder(root / "train", None)
    if (root / "val").exists():
        val = _folder(root / "val", labels)[1]
    else:
        train, val = _holdout(train)
    test = _folder(root / "test", labels)[1] if (root / "test").exists() else None
    return Splits(labels, train, val, test)


def _list_file(path: Path) -> list[tuple[Any, int]]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{path.name} line {n}: expected 'path label', got {line[:60]!r}")
        items.append((path.parent / parts[0], int(parts[1])))
    if not items:
        raise DataError(f"list file {str(path)!r} is empty")
    return items


def vtab(root: Path) -> Splits:
    if (root / "train800.txt").is_file() and (root / "val200.txt").is_file():
        train, val = _list_file(root / "train800.txt"), _list_file(root / "val200.txt")
    elif (root / "train800val200.txt").is_file():
        train, val = _holdout(_list_file(root / "train800val200.txt"))
    else:
        raise DataError(f"{str(root)!r} has neither train800.txt+val200.txt nor train800val200.txt")
    test = _list_file(root / "test.txt") if (root / "test.txt").is_file() else None
    n = 1 + max(y for _, y in train)
    return Splits([str(i) for i in range(n)], train, val, test)


def _digit_loader(pixels: np.ndarray) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L").resize(
            (64, 64), Image.Resampling.BICUBIC
        )
        return grey.convert("RGB")

    return load


def digits(per_class: int) -> Splits:
    """sklearn digits (1,797 real scans): per_class train, 20/class val, every other scan for test.

    ``digits:80`` is VTAB-1k's budget: 800 train + 200 val = 1,000 images, 797 test.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(0)
    train, val, test = [], [], []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(data.target == label))
        items = [(_digit_loader(data.images[i]), label) for i in idx]
        train += items[:per_class]
        val += items[per_class : per_class + 20]
        test += items[per_class + 20 :]
    return Splits([str(d) for d in range(10)], train, val, test)


def _procedural_loader(task: str, index: int, seed: int) -> Callable[[], Image.Image]:
    return lambda: procedural.render(task, index, seed)[0]


def procedural_task(task: str, per_class: int) -> Splits:
    labels = procedural.TASKS[task]
    k = len(labels)

    def split(n: int, seed: int) -> list[tuple[Any, int]]:
        return [(_procedural_loader(task, i, seed), i % k) for i in range(n * k)]

    return Splits(labels, split(per_class, 1), split(max(per_class // 2, 5), 2), split(20, 3))


def _per_class(text: str, default: int) -> int:
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"images per class must be a positive integer, got {text!r}")
    return int(text)


def load_splits(spec: str) -> Splits:
    """Parse ``--data`` and check the splits (at least two classes, no empty split)."""
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest:
        splits = imagefolder(Path(rest))
    elif kind == "vtab" and rest:
        splits = vtab(Path(rest))
    elif kind == "digits":
        splits = digits(_per_class(rest, 50))
    elif kind in ("faces", "patches"):
        try:
            splits = Splits(*getattr(photos, kind)(_per_class(rest, 10)))
        except photos.PhotoError as e:
            raise DataError(str(e)) from None
    elif kind == "procedural":
        task, _, n = rest.partition(":")
        if task not in procedural.TASKS:
            raise DataError(
                f"unknown procedural task {task!r}; expected one of {', '.join(procedural.TASKS)}"
            )
        splits = procedural_task(task, _per_class(n, 50))
    else:
        raise DataError(
            f"unknown data spec {spec!r}; expected imagefolder:DIR, vtab:DIR, digits[:N], faces[:N], "
            "patches[:N] or procedural:TASK[:N]"
        )
    if len(splits.labels) < 2:
        raise DataError(f"{spec!r} has a single class ({splits.labels[0]!r}); a classifier needs two or more")
    if not splits.val:
        raise DataError(f"{spec!r} leaves no validation images; add a val/ split or more train images")
    return splits


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The eval preprocessing of ``model`` (ssf.data_config), JSON-ready: the delta's ``preprocess``."""
    cfg = ssf.data_config(model, img_size)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def transforms(model: nn.Module, recipe: str, img_size: int | None = None) -> tuple[Callable, Callable]:
    """(train, eval) transforms from the backbone's pretrained_cfg; the recipe picks the augmentation."""
    cfg = ssf.data_config(model, img_size)
    evaluate = create_transform(**cfg, is_training=False)
    if recipe == "vtab":  # the authors' --no-aug: squash to the input size, no crop, no augmentation
        train = create_transform(**{**cfg, "crop_pct": 1.0, "crop_mode": "squash"}, is_training=False)
        evaluate = train
    elif recipe == "fgvc":
        train = create_transform(**cfg, is_training=True, no_aug=False, auto_augment=None, re_prob=0.0)
    elif recipe == "strong":
        train = create_transform(**cfg, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    else:
        raise DataError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    return train, evaluate


def loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    """A single-process loader (2 shared cores: workers would only contend); seeded shuffling."""
    g = torch.Generator().manual_seed(seed)
    sampler: torch.utils.data.Sampler | None = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        shuffle = False
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=g, drop_last=False
    )
