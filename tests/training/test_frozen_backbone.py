"""Frozen means bit-identical: every method that writes a delta leaves the backbone's state_dict unchanged
through training, BatchNorm buffers included, for every family the fold tests cover."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssf
from tests.helpers.models import FAMILIES, NUM_CLASSES, make
from training import loop, methods
from training.loop import TrainConfig

BN_FAMILIES = ("resnet", "efficientnet")


def batches(model: nn.Module, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    size = ssf.sites.input_size(model)
    return [
        (torch.randn(2, *size, generator=g), torch.randint(0, NUM_CLASSES, (2,), generator=g))
        for _ in range(n)
    ]


def train_briefly(family: str, method: str) -> tuple[dict[str, torch.Tensor], nn.Module]:
    model = make(family)
    before = {k: v.clone() for k, v in ssf.backbone_state(model).items()}
    methods.prepare(model, method)
    data = batches(model)
    loop.train(model, data, data[:1], TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0), NUM_CLASSES)
    return before, model


@pytest.mark.parametrize("method", methods.FOLDING)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_leaves_the_backbone_bit_identical(family: str, method: str) -> None:
    before, model = train_briefly(family, method)
    after = ssf.backbone_state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is None or torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("family", BN_FAMILIES)
def test_without_the_freeze_batchnorm_statistics_drift(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the check above can fail, and would without freeze_norm_statistics."""
    monkeypatch.setattr(loop, "freeze_norm_statistics", lambda model: None)
    before, model = train_briefly(family, "ssf")
    after = ssf.backbone_state(model)
    assert any(k.endswith("running_mean") and not torch.equal(before[k], after[k]) for k in before)


def test_full_fine_tuning_still_updates_batchnorm_statistics() -> None:
    before, model = train_briefly("resnet", "full")
    after = ssf.backbone_state(model)
    assert any(k.endswith("running_mean") and not torch.equal(before[k], after[k]) for k in before)
