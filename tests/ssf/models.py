"""Tiny models of every family the core supports, with random weights made here (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import timm
import torch
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
from torch import nn

NUM_CLASSES = 7


def _swin(num_classes: int = NUM_CLASSES) -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=num_classes,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 2),
        img_size=64,
        window_size=4,
    )


def _mixer(num_classes: int = NUM_CLASSES) -> nn.Module:
    return MlpMixer(num_classes=num_classes, img_size=64, patch_size=8, num_blocks=2, embed_dim=32)


def _resmlp(num_classes: int = NUM_CLASSES) -> nn.Module:
    return MlpMixer(
        num_classes=num_classes,
        img_size=64,
        patch_size=8,
        num_blocks=2,
        embed_dim=32,
        mlp_ratio=4,
        block_layer=partial(ResBlock, init_values=0.1),
        norm_layer=Affine,
    )


def _timm(name: str, num_classes: int = NUM_CLASSES, **kwargs: object) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "vit": partial(_timm, "test_vit"),
    "vit_noqkvbias_avgpool": partial(_timm, "test_vit", qkv_bias=False, global_pool="avg", fc_norm=True),
    "swin": _swin,
    "convnext": partial(_timm, "test_convnext"),
    "mixer": _mixer,
    "resmlp": _resmlp,
    "resnet": partial(_timm, "test_resnet"),
    "efficientnet": partial(_timm, "test_efficientnet"),
}


def make(family: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A model with every parameter and BN statistic randomised (zero-init heads would hide errors)."""
    torch.manual_seed(seed)
    model = FAMILIES[family](num_classes=num_classes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() < 2:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.5 / p[0].numel() ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()
