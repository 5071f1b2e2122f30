"""The paper's trainable-parameter figures, from the architecture alone (meta device, no weights)."""

from __future__ import annotations

import pytest
import timm
import torch

import ssf
from tests.helpers.models import make


def counts(name: str, num_classes: int, scheme: str) -> tuple[int, int, int]:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    sites = ssf.find_sites(model, scheme)
    prefix = ssf.head_prefix(model) + "."
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
    return ssf.site_params(sites), head, len(sites)


@pytest.mark.parametrize(
    ("name", "classes", "site_params", "head_params", "total"),
    [
        ("vit_base_patch16_224", 100, 205_824, 76_900, 282_724),
        ("vit_base_patch16_224", 1000, 205_824, 769_000, 974_824),
        ("swin_base_patch4_window7_224", 100, 267_264, 102_500, 369_764),
        ("convnext_base", 100, 255_232, 104_548, 359_780),
    ],
)
def test_paper_counts(name: str, classes: int, site_params: int, head_params: int, total: int) -> None:
    s, h, _ = counts(name, classes, "paper")
    assert (s, h, s + h) == (site_params, head_params, total)


def test_vit_paper_has_74_sites_and_equals_foldable() -> None:
    assert counts("vit_base_patch16_224", 100, "paper")[2] == 74
    assert counts("vit_base_patch16_224", 100, "foldable") == counts("vit_base_patch16_224", 100, "paper")


def test_foldable_adds_what_the_authors_dropped() -> None:
    # reference §5: the authors' coded-but-dropped PatchMerging site (after its 4C norm) gives 274,432;
    # foldable also tunes the bias-free 4C->2C reduction: + 2 * (256 + 512 + 1024).
    assert counts("swin_base_patch4_window7_224", 100, "foldable")[0] == 274_432 + 2 * (256 + 512 + 1024)
    # ConvNeXt gains the downsample sites (260,608 with them) and loses the unfoldable final one.
    assert counts("convnext_base", 100, "foldable")[0] == 260_608 - 2 * 1024


def test_trainable_selection_is_sites_and_head_only() -> None:
    model = make("convnext")
    sites = ssf.inject_ssf(model, "paper")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("ssf.", "head."))}
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("ssf.")) == ssf.site_params(
        sites
    )


def test_init_follows_the_paper() -> None:
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    ssf.inject_ssf(model, check=False)
    scale = torch.cat([m.scale for m in model.ssf.values()]).detach()
    shift = torch.cat([m.shift for m in model.ssf.values()]).detach()
    assert abs(float(scale.mean()) - 1) < 1e-3 and abs(float(scale.std()) - 0.02) < 1e-3
    assert abs(float(shift.mean())) < 1e-3 and abs(float(shift.std()) - 0.02) < 1e-3
