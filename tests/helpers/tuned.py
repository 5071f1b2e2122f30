"""Tasks for mixed-path tests: a test model with random SSF scales/shifts and head (``tuned``), and the
engine entry holding its delta (``entry``)."""

from __future__ import annotations

import torch

import ssf
from service.engine.residency import TaskEntry
from service.store.base import StoredTask
from tests.helpers.models import make


def tuned(family: str, seed: int) -> torch.nn.Module:
    model = make(family)
    ssf.inject_ssf(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for affine in model.ssf.values():
            affine.scale.copy_(1 + 0.3 * torch.randn(affine.scale.shape, generator=g))
            affine.shift.copy_(0.3 * torch.randn(affine.shift.shape, generator=g))
        for p in model.get_classifier().parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def entry(family: str, model: torch.nn.Module, name: str) -> TaskEntry:
    from ssf.layers import head_tensors, site_tensors

    delta = ssf.Delta(
        name,
        family,
        "",
        "foldable",
        "ssf",
        [str(k) for k in range(7)],
        site_tensors(model),
        head_tensors(model),
    )
    return TaskEntry(stored=StoredTask(name, 1, "", 0, ""), delta=delta)
