"""Folding (re-parameterisation): SSF's scale and shift absorbed into the preceding op's parameters.

``y = scale * (W x + b) + shift = (scale ⊙ W) x + (scale ⊙ b + shift)``, and likewise for norms'
affine parameters. Everything here is a pure function of the *pristine* base weights: the base is never
mutated and nothing is ever "unmerged" by division (PEFT's IA³ does, and warns that it is inexact).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ssf.layers import CONTAINER, ScaleShift, SiteAffine, attach_sites, detach_sites
from ssf.sites import Site

SiteTensors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class NotFoldableError(ValueError):
    """A site sits where no parameter can absorb it (ConvNeXt's final site under the paper scheme)."""


def _scaled(t: torch.Tensor, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return (t.float() * scale.float().view(*shape)).to(t.dtype)


def _shifted(
    b: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    if b is None:  # the op had no bias (qkv_bias=False, PatchMerging.reduction, convs before BN)
        return shift.to(device=like.device, dtype=like.dtype).clone()
    return (b.float() * scale.float() + shift.float()).to(b.dtype)


def fold_site(
    base: Mapping[str, torch.Tensor], site: Site, scale: torch.Tensor, shift: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The new tensors for one site (keys in the model's state_dict names)."""
    p = site.path
    if site.fold == "weight_out":
        w = base[f"{p}.weight"]
        return {
            f"{p}.weight": _scaled(w, scale, (-1,) + (1,) * (w.dim() - 1)),
            f"{p}.bias": _shifted(base.get(f"{p}.bias"), scale, shift, w),
        }
    if site.fold == "affine":
        w = base[f"{p}.weight"]
        return {
            f"{p}.weight": _scaled(w, scale, (-1,)),
            f"{p}.bias": _shifted(base[f"{p}.bias"], scale, shift, w),
        }
    if site.fold == "alpha_beta":
        alpha, beta = base[f"{p}.alpha"], base[f"{p}.beta"]
        return {
            f"{p}.alpha": _scaled(alpha, scale, alpha.shape),
            f"{p}.beta": (beta.float() * scale.float().view(beta.shape) + shift.float().view(beta.shape)).to(
                beta.dtype
            ),
        }
    raise NotFoldableError(f"site {p!r} ({site.fold}) cannot be folded into the model's parameters")


def fold_state_dict(
    base: Mapping[str, torch.Tensor],
    sites: Sequence[Site],
    tensors: SiteTensors,
    head: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """(pristine base state_dict, delta) -> merged state_dict. ``base`` is left untouched.

    Tensors of sites not folded are shared with ``base`` (no copy); replaced ones are new tensors.
    """
    merged = dict(base)
    for site in sites:
        scale, shift = tensors[site.path]
        merged.update(fold_site(base, site, scale, shift))
    if head:
        merged.update(head)
    return merged


def add_created_biases(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Give Linear/Conv modules the biases that folding created, so ``load_state_dict(strict=True)`` holds.

    Returns the created keys (documented in exports: a plain ``timm.create_model`` lacks them).
    """
    own = model.state_dict()
    created = []
    for key in state_dict:
        if key in own or not key.endswith(".bias"):
            continue
        module = model.get_submodule(key[: -len(".bias")])
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or module.bias is not None:
            raise KeyError(f"unexpected key {key!r} in merged state_dict")
        module.bias = nn.Parameter(torch.zeros_like(state_dict[key]), requires_grad=False)
        created.append(key)
    return created


def merge_model(model: nn.Module) -> nn.Module:
    """A plain timm model with every foldable SSF site folded in; ``model`` is not modified.

    Sites that cannot fold (paper-scheme ConvNeXt's final site) stay as explicit, frozen affines: the
    only thing left of SSF in the result.
    """
    container = getattr(model, CONTAINER)
    affines: list[SiteAffine] = list(container.values())
    sites = [a.site for a in affines]
    tensors = {
        a.site.path: (a.scale.detach(), a.shift.detach()) for a in affines if isinstance(a, ScaleShift)
    }
    plain = copy.deepcopy(model)
    detach_sites(plain)
    base = plain.state_dict()
    merged = fold_state_dict(base, [s for s in sites if s.foldable], tensors)
    add_created_biases(plain, merged)
    plain.load_state_dict(merged, strict=True)
    residual = [s for s in sites if not s.foldable]
    if residual:
        kept = attach_sites(plain, residual, ScaleShift)
        for site in residual:
            scale, shift = tensors[site.path]
            target = kept[site.path.replace(".", "/")]
            assert isinstance(target, ScaleShift)
            target.scale.data.copy_(scale)
            target.shift.data.copy_(shift)
    plain.requires_grad_(False)
    return plain.eval()
