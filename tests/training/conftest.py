"""A tiny backbone with random weights made here and a tiny image folder, shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import ssf

MODEL = "test_vit"  # timm's tiny registered ViT (~0.37M parameters)
CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=0)
    path = tmp_path_factory.mktemp("backbone") / "test_vit.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in ssf.backbone_state(model).items()}, str(path))
    return path


def make_folder(root: Path, splits: dict[str, int], classes: tuple[str, ...] = CLASSES) -> Path:
    """Class ``i`` is a noisy image of one colour, so a few images per class are learnable."""
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                pixels = rng.integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
                pixels[..., i % 3] += 180
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{j}.png")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
