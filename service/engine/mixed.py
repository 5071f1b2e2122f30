"""The mixed path: every resident task's scale/shift stacked into per-site tables on the device.

The mixed path runs one forward over a batch that holds many tasks: at each site an ``AffineSlot``
(``service.engine.fused``) applies each sample's row of the site's scale and shift (an elementwise op,
about 0.1% of the FLOPs; eval-mode BatchNorms and the conv feeding them run as one fused op; a LayerNorm site
of a one-task batch runs as the norm's own affine with the task's folded row). Row 0 is the identity (the
bare backbone): head-only (linear-probe) tasks and warm-up use it. Rows are only written or freed on the
thread that owns the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import ssf
from service.engine.fused import (
    AffineSlot,
    LayerNormSlot,
    NormSlot,
    NormTables,
    bias_free_ops,
    foldable_layer_norm,
    split_fused,
)

if TYPE_CHECKING:
    from service.engine.residency import TaskEntry


class SiteTables:
    """Every site's scale and shift rows side by side in two ``[T, sum(C)]`` tables (one row per task),
    grown by doubling, with a free list of rows.

    One ``index_select`` per table per forward gathers the batch's rows for all sites at once
    (``gather``); each layout (channel axis, rank) the sites' outputs use then gets one view+split per
    forward, so a site's own cost is its one ``addcmul``. When the whole batch is one task (``select``)
    nothing is gathered: the sites read that task's row, broadcast over the batch.
    """

    def __init__(
        self,
        sites: list[ssf.Site],
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 8,
        folded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        biases: dict[str, torch.Tensor] | None = None,
    ):
        self.sites = sites
        self.device, self.dtype = device, dtype
        self.capacity = max(2, capacity)
        self.sizes = [s.channels for s in sites]
        self.index = {s.path: i for i, s in enumerate(sites)}
        # {path: (weight, bias)} of the norms whose columns hold the folded affine (see ``add``)
        self.folded = {
            p: (w.detach().to(device, dtype), b.detach().to(device, dtype))
            for p, (w, b) in (folded or {}).items()
        }
        # {path: bias} of the Linear/Conv sites whose op runs without its bias: their shift columns hold
        # ``scale*bias + shift`` (see ``_row``; float64 on the CPU: a half-precision table rounds once)
        self.biases = {p: b.detach().to("cpu", torch.float64) for p, b in (biases or {}).items()}
        ones = [self.folded[s.path][0] if s.path in self.folded else torch.ones(s.channels) for s in sites]
        zeros = [
            self.folded[s.path][1]
            if s.path in self.folded
            else self.biases.get(s.path, torch.zeros(s.channels))
            for s in sites
        ]
        # the identity row: the bare backbone (scale 1 and shift 0; a folded norm's own weight and bias; a
        # bias-free op's bias)
        empty = torch.zeros(0, device=device, dtype=dtype)
        self.identity_scale = torch.cat([t.to(device, dtype) for t in ones]) if sites else empty
        self.identity_shift = torch.cat([t.to(device, dtype) for t in zeros]) if sites else empty
        self.scale_all = self.identity_scale.repeat(self.capacity, 1)
        self.shift_all = self.identity_shift.repeat(self.capacity, 1)
        self._views()
        self.free = list(range(self.capacity - 1, 0, -1))  # row 0 stays the identity
        self.norms: NormTables | None = None  # fused norms' rows (same row numbers), grown alongside
        self.batch = 1
        self.single = 0  # the row every sample uses, or -1 after ``gather``
        self._scale_rows = self.scale_all[:1]  # [B, W]: the current batch's rows
        self._shift_rows = self.shift_all[:1]
        self._layouts: dict[Any, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        self._row_layouts: dict[int, dict[Any, Any]] = {}  # per row, for one-task batches
        self.reuse = device.type == "cpu"  # gather into kept buffers (see ``gather``)
        self._buffers = (self.scale_all[:0], self.shift_all[:0])
        self._batch_layouts: dict[int, dict[Any, Any]] = {}  # per batch size, views of the buffers

    def _views(self) -> None:
        """Per-site ``[T, C]`` views of the tables (for writing a task's rows)."""
        paths = [s.path for s in self.sites]
        self.scale = dict(zip(paths, self.scale_all.split(self.sizes, dim=1), strict=True))
        self.shift = dict(zip(paths, self.shift_all.split(self.sizes, dim=1), strict=True))

    def _grow(self) -> None:
        old = self.capacity
        self.capacity *= 2
        scale = self.identity_scale.repeat(self.capacity, 1)
        shift = self.identity_shift.repeat(self.capacity, 1)
        scale[:old] = self.scale_all
        shift[:old] = self.shift_all
        self.scale_all, self.shift_all = scale, shift
        self._views()
        self._row_layouts.clear()  # views of the old tables
        if self.norms is not None:
            self.norms.resize(self.capacity)
        self.free.extend(range(self.capacity - 1, old - 1, -1))

    def add(self, sites: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """A row holding ``sites`` (paths this table does not hold, fused ones, go to ``norms``).

        A folded norm's columns hold its affine with the site folded in (``ssf.fold``: ``scale*weight``,
        ``scale*bias + shift``), so a one-task batch runs the norm with that row as its own weight and bias
        and the site costs no op at all (``LayerNormSlot``); a mixed batch normalizes with weight 1 and bias
        0 and applies the gathered rows as any site does.

        A Linear or Conv site in ``biases`` runs its op without the bias (``fused.bias_free``) and its shift
        column holds ``scale*bias + shift``: the bias add, a pass over the activation that the bare op makes
        too, becomes the site's own multiply-add, so the site costs the bare op little more."""
        if not sites:
            return 0
        if not self.free:
            self._grow()
        row = self.free.pop()
        if self.sites:  # one concatenated copy per table (a site a delta lacks keeps the identity)
            identity = zip(
                self.identity_scale.split(self.sizes), self.identity_shift.split(self.sizes), strict=True
            )
            scales, shifts = [], []
            for s, default in zip(self.sites, identity, strict=True):
                scale, shift = self._row(s, sites[s.path]) if s.path in sites else default
                scales.append(scale.reshape(-1))
                shifts.append(shift.reshape(-1))
            self.scale_all[row].copy_(torch.cat(scales))
            self.shift_all[row].copy_(torch.cat(shifts))
        if self.norms is not None:
            self.norms.write(row, sites)
        return row

    def _row(
        self, site: ssf.Site, pair: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = site.path
        if p in self.biases:
            scale, shift = (t.detach().to(torch.float64).reshape(-1) for t in pair)
            return scale, scale * self.biases[p].to(scale) + shift
        if p not in self.folded:
            return pair
        weight, bias = self.folded[p]
        folded = ssf.fold.fold_site({f"{p}.weight": weight, f"{p}.bias": bias}, site, *pair)
        return folded[f"{p}.weight"], folded[f"{p}.bias"]

    def release(self, row: int) -> None:
        if row == 0:
            return
        self.scale_all[row].copy_(self.identity_scale)
        self.shift_all[row].copy_(self.identity_shift)
        if self.norms is not None:
            self.norms.reset(row)
        self.free.append(row)

    def gather(self, rows: torch.Tensor) -> None:
        """Select the batch's rows (one per sample, in batch order) for every site.

        With ``reuse`` (eager on the CPU) the rows land in buffers kept across forwards, whose per-site views
        are made once per batch size: making them anew (one view per site and layout) cost ~9x the gather
        itself on test_vit (67 against 7.7 us). Compiled and graphed trunks keep the functional gather they
        were traced with."""
        b = int(rows.shape[0])
        self.batch, self.single = b, -1
        if not self.reuse:
            self._scale_rows = self.scale_all.index_select(0, rows)
            self._shift_rows = self.shift_all.index_select(0, rows)
            self._layouts = {}
        else:
            if self._buffers[0].shape[0] < b:  # a larger batch than any before: new buffers, new views
                width = self.scale_all.shape[1]
                self._buffers = (self.scale_all.new_empty(b, width), self.shift_all.new_empty(b, width))
                self._batch_layouts.clear()
            layouts = self._batch_layouts.get(b)
            if layouts is None:
                layouts = self._batch_layouts[b] = {"rows": (self._buffers[0][:b], self._buffers[1][:b])}
            self._scale_rows, self._shift_rows = layouts["rows"]
            torch.index_select(self.scale_all, 0, rows, out=self._scale_rows)
            torch.index_select(self.shift_all, 0, rows, out=self._shift_rows)
            self._layouts = layouts
        if self.norms is not None:
            self.norms.batch, self.norms.single, self.norms.rows = self.batch, -1, rows

    def select(self, row: int, batch: int) -> None:
        """Every sample of the batch is the task at ``row``: broadcast its row, gather nothing. The row's
        shaped views are kept (they are views: a row rewritten in place stays current; growth drops them)."""
        self.batch, self.single = batch, row
        self._scale_rows = self.scale_all[row : row + 1]
        self._shift_rows = self.shift_all[row : row + 1]
        layouts = self._row_layouts.get(row)
        if layouts is None:
            if len(self._row_layouts) >= 256:
                self._row_layouts.clear()
            layouts = self._row_layouts[row] = {}
        self._layouts = layouts
        if self.norms is not None:
            self.norms.batch, self.norms.single = batch, row

    @property
    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current batch's ``[B, W]`` scale and shift rows, every site's columns side by side."""
        return self._scale_rows, self._shift_rows

    @property
    def batch_scale(self) -> tuple[torch.Tensor, ...]:
        """The current batch's ``[B, C]`` scale rows per site."""
        return self._scale_rows.split(self.sizes, dim=1)

    @property
    def batch_shift(self) -> tuple[torch.Tensor, ...]:
        return self._shift_rows.split(self.sizes, dim=1)

    def rows_for(self, position: int, channel_dim: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``position``'s (scale, shift) shaped to broadcast against its output ``x``."""
        key = (channel_dim, x.dim())
        views = self._layouts.get(key)
        if views is None:
            views = self._layouts[key] = (
                self._shaped(self._scale_rows, key),
                self._shaped(self._shift_rows, key),
            )
        scale, shift = views[0][position], views[1][position]
        n = scale.shape[0]
        if n != 1 and x.shape[0] != n:  # k*B outputs (Swin's windows: batch-major): k copies per sample
            k = x.shape[0] // n
            scale, shift = scale.repeat_interleave(k, dim=0), shift.repeat_interleave(k, dim=0)
        return scale, shift

    def rows2d(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``position``'s ``[n, C]`` scale and shift rows of the current batch (n = 1 for one task)."""
        views = self._layouts.get((0, 0))  # (0, 0): no output has rank 0, so no layout uses this key
        if views is None:
            views = self._layouts[(0, 0)] = (
                self._scale_rows.split(self.sizes, dim=1),
                self._shift_rows.split(self.sizes, dim=1),
            )
        return views[0][position], views[1][position]

    def vectors(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``position``'s scale and shift as 1-D ``[C]`` vectors of a one-task batch's row."""
        views = self._layouts.get("vectors")
        if views is None:
            views = self._layouts["vectors"] = (
                self._scale_rows[0].split(self.sizes),
                self._shift_rows[0].split(self.sizes),
            )
        return views[0][position], views[1][position]

    def _shaped(self, rows: torch.Tensor, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        channel_dim, ndim = key
        dim = channel_dim % ndim
        shape = [rows.shape[0]] + [1] * (ndim - 1)
        shape[dim] = rows.shape[1]
        return rows.view(shape).split(self.sizes, dim=dim)

    def ptrs(self) -> tuple[int, ...]:
        """Where the tables live (a captured CUDA graph reads them by address)."""
        norms = self.norms.ptrs() if self.norms is not None else ()
        return (self.scale_all.data_ptr(), self.shift_all.data_ptr(), *norms)

    @property
    def rows_used(self) -> int:
        return self.capacity - 1 - len(self.free)

    def nbytes(self) -> int:
        norms = self.norms.nbytes() if self.norms is not None else 0
        return self.scale_all.nbytes + self.shift_all.nbytes + norms


class HeadRunner(nn.Module):
    """``model.forward_head`` as a module, so ``functional_call`` can swap in each task's head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)  # type: ignore[operator]


class MixedModel:
    """The shared backbone with fused sites: one forward for a batch of many tasks.

    ``fuse_norms`` (default) runs each eval-mode BatchNorm site, with the conv site feeding it, as one
    per-task affine (``service.engine.fused``); every other site is an ``AffineSlot``. ``tables`` holds
    the rows of the sites that are not fused; ``tables.norms`` the fused norms' rows.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[ssf.Site],
        device: torch.device,
        dtype: torch.dtype,
        fuse_norms: bool = True,
    ) -> None:
        self.model = model
        self.sites = sites
        plan, rest = split_fused(model, sites, device, dtype) if fuse_norms else ({}, sites)
        folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for s in rest:  # LayerNorm sites: one-task batches run the norm with the folded row (LayerNormSlot)
            norm = model.get_submodule(s.path)
            if s.fold == "affine" and s.apply_at == s.path and foldable_layer_norm(norm):
                folded[s.path] = (norm.weight, norm.bias)  # type: ignore[assignment]
        ops = bias_free_ops(model, rest)  # Linear/Conv sites without their bias, which the shift rows hold
        self.tables = SiteTables(
            rest, device, dtype, folded=folded, biases={p: op.bias for p, op in ops.items()}
        )
        if plan:
            self.tables.norms = NormTables(model, plan, device, dtype, self.tables.capacity)
            for path in plan:
                model.get_submodule(path).forward = NormSlot(
                    path, model.get_submodule(path), self.tables.norms
                )
        for i, site in enumerate(self.tables.sites):
            module = model.get_submodule(site.apply_at)
            if site.path in folded:
                module.forward = LayerNormSlot(module, i, self.tables)
            else:
                op = ops.get(site.path, module.forward)
                module.forward = AffineSlot(op, i, site.channel_dim, self.tables)
        self.heads = HeadRunner(model)
        self.linear_head = linear_head_keys(model)
        # what runs ``trunk`` instead of calling it: CUDA graphs (service.engine.cuda_graphs) or the compiled
        # trunk (service.engine.compiled); every batch then goes through it, one-task batches too
        self.runner: Any = None

    @property
    def fused_norms(self) -> int:
        return len(self.tables.norms.paths) if self.tables.norms is not None else 0

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        """``groups``: (entry, count) runs in batch order; returns each group's logits."""
        if len(groups) == 1 and self.runner is None:  # one task: broadcast its row, gather nothing
            self.tables.select(groups[0][0].row, int(x.shape[0]))
            return self.heads_of(self.features(x), groups)
        rows = torch.tensor([entry.row for entry, n in groups for _ in range(n)], dtype=torch.long)
        trunk = self.runner(x, rows) if self.runner is not None else self.trunk(x, rows.to(x.device))
        return self.heads_of(trunk, groups)

    def trunk(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Everything shared by the batch: the gathered sites, the features and, when the head is one
        Linear, the pre-logits (pooling and norms before it are shared too)."""
        self.tables.gather(rows)
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)  # type: ignore[operator]
        if self.linear_head is not None:
            return self.model.forward_head(feats, pre_logits=True)  # type: ignore[operator,no-any-return]
        return feats  # type: ignore[no-any-return]

    def heads_of(self, trunk: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        return run_heads(trunk, groups, self.linear_head, self.heads)


def run_heads(
    trunk: torch.Tensor,
    groups: list[tuple[TaskEntry, int]],
    linear_head: tuple[str, str] | None,
    heads: HeadRunner,
) -> list[torch.Tensor]:
    """Each group's logits from the shared trunk output: one small matmul per group on the pre-logits when
    the head is one Linear (``linear_head``: its weight and bias keys), else the head module per group with
    the task's head tensors swapped in (``functional_call``)."""
    out, start = [], 0
    if linear_head is not None:
        weight, bias = linear_head
        for entry, n in groups:
            out.append(F.linear(trunk[start : start + n], entry.head[weight], entry.head.get(bias)))
            start += n
        return out
    for entry, n in groups:
        params = {f"model.{k}": v for k, v in entry.head.items()}
        out.append(functional_call(heads, params, (trunk[start : start + n],)))
        start += n
    return out


def linear_head_keys(model: nn.Module) -> tuple[str, str] | None:
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
