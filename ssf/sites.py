"""Where SSF goes in a timm model: site discovery from module types and the model family.

A *site* is the output of one op. The SSF affine ``y = scale * op(x) + shift`` is applied along the op's
channel axis, which we take from the op's type (a Linear's features are the last axis, a Conv's are dim 1,
a LayerNorm2d normalizes dim 1, ...). We never guess the axis from a tensor's shape: the authors' code
does, and it is wrong whenever a feature map's width equals its channel count.

Two schemes:

- ``foldable`` (default): every op whose output can be folded into its own parameters, found by generic
  rules over module types, so any timm model works (ViT, Swin incl. PatchMerging, ConvNeXt incl.
  downsample, Mixer, ResNet, EfficientNet, ...).
- ``paper``: the authors' sites, including their omissions (no Swin PatchMerging, no ConvNeXt
  downsample) and ConvNeXt's final site on the residual stream, which cannot fold. It reproduces the
  paper's trainable-parameter counts exactly. Families the paper does not cover fall back to ``foldable``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import timm.layers
import torch
from torch import nn

SiteScheme = Literal["foldable", "paper"]
SCHEMES: tuple[str, ...] = ("foldable", "paper")

# Fold kinds: how a site's scale/shift fold into the module at ``path``.
#   "weight_out": Linear/Conv: scale rows (output channels) of ``weight``, bias' = scale*bias + shift.
#   "affine":     norms: weight' = scale*weight, bias' = scale*bias + shift.
#   "alpha_beta": timm's Affine (ResMLP): alpha' = scale*alpha, beta' = scale*beta + shift.
#   "residual":   not foldable (an explicit affine on a residual stream).
FoldKind = Literal["weight_out", "affine", "alpha_beta", "residual"]


class SiteError(ValueError):
    """The model has no SSF sites under the requested scheme, or an unknown scheme was asked for."""


@dataclass(frozen=True)
class Site:
    """One SSF site.

    ``path`` names the module whose parameters absorb the fold (and the delta's tensor names);
    ``apply_at`` names the module whose *output* the affine is applied to (the same module, except for
    norm+act layers, where it is the norm's inner ``drop`` so that the affine lands before the activation).
    ``channel_dim`` is the channel axis of that output: 1 for channels-first (N, C, ...) outputs of convs
    and 2-D norms, -1 for channels-last outputs (Linear, LayerNorm, and tokens of any rank).
    """

    path: str
    apply_at: str
    channels: int
    channel_dim: int
    fold: FoldKind

    @property
    def foldable(self) -> bool:
        return self.fold != "residual"


_NORM_ACT = tuple(
    getattr(timm.layers, n)
    for n in ("BatchNormAct2d", "GroupNormAct", "LayerNormAct", "LayerNormAct2d")
    if hasattr(timm.layers, n)
)
_CHANNELS_FIRST_LN = tuple(
    getattr(timm.layers, n) for n in ("LayerNorm2d", "LayerNormAct2d") if hasattr(timm.layers, n)
)
_AFFINE = getattr(timm.models.mlp_mixer, "Affine", None)


def _site_for(path: str, module: nn.Module) -> Site | None:
    """The generic rule: a site for every op whose output folds into its own parameters."""
    if isinstance(module, nn.Linear):
        return Site(path, path, module.out_features, -1, "weight_out")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Site(path, path, module.out_channels, 1, "weight_out")
    if _AFFINE is not None and isinstance(module, _AFFINE):
        return Site(path, path, module.alpha.numel(), -1, "alpha_beta")
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        return None  # a norm without affine parameters (or with weight only) has nothing to fold into
    apply_at = f"{path}.drop" if isinstance(module, _NORM_ACT) else path
    if isinstance(module, _CHANNELS_FIRST_LN):
        return Site(path, apply_at, weight.numel(), 1, "affine")
    if isinstance(module, nn.LayerNorm):
        return Site(path, apply_at, weight.numel(), -1, "affine")
    if isinstance(module, nn.GroupNorm):
        return Site(path, apply_at, weight.numel(), 1, "affine")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return Site(path, apply_at, weight.numel(), 1, "affine")
    return None


def head_prefix(model: nn.Module) -> str:
    """The top-level module that holds the classifier (``head``, ``fc``, ``classifier``, ...).

    Everything under it is the task's head (trained, stored whole in the delta), as in the authors'
    ``head.`` rule; that is why ConvNeXt's ``head.norm`` is trainable.
    """
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        raise SiteError(f"{type(model).__name__} is not a timm classifier (no get_classifier())")
    classifier = get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            return name.split(".")[0]
    # num_classes=0: the classifier is an Identity; timm names it the same way.
    for candidate in ("head", "fc", "classifier", "last_linear"):
        if hasattr(model, candidate):
            return candidate
    raise SiteError(f"cannot locate the classifier of {type(model).__name__}")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def family(model: nn.Module) -> str:
    """The paper family of a timm model, by class (never by name guessing)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, ConvNeXt):
        return "convnext"
    return "generic"


def find_sites(model: nn.Module, scheme: str = "foldable") -> list[Site]:
    """All SSF sites of ``model`` under ``scheme``, in module order. Fails loudly when there are none."""
    if scheme not in SCHEMES:
        raise SiteError(f"unknown site scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    head = head_prefix(model)
    sites = [
        site
        for path, module in model.named_modules()
        if path and not _under(path, head) and (site := _site_for(path, module)) is not None
    ]
    if scheme == "paper":
        sites = _paper_sites(model, sites)
    if not sites:
        raise SiteError(f"no SSF sites found in {type(model).__name__} under scheme {scheme!r}")
    return sites


def _paper_sites(model: nn.Module, generic: list[Site]) -> list[Site]:
    """The authors' as-coded sites (reference §1): their omissions included, on purpose."""
    fam = family(model)
    if fam == "swin":
        # PatchMerging never got SSF (tuning_mode reached it as a list).
        return [s for s in generic if ".downsample" not in s.path]
    if fam == "convnext":
        kept = [s for s in generic if ".downsample" not in s.path]
        channels = getattr(model, "num_features")  # noqa: B009  (a timm attribute mypy cannot see)
        # The final site sits on the residual stream after the last stage and cannot fold.
        return [*kept, Site("stages", "stages", int(channels), 1, "residual")]
    return generic  # ViT: the generic rule gives exactly the authors' 8 kinds of site


def site_params(sites: list[Site]) -> int:
    """Trainable SSF parameters: a scale and a shift per channel per site."""
    return 2 * sum(s.channels for s in sites)


def input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) the model takes: a fixed patch-embed size wins over the (possibly stale) pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(int(d) for d in cfg.get("input_size", (3, 224, 224)))
    for module in model.modules():
        fixed = getattr(module, "img_size", None) if isinstance(module, timm.layers.PatchEmbed) else None
        if fixed is not None and getattr(module, "strict_img_size", True) and len(size) == 3:
            return (size[0], int(fixed[0]), int(fixed[1]))
    return size
