"""PEFT's best test, ours: unmerged SSF model vs the folded plain timm model, every family, both schemes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import ssf
from ssf.sites import input_size
from tests.helpers.deltas import randomize_sites
from tests.helpers.models import FAMILIES, NUM_CLASSES, make

CASES = [(f, s) for f in FAMILIES for s in ("foldable", "paper")]


@pytest.mark.parametrize(("family", "scheme"), CASES)
def test_folded_plain_model_matches_unmerged(family: str, scheme: str) -> None:
    model = make(family)
    base_classes = {n: type(m) for n, m in model.named_modules()}
    base_count = sum(p.numel() for p in model.parameters())
    sites = ssf.inject_ssf(model, scheme)
    randomize_sites(model, torch.Generator().manual_seed(1))
    x = torch.randn(3, *input_size(model), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain_out = make(family)(x)
        ssf_out = model(x)
        merged = ssf.merge_model(model)
        merged_out = merged(x)
    # the perturbation is real (the test could fail), and folding reproduces it
    assert (ssf_out - plain_out).abs().max() > 1e-2
    assert (ssf_out - merged_out).abs().max() <= 1e-5 * max(1.0, float(ssf_out.abs().max()))

    residual = [s for s in sites if not s.foldable]
    if residual:  # only paper-scheme ConvNeXt: its final site stays an explicit affine
        assert family == "convnext" and scheme == "paper" and [s.path for s in residual] == ["stages"]
        return
    assert not hasattr(merged, "ssf") and not any(m._forward_hooks for m in merged.modules())
    assert {n: type(m) for n, m in merged.named_modules()} == base_classes
    created = [k for k in merged.state_dict() if k not in make(family).state_dict()]
    assert all(k.endswith(".bias") for k in created)
    extra = sum(merged.state_dict()[k].numel() for k in created)
    assert sum(p.numel() for p in merged.parameters()) == base_count + extra

    fresh = FAMILIES[family](num_classes=NUM_CLASSES).eval()
    assert sorted(ssf.add_created_biases(fresh, merged.state_dict())) == sorted(created)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(x), merged_out, atol=1e-6)


def test_fold_state_dict_is_pure() -> None:
    model = make("vit")
    sites = ssf.find_sites(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = {k: v.clone() for k, v in base.items()}
    tensors = {s.path: (torch.full((s.channels,), 2.0), torch.ones(s.channels)) for s in sites}
    merged = ssf.fold_state_dict(base, sites, tensors)
    assert all(torch.equal(base[k], snapshot[k]) for k in base)
    qkv = sites[1].path
    assert torch.equal(merged[f"{qkv}.weight"], 2 * base[f"{qkv}.weight"])
    assert torch.equal(merged[f"{qkv}.bias"], 2 * base[f"{qkv}.bias"] + 1)


def test_fused_qkv_vector_follows_linear_output_order() -> None:
    """A scale on the q third only must change only q's rows of the fused weight."""
    model = make("vit")
    site = next(s for s in ssf.find_sites(model) if s.path.endswith("attn.qkv"))
    dim = site.channels // 3
    scale = torch.ones(site.channels)
    scale[:dim] = 3.0
    merged = ssf.fold_state_dict(model.state_dict(), [site], {site.path: (scale, torch.zeros(site.channels))})
    w0, w1 = model.state_dict()[f"{site.path}.weight"], merged[f"{site.path}.weight"]
    assert torch.equal(w1[:dim], 3 * w0[:dim]) and torch.equal(w1[dim:], w0[dim:])


def test_convnext_paper_final_site_is_not_foldable() -> None:
    model = make("convnext")
    sites = ssf.find_sites(model, "paper")
    final = sites[-1]
    assert final.path == "stages" and not final.foldable
    with pytest.raises(ssf.NotFoldableError, match="stages"):
        ssf.fold_state_dict(model.state_dict(), [final], {"stages": (torch.ones(1), torch.zeros(1))})


def test_channel_axis_comes_from_the_op_not_the_shape() -> None:
    """ConvNeXt with width == channels: the authors' shape test would scale the width axis."""
    model = timm.create_model("test_convnext", pretrained=False, num_classes=3).eval()
    sites = {s.path: s for s in ssf.find_sites(model)}
    assert sites["stem.0"].channel_dim == 1  # conv output, NCHW
    assert sites["stages.0.blocks.0.norm"].channel_dim == -1  # channels-last LayerNorm in the block
    assert sites["stages.0.blocks.0.conv_dw"].channel_dim == 1
    ssf.inject_ssf(model)
    randomize_sites(model, torch.Generator().manual_seed(1))
    c = sites["stem.0"].channels
    x = torch.randn(1, 3, 4 * c, 4 * c)  # stem output is (1, C, C, C): width equals channels
    with torch.no_grad():
        assert torch.allclose(model(x), ssf.merge_model(model)(x), atol=1e-5)


def test_sites_that_never_fire_fail_loudly() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)
            self.pretrained_cfg = {"input_size": (4,)}

        def get_classifier(self) -> nn.Module:
            return self.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(nn.functional.linear(x, self.fc.weight, self.fc.bias))  # bypasses the module

    with pytest.raises(ssf.SiteError, match="never called"):
        ssf.inject_ssf(Skips())


def test_unknown_scheme_and_no_sites_are_refused() -> None:
    with pytest.raises(ssf.SiteError, match="unknown site scheme"):
        ssf.find_sites(make("vit"), "every")
