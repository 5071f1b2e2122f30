"""The baselines attach as intended: adapters start as the identity, VPT prompts enter and leave."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from training import loop, methods


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=4).eval()


def test_adapter_starts_as_the_pretrained_model() -> None:
    plain, model = tiny(), tiny()
    methods.prepare(model, "adapter")
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("head.", "peft.")) for n in trainable)


@pytest.mark.parametrize(("method", "per_block"), [("vpt-shallow", False), ("vpt-deep", True)])
def test_vpt_prompts_change_the_output_not_its_shape(method: str, per_block: bool) -> None:
    plain, model = tiny(), tiny()
    methods.prepare(model, method)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        out = model(x)
    assert out.shape == plain(x).shape and not torch.allclose(out, plain(x))
    n = methods.VPT_DEEP_PROMPTS if per_block else methods.VPT_SHALLOW_PROMPTS
    depth = len(list(model.get_submodule("blocks").children())) if per_block else 1
    counts = methods.count_params(model)
    assert counts["trainable_params"] == counts["head_params"] + n * 64 * depth


def test_vpt_refuses_a_model_without_tokens() -> None:
    model = timm.create_model("test_convnext", num_classes=3)
    with pytest.raises(methods.MethodError, match="ViT"):
        methods.prepare(model, "vpt-deep")


def test_bias_trains_shifts_only_and_full_trains_everything() -> None:
    model = tiny()
    methods.prepare(model, "bias")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.endswith(".scale") for n in trainable)
    assert any(n.endswith(".shift") for n in trainable)
    model = tiny()
    methods.prepare(model, "full")
    assert all(p.requires_grad for p in model.parameters())


def test_no_weight_decay_on_1d_tensors() -> None:
    model = tiny()
    methods.prepare(model, "ssf")
    decay, no_decay = loop.param_groups(model, 0.05)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) > 0


def test_warmup_then_cosine_to_min_lr() -> None:
    cfg = loop.TrainConfig(lr=1.0, min_lr=0.0)
    lrs = [loop.lr_at(s, 100, 10, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-9)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
