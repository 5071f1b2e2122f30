"""The mixed path's per-site ops, fused: one op per site, none per absorbed conv, no hooks.

Three kinds of slot replace the forward of the module they sit on (an instance attribute, so
``Module.__call__`` keeps its fast path, where a forward hook costs more than the affine at batch 1):

- ``AffineSlot``: ``y = op(x)`` then ``addcmul(shift, y, scale)`` in place with the batch's rows, which the
  tables hand out already shaped for broadcasting (views made once per batch size on the CPU). A plain
  Linear or Conv2d runs without its bias (``bias_free``), which the tables fold into the shift: the
  multiply-add then replaces the bare op's bias add instead of adding a pass over the activation.
- ``NormSlot``: an eval-mode BatchNorm and the SSF sites around it (the conv that feeds it, the norm's own
  site) are one per-channel affine per task, ``A = s1*a*s2, C = (t1*a + c)*s2 + t2`` (``a, c``: the norm's
  frozen statistics), stored per task in ``NormTables``. The slot runs ONE ``batch_norm`` with those rows
  as its weight and bias (mean 0, variance ``1 - EPS``, eps ``EPS = 2**-20``: the two sum to exactly 1
  in float32, so it computes ``x*A + C``; torch refuses eps 0 in some versions), over the batch viewed as
  one sample of ``B*C`` channels when samples differ. So a depthwise-conv network's mixed forward runs no more
  passes over its activations than the bare one (the unfused path added two per conv+norm pair).
- ``LayerNormSlot``: a LayerNorm site whose table columns hold the norm's affine with the site folded in. A
  one-task batch runs ``F.layer_norm`` with its row as the weight and bias (the merged model's very op); a
  mixed batch normalizes, then applies the gathered rows as an ``AffineSlot``.

A conv is absorbed into the norm after it only when a traced forward shows the norm's input IS the conv's
output (the same tensor object), which is how every timm conv+norm pair is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm.layers
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

import ssf
from service.engine import triton_affine

_NORM_TYPES: tuple[type, ...] = (nn.BatchNorm2d, BatchNormAct2d)
_LAYER_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, timm.layers.LayerNorm)
EPS = 2.0**-20  # with variance 1 - EPS (exact in float32): rsqrt(var + eps) is exactly 1


def fusable_norm(module: nn.Module) -> bool:
    """An eval-mode BatchNorm with running statistics and an affine, of a class whose forward we know."""
    return (
        type(module) in _NORM_TYPES
        and not module.training
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "weight", None) is not None
        and getattr(module, "bias", None) is not None
    )


def foldable_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm over the last axis with weight and bias, of a class whose forward is ``F.layer_norm``."""
    return (
        type(module) in _LAYER_NORM_TYPES
        and len(module.normalized_shape) == 1  # type: ignore[arg-type]
        and getattr(module, "weight", None) is not None
        and getattr(module, "bias", None) is not None
        and not getattr(module, "_fast_norm", False)  # timm's fast_norm path: left to the generic slot
    )


class BiasFree:
    """A Linear's or Conv2d's forward without its bias (the weight read at each call, as in its own)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.linear = type(module) is nn.Linear

    @property
    def bias(self) -> torch.Tensor:
        """The bias the op leaves out (the site tables fold it into the shift)."""
        return self.module.bias  # type: ignore[return-value]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.module
        if self.linear:
            return F.linear(x, m.weight)
        return m._conv_forward(x, m.weight, None)  # type: ignore[no-any-return]


def bias_free(module: nn.Module) -> BiasFree | None:
    """The op without its bias, for a plain ``nn.Linear`` or ``nn.Conv2d`` with one (a subclass's forward may
    do more than the bias add, so it keeps its own): the tables fold the bias into the site's shift."""
    if type(module) not in (nn.Linear, nn.Conv2d) or getattr(module, "bias", None) is None:
        return None
    return BiasFree(module)


def bias_free_ops(model: nn.Module, sites: list[ssf.Site]) -> dict[str, BiasFree]:
    """{path: the op without its bias} of the sites whose tables fold the op's bias into their shift: a plain
    Linear or Conv2d site applied at its own output."""
    ops = {}
    for s in sites:
        if s.fold == "weight_out" and s.apply_at == s.path:
            op = bias_free(model.get_submodule(s.path))
            if op is not None:
                ops[s.path] = op
    return ops


def plan_norms(model: nn.Module, sites: list[ssf.Site], example: torch.Tensor) -> dict[str, ssf.Site | None]:
    """{norm path: the conv site it absorbs (or None)} for every BatchNorm site that can be fused, from one
    traced forward with temporary hooks."""
    by_path = {s.path: s for s in sites}
    norms = [s for s in sites if s.fold == "affine" and fusable_norm(model.get_submodule(s.path))]
    convs = [s for s in sites if s.fold == "weight_out" and s.apply_at == s.path and s.channel_dim == 1]
    outputs: dict[str, list[torch.Tensor]] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for s in convs:
        handles.append(
            model.get_submodule(s.path).register_forward_hook(
                lambda m, i, o, p=s.path: outputs.setdefault(p, []).append(o)
            )
        )
    for s in norms:
        handles.append(
            model.get_submodule(s.path).register_forward_pre_hook(
                lambda m, i, p=s.path: inputs.setdefault(p, []).append(i[0])
            )
        )
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    producer = {id(o[0]): p for p, o in outputs.items() if len(o) == 1}
    plan: dict[str, ssf.Site | None] = {}
    for s in norms:
        seen = inputs.get(s.path, [])
        if len(seen) != 1:
            continue  # never run, or run twice: leave it to the generic slot
        conv = producer.get(id(seen[0]))
        plan[s.path] = by_path[conv] if conv is not None else None
    return plan


def split_fused(
    model: nn.Module, sites: list[ssf.Site], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, ssf.Site | None], list[ssf.Site]]:
    """The BatchNorm sites that run fused (``plan_norms`` on a seeded example) and the sites left to apply
    one by one: every site that is neither such a norm nor the conv one absorbs."""
    size = ssf.sites.input_size(model)
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    plan = plan_norms(model, sites, example)
    fused = set(plan) | {c.path for c in plan.values() if c is not None}
    return plan, [s for s in sites if s.path not in fused]


class NormTables:
    """Per task, every fused norm's ``A`` and ``C`` rows: two ``[T, C]`` tables per norm, sharing row numbers
    with ``SiteTables`` (grown with it). An unused row holds the norm's own ``a, c`` (the bare norm)."""

    def __init__(
        self,
        model: nn.Module,
        plan: dict[str, ssf.Site | None],
        device: torch.device,
        dtype: torch.dtype,
        capacity: int,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.paths = list(plan)
        self.absorbed = {p: (c.path if c is not None else None) for p, c in plan.items()}
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for p in self.paths:
            bn: Any = model.get_submodule(p)
            a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            self.stats[p] = (a, bn.bias.double() - bn.running_mean.double() * a)
        self.capacity = 0
        self.A: dict[str, torch.Tensor] = {}
        self.C: dict[str, torch.Tensor] = {}
        self.resize(capacity)
        self.batch = 1
        self.single = -1  # the one row every sample uses, or -1 when ``gathered`` holds per-sample rows
        self.rows = torch.zeros(1, dtype=torch.long)
        self._ones = torch.ones(0, device=device, dtype=dtype)
        self._zeros = torch.zeros(0, device=device, dtype=dtype)
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def resize(self, capacity: int) -> None:
        old = self.capacity
        for p in self.paths:
            a, c = (t.to(self.device, self.dtype) for t in self.stats[p])
            A, C = a.repeat(capacity, 1), c.repeat(capacity, 1)
            if old:
                A[:old], C[:old] = self.A[p], self.C[p]
            self.A[p], self.C[p] = A, C
        self.capacity = capacity

    def write(self, row: int, sites: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for p in self.paths:
            a, c = self.stats[p]
            conv = self.absorbed[p]
            s1, t1 = _rows(sites.get(conv) if conv else None, a)
            s2, t2 = _rows(sites.get(p), a)
            self.A[p][row].copy_(s1 * a * s2)
            self.C[p][row].copy_((t1 * a + c) * s2 + t2)

    def reset(self, row: int) -> None:
        for p in self.paths:
            a, c = self.stats[p]
            self.A[p][row].copy_(a)
            self.C[p][row].copy_(c)

    def nbytes(self) -> int:
        return sum(self.A[p].nbytes + self.C[p].nbytes for p in self.paths)

    def ptrs(self) -> tuple[int, ...]:
        return tuple(self.A[p].data_ptr() for p in self.paths)

    def constants(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean 0 and variance ``1 - EPS`` vectors of length ``n`` (views kept per length)."""
        pair = self._constants.get(n)
        if pair is None and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # inside a CUDA-graph capture a new tensor's fill only runs at replay: never cache it
            z, o = (
                torch.zeros(n, device=self.device, dtype=self.dtype),
                torch.full((n,), 1 - EPS, device=self.device, dtype=self.dtype),
            )
            return z, o
        if pair is None:
            if self._ones.numel() < n:
                self._ones = torch.full((n,), 1 - EPS, device=self.device, dtype=self.dtype)
                self._zeros = torch.zeros(n, device=self.device, dtype=self.dtype)
                self._constants.clear()  # views of the old, smaller vectors
            pair = self._constants[n] = (self._zeros[:n], self._ones[:n])
        return pair


def _rows(pair: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pair is None:
        return torch.ones_like(like), torch.zeros_like(like)
    return tuple(t.detach().to(like.device, torch.float64).reshape(-1) for t in pair)  # type: ignore[return-value]


class NormSlot:
    """A fused BatchNorm (plus its sites and the absorbed conv's site): one ``batch_norm`` per forward."""

    def __init__(self, path: str, module: nn.Module, tables: NormTables) -> None:
        self.path, self.tables = path, tables
        self.A, self.C = tables.A, tables.C
        self.act: Callable[[torch.Tensor], torch.Tensor] | None = (
            module.act if isinstance(module, BatchNormAct2d) else None
        )  # timm's BatchNormAct2d: norm, drop (identity in eval), act; the site sits before the act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tables
        A, C = self.A[self.path], self.C[self.path]
        if t.single >= 0:
            weight, bias = A[t.single], C[t.single]
            mean, var = t.constants(weight.shape[0])
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, EPS)
        else:
            b, c = x.shape[0], x.shape[1]
            weight, bias = A.index_select(0, t.rows).view(-1), C.index_select(0, t.rows).view(-1)
            if b != t.batch:  # k*B samples (k per task sample, batch-major)
                k = b // t.batch
                weight = weight.view(t.batch, c).repeat_interleave(k, 0).view(-1)
                bias = bias.view(t.batch, c).repeat_interleave(k, 0).view(-1)
            mean, var = t.constants(b * c)
            y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), mean, var, weight, bias, False, 0.0, EPS)
            y = y.view(x.shape)
        return self.act(y) if self.act is not None else y


class AffineSlot:
    """``op(x)`` then the batch's scale/shift rows along the site's channel axis, in place when it may."""

    def __init__(self, op: Callable[..., torch.Tensor], position: int, channel_dim: int, tables: Any) -> None:
        self.op, self.position, self.channel_dim, self.tables = op, position, channel_dim, tables
        # decided once: on the CPU the hot path pays one attribute read for the Triton branch
        self.triton = triton_affine.triton is not None and (
            tables.device.type == "cuda" or triton_affine.interpreting
        )

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.op(*args, **kwargs)
        if self.triton and triton_affine.available(x) and self.channel_dim % x.dim() == x.dim() - 1:
            # CUDA, channels last: one bandwidth-bound kernel (addcmul's broadcast is not vectorized there)
            scale, shift = self.tables.rows2d(self.position)
            out = x if x._base is None and not x.requires_grad else torch.empty_like(x)
            if triton_affine.apply(x, scale, shift, out):
                return out
        scale, shift = self.tables.rows_for(self.position, self.channel_dim, x)
        if x._base is None and not x.requires_grad:
            # The op's fresh output is ours to overwrite: no second activation-sized tensor per site.
            return torch.addcmul(shift, x, scale, out=x)
        return torch.addcmul(shift, x, scale)


class LayerNormSlot(AffineSlot):
    """A LayerNorm site whose table columns hold the norm's affine with the site folded in
    (``SiteTables.folded``). A one-task batch runs ``F.layer_norm`` with that row as its weight and bias:
    exactly the merged model's op, the site costs nothing. A mixed batch normalizes with weight 1 and bias 0
    (not ``None``: torch's kernel without an affine is slower on the CPU) and applies the gathered rows."""

    def __init__(self, module: nn.Module, position: int, tables: Any) -> None:
        self.shape: tuple[int, ...] = tuple(module.normalized_shape)  # type: ignore[arg-type]
        self.eps = float(module.eps)  # type: ignore[arg-type]
        channels = self.shape[0]
        self.ones = torch.ones(channels, device=tables.device, dtype=tables.dtype)
        self.zeros = torch.zeros(channels, device=tables.device, dtype=tables.dtype)
        super().__init__(self.normalize, position, -1, tables)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, self.ones, self.zeros, self.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.tables.single >= 0:
            weight, bias = self.tables.vectors(self.position)
            return F.layer_norm(x, self.shape, weight, bias, self.eps)
        return super().__call__(x)
