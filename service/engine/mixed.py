"""The mixed path: every resident task's scale/shift stacked into per-site tables on the device.

The mixed path runs one forward over a batch that holds many tasks: at each site a ``GatherAffine`` applies
each sample's row of the site's scale and shift (an elementwise op, about 0.1% of the FLOPs). Row 0 is the
identity (scale 1, shift 0): head-only (linear-probe) tasks and warm-up use it. Rows are only written or
freed on the thread that owns the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import ssf

if TYPE_CHECKING:
    from service.engine.residency import TaskEntry


class SiteTables:
    """Every site's scale and shift rows side by side in two ``[T, sum(C)]`` tables (one row per task),
    grown by doubling, with a free list of rows.

    One ``index_select`` per table per forward gathers the batch's rows for all sites at once
    (``gather``); each site then reads its column block, a view. Per-site tables would cost two gathers
    per site, and at batch 1 those small ops, not arithmetic, are the mixed path's overhead.
    """

    def __init__(self, sites: list[ssf.Site], device: torch.device, dtype: torch.dtype, capacity: int = 8):
        self.sites = sites
        self.device, self.dtype = device, dtype
        self.capacity = max(2, capacity)
        self.sizes = [s.channels for s in sites]
        self.index = {s.path: i for i, s in enumerate(sites)}
        width = sum(self.sizes)
        self.scale_all = torch.ones(self.capacity, width, device=device, dtype=dtype)
        self.shift_all = torch.zeros(self.capacity, width, device=device, dtype=dtype)
        self._views()
        self.free = list(range(self.capacity - 1, 0, -1))  # row 0 stays the identity
        self.batch_scale: tuple[torch.Tensor, ...] = ()  # the current batch's [B, C] rows per site
        self.batch_shift: tuple[torch.Tensor, ...] = ()

    def _views(self) -> None:
        """Per-site ``[T, C]`` views of the tables (for writing a task's rows)."""
        paths = [s.path for s in self.sites]
        self.scale = dict(zip(paths, self.scale_all.split(self.sizes, dim=1), strict=True))
        self.shift = dict(zip(paths, self.shift_all.split(self.sizes, dim=1), strict=True))

    def _grow(self) -> None:
        old = self.capacity
        self.capacity *= 2
        scale = torch.ones(self.capacity, self.scale_all.shape[1], device=self.device, dtype=self.dtype)
        shift = torch.zeros_like(scale)
        scale[:old] = self.scale_all
        shift[:old] = self.shift_all
        self.scale_all, self.shift_all = scale, shift
        self._views()
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
        self.scale_all[row].fill_(1)
        self.shift_all[row].fill_(0)
        self.free.append(row)

    def gather(self, rows: torch.Tensor) -> None:
        """Select the batch's rows (one per sample, in batch order) for every site."""
        self.batch_scale = self.scale_all.index_select(0, rows).split(self.sizes, dim=1)
        self.batch_shift = self.shift_all.index_select(0, rows).split(self.sizes, dim=1)

    @property
    def rows_used(self) -> int:
        return self.capacity - 1 - len(self.free)

    def nbytes(self) -> int:
        return self.scale_all.nbytes + self.shift_all.nbytes


class GatherAffine(ssf.SiteAffine):
    """``y = scale[row] * x + shift[row]`` per sample, along the site's channel axis.

    When an op's output batch is k*B (Swin's windows: batch-major, ``window_partition``), each sample's
    row is repeated k times.
    """

    def __init__(self, site: ssf.Site, tables: SiteTables) -> None:
        super().__init__(site)
        self.position = tables.index[site.path]
        object.__setattr__(self, "tables", tables)  # a plain reference, not a submodule

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return self.forward(
            output
        )  # straight to forward: Module.__call__ costs more than the affine at batch 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tables: SiteTables = self.tables  # type: ignore[assignment]
        scale, shift = tables.batch_scale[self.position], tables.batch_shift[self.position]
        if x.shape[0] != scale.shape[0]:
            k = x.shape[0] // scale.shape[0]
            scale, shift = scale.repeat_interleave(k, dim=0), shift.repeat_interleave(k, dim=0)
        shape = [1] * x.dim()
        shape[0] = x.shape[0]
        shape[self.channel_dim] = self.channels
        scale, shift = scale.view(shape), shift.view(shape)
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
        self.graphed: Any = None  # a CUDA-graph runner of ``trunk`` (service.engine.cuda_graphs), on CUDA

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        """``groups``: (entry, count) runs in batch order; returns each group's logits."""
        rows = torch.tensor([entry.row for entry, n in groups for _ in range(n)], dtype=torch.long)
        trunk = self.graphed(x, rows) if self.graphed is not None else self.trunk(x, rows.to(x.device))
        return self.heads_of(trunk, groups)

    def trunk(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Everything shared by the batch: the gathered sites, the features and, when the head is one
        Linear, the pre-logits (pooling and norms before it are shared too)."""
        self.tables.gather(rows)
        feats = self.model.forward_features(x)  # type: ignore[operator]
        if self.linear_head is not None:
            return self.model.forward_head(feats, pre_logits=True)  # type: ignore[operator,no-any-return]
        return feats  # type: ignore[no-any-return]

    def heads_of(self, trunk: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        out, start = [], 0
        if self.linear_head is not None:
            # each group costs one small matmul on the shared pre-logits (no functional_call)
            weight, bias = self.linear_head
            for entry, n in groups:
                out.append(F.linear(trunk[start : start + n], entry.head[weight], entry.head.get(bias)))
                start += n
            return out
        feats = trunk
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
