"""Deltas made with the ssf core: a tuned model (random scale/shift and a random head, so two tasks and two
versions classify differently), its delta file, and the offline reference it must reproduce.

One way for every test: ``make_task`` tunes ``models.make(family)``; ``delta_bytes`` writes it; a server
test that only needs "a valid delta for the backbone file" calls ``task_delta``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import ssf
from ssf.layers import CONTAINER, ScaleShift
from tests.helpers.models import FAMILY_VIT, MODELS, make


def randomize_sites(model: nn.Module, generator: torch.Generator, std: float = 0.3) -> None:
    """Scale ~ 1 + N(0, std), shift ~ N(0, std) at every injected SSF site."""
    with torch.no_grad():
        for affine in getattr(model, CONTAINER).values():
            assert isinstance(affine, ScaleShift)
            affine.scale.copy_(1 + std * torch.randn(affine.scale.shape, generator=generator))
            affine.shift.copy_(std * torch.randn(affine.shift.shape, generator=generator))


def make_task(
    family: str,
    seed: int,
    num_classes: int = 5,
    method: str = "ssf",
    std: float = 0.3,
    backbone_seed: int = 0,
) -> nn.Module:
    """``make(family, backbone_seed)`` with SSF sites of random scale/shift (identity for other methods)
    and a random head of ``num_classes``: what training would hand over, made in milliseconds."""
    model = make(family, backbone_seed)
    model.reset_classifier(num_classes)
    g = torch.Generator().manual_seed(1000 + seed)
    ssf.inject_ssf(model, "foldable")
    with torch.no_grad():
        if method == "ssf":
            randomize_sites(model, g, std)
        else:  # bias/linear deltas still carry every site, at identity
            for affine in getattr(model, CONTAINER).values():
                affine.scale.fill_(1)
                affine.shift.fill_(0)
        head = ssf.head_prefix(model) + "."
        for name, p in model.named_parameters():
            if name.startswith(head):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1))
    return model.eval()


def make_delta(
    model: nn.Module,
    task: str,
    backbone: str,
    *,
    method: str = "ssf",
    labels: list[str] | None = None,
    **metadata: Any,
) -> ssf.Delta:
    """The delta of a tuned model, labelled ``<task>-class<i>`` unless ``labels`` are given; ``metadata``
    goes to ``ssf.delta_from_model`` (preprocess, metrics)."""
    return ssf.delta_from_model(
        model,
        task=task,
        backbone=backbone,
        backbone_fingerprint=ssf.fingerprint(model),
        site_scheme="foldable",
        labels=labels or [f"{task}-class{i}" for i in range(model.num_classes)],
        method=method,
        **metadata,
    )


def delta_bytes(family: str, model: nn.Module, task: str, method: str = "ssf") -> bytes:
    return ssf.delta_to_bytes(make_delta(model, task, MODELS[family], method=method))


def task_delta(task: str, seed: int, num_classes: int = 4, backbone_seed: int = 0) -> bytes:
    """A valid delta for ``models.backbone_file("vit", ..., backbone_seed)`` (the servers' backbone)."""
    model = make_task(FAMILY_VIT, seed, num_classes, backbone_seed=backbone_seed)
    return delta_bytes(FAMILY_VIT, model, task)


def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Offline reference: the folded plain timm model (ssf.merge_model)."""
    with torch.no_grad():
        return ssf.merge_model(model)(x)


def model_from_delta(model_name: str, weights: Path, delta: ssf.Delta) -> nn.Module:
    """The delta applied to a fresh backbone with unfolded sites (what the server's torch path does)."""
    model = ssf.create_backbone(model_name, weights, delta.num_classes)
    if delta.sites:
        ssf.inject_ssf(model, delta.site_scheme)
        for key, affine in getattr(model, CONTAINER).items():
            scale, shift = delta.sites[key.replace("/", ".")]
            affine.scale.data.copy_(scale)
            affine.shift.data.copy_(shift)
    model.load_state_dict(delta.head, strict=False)
    return model.eval()
