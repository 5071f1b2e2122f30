"""The seven tuning methods as one function, ``prepare(model, method, scheme)``, over a timm model.

- ``ssf``: the core's ScaleShift sites (+ head). ``bias`` (BitFit in our delta format): the same sites
  with the scale fixed at 1 and only the shift trained, which is exactly a trainable bias added to every
  site's op, so it folds like SSF. ``linear``: the head only, no sites.
- ``full``: every parameter. ``adapter``: the paper's eq. 2 bottleneck, ``x + up(gelu(down(x)))``, after
  the MLP of every block. ``vpt-shallow`` / ``vpt-deep``: n learned prompt tokens inserted after the
  prefix (class) tokens before the first block, or replaced before every block (ViT only), and dropped
  after the last block so pooling sees the same tokens as the plain model.

The baselines (full, adapter, vpt) do not fold and write no delta; they exist to compare against. Their
extra modules live in ``model.peft``, attached by hooks like the SSF sites, so the model's code is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import ssf
from ssf.layers import CONTAINER

METHODS = ("ssf", "linear", "full", "bias", "adapter", "vpt-shallow", "vpt-deep")
FOLDING = ("ssf", "linear", "bias")
PEFT = "peft"
ADAPTER_DIM = 8
VPT_SHALLOW_PROMPTS = 200
VPT_DEEP_PROMPTS = 50


class MethodError(ValueError):
    """The method cannot be applied to this model (e.g. VPT on a model without a token sequence)."""


class Adapter(nn.Module):
    """The paper's eq. 2 bottleneck; ``up`` starts at zero so training starts from the pretrained model."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down, self.act, self.up = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output + self.up(self.act(self.down(output)))


class Prompts(nn.Module):
    """VPT prompts for a ViT: one (n, D) tensor for shallow, one per block for deep."""

    def __init__(self, model: VisionTransformer, n: int, deep: bool) -> None:
        super().__init__()
        blocks = list(model.blocks)
        self.n, self.prefix = n, int(model.num_prefix_tokens)
        count = len(blocks) if deep else 1
        self.prompts = nn.ParameterList(
            nn.Parameter(torch.empty(n, model.embed_dim).uniform_(-0.1, 0.1)) for _ in range(count)
        )
        for i, block in enumerate(blocks[:count]):
            block.register_forward_pre_hook(self._insert if i == 0 else self._replace_at(i))
        blocks[-1].register_forward_hook(self._drop)

    def _insert(self, module: nn.Module, args: tuple) -> tuple:
        x, p = args[0], self.prefix
        prompt = self.prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        return (torch.cat([x[:, :p], prompt, x[:, p:]], dim=1), *args[1:])

    def _replace_at(self, i: int) -> Any:
        def replace(module: nn.Module, args: tuple) -> tuple:
            x, p = args[0], self.prefix
            prompt = self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
            return (torch.cat([x[:, :p], prompt, x[:, p + self.n :]], dim=1), *args[1:])

        return replace

    def _drop(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([output[:, : self.prefix], output[:, self.prefix + self.n :]], dim=1)


def _attach_adapters(model: nn.Module, hidden: int) -> nn.ModuleDict:
    container = nn.ModuleDict()
    for path, module in list(model.named_modules()):
        if isinstance(module, Mlp) and not path.startswith(ssf.head_prefix(model)):
            fc2: nn.Linear = module.fc2  # type: ignore[assignment]
            adapter = Adapter(fc2.out_features, hidden)
            container[path.replace(".", "/")] = adapter
            module.register_forward_hook(adapter.hook)
    if not container:
        raise MethodError(f"adapter needs transformer MLP blocks; {type(model).__name__} has none")
    return container


def _train_only(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(prefixes)


def prepare(model: nn.Module, method: str, scheme: str = "foldable", check: bool = True) -> list[ssf.Site]:
    """Attach what ``method`` trains and set ``requires_grad``; returns the SSF sites (empty if none)."""
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    head = ssf.head_prefix(model) + "."
    sites: list[ssf.Site] = []
    if method in ("ssf", "bias"):
        sites = ssf.inject_ssf(model, scheme, check=check)
    if method == "bias":
        for affine in getattr(model, CONTAINER).values():
            affine.scale.data.fill_(1.0)
            affine.shift.data.zero_()
            affine.scale.requires_grad = False
    elif method in ("linear", "full"):
        model.requires_grad_(method == "full")
        _train_only(model, ("",) if method == "full" else (head,))
    elif method == "adapter":
        model.add_module(PEFT, _attach_adapters(model, ADAPTER_DIM))
        _train_only(model, (head, PEFT + "."))
    elif method.startswith("vpt"):
        if not isinstance(model, VisionTransformer):
            raise MethodError(f"{method} needs a ViT (a token sequence); {type(model).__name__} is not one")
        deep = method == "vpt-deep"
        n = VPT_DEEP_PROMPTS if deep else VPT_SHALLOW_PROMPTS
        model.add_module(PEFT, Prompts(model, n, deep))
        _train_only(model, (head, PEFT + "."))
    return sites


def count_params(model: nn.Module) -> dict[str, int]:
    """Trainable parameters split into SSF sites, head and everything else."""
    head = ssf.head_prefix(model) + "."
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "trainable_params": sum(trainable.values()),
        "site_params": sum(v for n, v in trainable.items() if n.startswith(CONTAINER + ".")),
        "head_params": sum(v for n, v in trainable.items() if n.startswith(head)),
    }
