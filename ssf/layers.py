"""The SSF affine and how it is attached to a model without forking the model's code.

Each site gets a small module whose ``hook`` is registered as a forward hook on the site's ``apply_at``
module, so the model's own forward runs unchanged and its state_dict keys stay the same. The modules live
in one ``model.ssf`` container (keys are site paths with ``/`` for ``.``), never inside the model's own
containers, where an nn.Sequential would run them a second time.

Hooks are bound methods, so ``copy.deepcopy`` (EMA copies) rebinds them to the copied modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ssf.sites import Site, SiteError, find_sites, head_prefix, input_size

CONTAINER = "ssf"


def site_key(path: str) -> str:
    return path.replace(".", "/")


def broadcast_shape(ndim: int, channel_dim: int) -> list[int]:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return shape


class SiteAffine(nn.Module):
    """Base for modules applied at a site; subclasses define ``forward(output)``."""

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.site = site
        self.channel_dim = site.channel_dim
        self.channels = site.channels
        self.fired = False

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        self.fired = True
        return self(output)


class ScaleShift(SiteAffine):
    """``y = scale * x + shift`` along the site's channel axis, initialised as in the paper."""

    def __init__(self, site: Site, init_std: float = 0.02) -> None:
        super().__init__(site)
        self.scale = nn.Parameter(torch.empty(site.channels))
        self.shift = nn.Parameter(torch.empty(site.channels))
        nn.init.normal_(self.scale, mean=1.0, std=init_std)
        nn.init.normal_(self.shift, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = broadcast_shape(x.dim(), self.channel_dim)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))


def attach_sites(
    model: nn.Module, sites: Iterable[Site], factory: Callable[[Site], SiteAffine]
) -> nn.ModuleDict:
    """Attach ``factory(site)`` at every site; returns the ``model.ssf`` container."""
    if hasattr(model, CONTAINER):
        raise SiteError("model already has SSF sites attached; detach them first")
    container = nn.ModuleDict()
    for site in sites:
        affine = factory(site)
        container[site_key(site.path)] = affine
        model.get_submodule(site.apply_at).register_forward_hook(affine.hook)
    model.add_module(CONTAINER, container)
    return container


def detach_sites(model: nn.Module) -> None:
    """Remove every SSF hook and the container, leaving the plain model."""
    container = getattr(model, CONTAINER, None)
    if container is None:
        return
    mine = {id(m) for m in container.modules()}
    for module in model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if id(getattr(fn, "__self__", None)) in mine:
                del module._forward_hooks[key]
    delattr(model, CONTAINER)


def check_sites_fire(model: nn.Module, example: torch.Tensor) -> None:
    """Run one forward and fail loudly on any site whose hook never ran.

    A site can be silent when a model calls ``F.linear(x, self.qkv.weight, ...)`` instead of the module
    (EVA/BEiT attention): the affine would then be trained nowhere and folded somewhere.
    """
    container: nn.ModuleDict = getattr(model, CONTAINER)
    for affine in container.values():
        affine.fired = False  # type: ignore[assignment]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was_training)
    silent = [key.replace("/", ".") for key, m in container.items() if not getattr(m, "fired", True)]
    if silent:
        raise SiteError(f"{len(silent)} SSF sites are never called by the model's forward: {silent[:5]}")


def inject_ssf(model: nn.Module, scheme: str = "foldable", check: bool = True) -> list[Site]:
    """Add trainable SSF sites to a timm model and freeze everything but the sites and the head."""
    sites = find_sites(model, scheme)
    attach_sites(model, sites, ScaleShift)
    if check:
        check_sites_fire(model, torch.zeros(1, *input_size(model)))
    mark_trainable(model, "ssf")
    return sites


def mark_trainable(model: nn.Module, method: str) -> None:
    """Freeze the backbone; train what the method owns (sites/shifts) plus the head."""
    head = head_prefix(model)
    for name, param in model.named_parameters():
        if name.startswith(head + "."):
            param.requires_grad = True
        elif method == "ssf":
            param.requires_grad = name.startswith(CONTAINER + ".")
        else:
            param.requires_grad = False


def site_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{site path: (scale, shift)} of a model with ScaleShift sites attached, detached from autograd."""
    container: nn.ModuleDict = getattr(model, CONTAINER)
    return {
        key.replace("/", "."): (m.scale.detach(), m.shift.detach())
        for key, m in container.items()
        if isinstance(m, ScaleShift)
    }


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's parameters and buffers under their model state_dict names."""
    head = head_prefix(model)
    return {k: v.detach() for k, v in model.state_dict().items() if k.startswith(head + ".")}
