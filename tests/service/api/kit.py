"""Real parts for the HTTP tests: a tiny random-weight backbone saved as safetensors, deltas made with the
ssf core (random scale/shift and heads, so two versions classify differently), Pillow-encoded images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
from PIL import Image

import ssf

MODEL = "test_vit"


def backbone_file(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = directory / "backbone.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def delta_bytes(weights: Path, task: str, seed: int, num_classes: int = 4) -> bytes:
    model = ssf.create_backbone(MODEL, weights, num_classes=num_classes)
    fingerprint = ssf.fingerprint(model)
    ssf.inject_ssf(model, "foldable")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for affine in model.ssf.values():
            affine.scale.copy_(1 + 0.3 * torch.randn(affine.scale.shape, generator=g))
            affine.shift.copy_(0.3 * torch.randn(affine.shift.shape, generator=g))
        for name, p in model.named_parameters():
            if name.startswith(ssf.head_prefix(model) + "."):
                p.copy_(torch.randn(p.shape, generator=g))
    delta = ssf.delta_from_model(
        model,
        task=task,
        backbone=MODEL,
        backbone_fingerprint=fingerprint,
        site_scheme="foldable",
        labels=[f"{task}-{i}" for i in range(num_classes)],
        metrics={"val_acc": 0.5},
    )
    return ssf.delta_to_bytes(delta)


def image(fmt: str, seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format=fmt)
    return out.getvalue()
