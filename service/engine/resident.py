"""Resident tasks: every task's scale/shift stacked into per-site tables on the device, plus its head.

The mixed path runs one forward over a batch that holds many tasks: at each site a ``GatherAffine`` picks
each sample's row of the site's ``[T, C]`` tables (an elementwise op, about 0.1% of the FLOPs). Row 0 is the
identity (scale 1, shift 0): head-only (linear-probe) tasks and warm-up use it. Rows are only written or
freed on the thread that owns the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import ssf
from service.store.base import StoredTask


@dataclass(eq=False)
class TaskEntry:
    """One resident (task, version). Requests hold it from lookup to answer, so a replace never tears."""

    stored: StoredTask
    delta: ssf.Delta
    row: int = 0  # row in the site tables; 0 (identity) for head-only deltas
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device, in the compute dtype
    inflight: int = 0
    retired: bool = False
    prebuilt: Any = None  # an ONNX session built before the version existed, adopted once it does

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def version(self) -> int:
        return self.stored.version

    @property
    def key(self) -> tuple[str, int]:
        return (self.stored.name, self.stored.version)

    @property
    def labels(self) -> list[str]:
        return self.delta.labels


class SiteTables:
    """Per-site ``[T, C]`` scale and shift tables, grown by doubling, with a free list of rows."""

    def __init__(self, sites: list[ssf.Site], device: torch.device, dtype: torch.dtype, capacity: int = 8):
        self.sites = sites
        self.device, self.dtype = device, dtype
        self.capacity = max(2, capacity)
        self.scale = {
            s.path: torch.ones(self.capacity, s.channels, device=device, dtype=dtype) for s in sites
        }
        self.shift = {
            s.path: torch.zeros(self.capacity, s.channels, device=device, dtype=dtype) for s in sites
        }
        self.free = list(range(self.capacity - 1, 0, -1))  # row 0 stays the identity
        self.rows: torch.Tensor = torch.zeros(1, dtype=torch.long, device=device)  # current batch's rows

    def _grow(self) -> None:
        old = self.capacity
        self.capacity *= 2
        for s in self.sites:
            grown = torch.ones(self.capacity, s.channels, device=self.device, dtype=self.dtype)
            grown[:old] = self.scale[s.path]
            self.scale[s.path] = grown
            grown = torch.zeros(self.capacity, s.channels, device=self.device, dtype=self.dtype)
            grown[:old] = self.shift[s.path]
            self.shift[s.path] = grown
        self.free.extend(range(self.capacity - 1, old - 1, -1))

    def add(self, sites: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        if not sites:
            return 0
        if not self.free:
            self._grow()
        row = self.free.pop()
        for path, (scale, shift) in sites.items():
            self.scale[path][row].copy_(scale)
            self.shift[path][row].copy_(shift)
        return row

    def release(self, row: int) -> None:
        if row == 0:
            return
        for s in self.sites:
            self.scale[s.path][row].fill_(1)
            self.shift[s.path][row].fill_(0)
        self.free.append(row)

    @property
    def rows_used(self) -> int:
        return self.capacity - 1 - len(self.free)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.scale.values(), *self.shift.values()))


class GatherAffine(ssf.SiteAffine):
    """``y = scale[row] * x + shift[row]`` per sample, along the site's channel axis.

    When an op's output batch is k*B (Swin's windows: batch-major, ``window_partition``), each sample's
    row is repeated k times.
    """

    def __init__(self, site: ssf.Site, tables: SiteTables) -> None:
        super().__init__(site)
        self.path = site.path
        object.__setattr__(self, "tables", tables)  # a plain reference, not a submodule

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return self.forward(
            output
        )  # straight to forward: Module.__call__ costs more than the affine at batch 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tables: SiteTables = self.tables  # type: ignore[assignment]
        rows = tables.rows
        if x.shape[0] != rows.shape[0]:
            rows = rows.repeat_interleave(x.shape[0] // rows.shape[0])
        shape = [1] * x.dim()
        shape[0] = x.shape[0]
        shape[self.channel_dim] = self.channels
        scale = tables.scale[self.path].index_select(0, rows).view(shape)
        shift = tables.shift[self.path].index_select(0, rows).view(shape)
        if x._base is None and not x.requires_grad:
            # The op's fresh output is ours to overwrite: writing in place saves allocating (and, on CPU,
            # page-faulting) one activation-sized tensor per site, most of the mixed path's overhead.
            return torch.addcmul(shift, x, scale, out=x)
        return torch.addcmul(shift, x, scale)


class HeadRunner(nn.Module):
    """``model.forward_head`` as a module, so ``functional_call`` can swap in each task's head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)  # type: ignore[operator]


class MixedModel:
    """The shared backbone with gather sites attached: one forward for a batch of many tasks."""

    def __init__(self, model: nn.Module, sites: list[ssf.Site], tables: SiteTables) -> None:
        self.model = model
        self.tables = tables
        ssf.attach_sites(model, sites, lambda site: GatherAffine(site, tables))
        self.heads = HeadRunner(model)
        self.linear_head = _linear_head_keys(model)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        """``groups``: (entry, count) runs in batch order; returns each group's logits."""
        rows = [entry.row for entry, n in groups for _ in range(n)]
        self.tables.rows = torch.tensor(rows, dtype=torch.long, device=x.device)
        feats = self.model.forward_features(x)  # type: ignore[operator]
        out, start = [], 0
        if self.linear_head is not None:
            # The task head is one Linear: pooling and norms before it are shared, so pre-logits are
            # computed once for the batch and each group costs one small matmul (no functional_call).
            weight, bias = self.linear_head
            pre = self.model.forward_head(feats, pre_logits=True)  # type: ignore[operator]
            for entry, n in groups:
                out.append(F.linear(pre[start : start + n], entry.head[weight], entry.head.get(bias)))
                start += n
            return out
        for entry, n in groups:
            params = {f"model.{k}": v for k, v in entry.head.items()}
            out.append(functional_call(self.heads, params, (feats[start : start + n],)))
            start += n
        return out


def _linear_head_keys(model: nn.Module) -> tuple[str, str] | None:
    """(weight key, bias key) when everything task-specific in the head is one Linear classifier."""
    classifier = model.get_classifier()  # type: ignore[operator]
    if not isinstance(classifier, nn.Linear):
        return None
    name = next(n for n, m in model.named_modules() if m is classifier)
    prefix = ssf.head_prefix(model) + "."
    head_keys = {k for k in model.state_dict() if k.startswith(prefix)}
    if not head_keys <= {f"{name}.weight", f"{name}.bias"}:
        return None  # e.g. ConvNeXt's head.norm: pre-logits differ per task
    return f"{name}.weight", f"{name}.bias"


def to_device(tensors: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
