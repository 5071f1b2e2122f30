"""Tiny backbones of every family the core supports, with random weights made here (no downloads).

``make`` is the one way a test gets a backbone; ``backbone_file`` writes the same weights for anything that
loads a backbone by timm name (the engine, ``ssf-serve``, ``ssf-train``), so ``ssf.fingerprint`` agrees on
both sides."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models import register_model
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
from torch import nn

import ssf

NUM_CLASSES = 7
FAMILY_VIT = "vit"


@register_model
def engine_test_swin(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A small Swin (timm has no test_swin): 64 px, window 4, so window batches are k*B. Registered so that
    whatever loads a backbone by name can load it."""
    args: dict[str, Any] = dict(
        embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2), img_size=64, window_size=4
    )
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **dict(args, **kwargs))


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


# the timm name of each family that can be built by name (what the engine and the CLIs are given)
MODELS = {"vit": "test_vit", "convnext": "test_convnext", "resnet": "test_resnet", "swin": "engine_test_swin"}
MODEL = MODELS[FAMILY_VIT]

FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "vit": partial(_timm, MODELS["vit"]),
    "vit_noqkvbias_avgpool": partial(_timm, "test_vit", qkv_bias=False, global_pool="avg", fc_norm=True),
    "swin": partial(_timm, MODELS["swin"]),
    "convnext": partial(_timm, MODELS["convnext"]),
    "mixer": _mixer,
    "resmlp": _resmlp,
    "resnet": partial(_timm, MODELS["resnet"]),
    "efficientnet": partial(_timm, "test_efficientnet"),
}


def make(family: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A model with every parameter and BN statistic randomised (zero-init heads would hide errors).

    The random stream runs through the head too (BN statistics come after it), so a backbone's weights
    are those of ``seed`` with the default ``num_classes``: builders change the head afterwards."""
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


def backbone_file(family: str, directory: Path, seed: int = 0) -> Path:
    """``make(family, seed)``'s frozen backbone (no head) as a safetensors file in ``directory``; written
    once, so a session-wide directory serves every test."""
    path = directory / f"{family}-{seed}.safetensors"
    if not path.exists():
        state = ssf.backbone_state(make(family, seed))
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
