"""The ONNX backend's mixed path: one ONNX Runtime session serves every resident task, batches mixing them.

The graph is the plain backbone with ``y * scale + shift`` after each SSF site's op, where ``scale`` and
``shift`` are that site's columns of two graph inputs, ``scale_rows`` and ``shift_rows`` (``[batch, sum of
the sites' channels]``: each sample's row of the site tables, which the backend gathers). A plain Linear or
Conv2d site's op runs without its bias, which its shift column holds, as in the torch mixed path. An eval-mode
BatchNorm and the conv site feeding it run as one per-sample affine ``x * A + C`` (the norm's statistics and
both sites composed per task, as the torch mixed path's ``NormSlot`` does), whose rows are two more inputs,
``norm_a`` and ``norm_c``: a conv+BN pair costs one Mul and one Add, not the five ops of the sites around an
unfused norm. The output is what all tasks share: the pre-logits when the head is one Linear (each task's
Linear then runs on its own samples in torch, as in the torch backend's mixed path), else the features (the
head runs per task). So a task is a row in the tables, not a session of its own; a one-task batch may still
run on the task's merged session, which is the bare backbone's cost.

The graph is exported once with the base weights and checked against the same forward in torch on random
rows at two batch sizes; a backbone it cannot be exported for (Swin's windows reshape the batch, say) keeps
the per-task sessions only.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import ssf
from service.engine.fused import BiasFree, NormTables, bias_free_ops, split_fused
from service.engine.mixed import HeadRunner, SiteTables, linear_head_keys, run_heads
from service.engine.onnx_graph import OPSET, OnnxExportError, new_session
from service.engine.residency import TaskEntry


class _Columns:
    """While exporting: the traced row inputs, and each site's columns shaped to broadcast on its output."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.scale = self.shift = torch.zeros(0)

    def site(self, position: int, channel_dim: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, size = self.starts[position], self.sizes[position]
        shape = [-1] + [1] * (y.dim() - 1)
        shape[channel_dim % y.dim()] = size
        return (
            self.scale[:, start : start + size].reshape(shape),
            self.shift[:, start : start + size].reshape(shape),
        )


class _Slot:
    """A site's op, then its per-sample scale and shift (the forward of the module the site sits on)."""

    def __init__(self, op: Callable[..., torch.Tensor], position: int, channel_dim: int, cols: _Columns):
        self.op, self.position, self.channel_dim, self.cols = op, position, channel_dim, cols

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.op(*args, **kwargs)
        scale, shift = self.cols.site(self.position, self.channel_dim, y)
        return y * scale + shift


class _NormSlot:
    """A fused BatchNorm with the sites around it: ``x * A + C`` per sample, then the norm's activation."""

    def __init__(self, position: int, act: Callable[..., torch.Tensor] | None, cols: _Columns) -> None:
        self.position, self.act, self.cols = position, act, cols

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, c = self.cols.site(self.position, 1, x)
        y = x * a + c
        return self.act(y) if self.act is not None else y


INPUTS = ("image", "scale_rows", "shift_rows", "norm_a", "norm_c")


class _Trunk(nn.Module):
    def __init__(self, model: nn.Module, sites: _Columns, norms: _Columns, pre_logits: bool) -> None:
        super().__init__()
        self.model, self.sites, self.norms, self.pre_logits = model, sites, norms, pre_logits

    def forward(
        self,
        image: torch.Tensor,
        scale_rows: torch.Tensor,
        shift_rows: torch.Tensor,
        norm_a: torch.Tensor,
        norm_c: torch.Tensor,
    ) -> torch.Tensor:
        self.sites.scale, self.sites.shift = scale_rows, shift_rows
        self.norms.scale, self.norms.shift = norm_a, norm_c
        feats = self.model.forward_features(image)  # type: ignore[operator]
        if self.pre_logits:
            return self.model.forward_head(feats, pre_logits=True)  # type: ignore[operator,no-any-return]
        return feats  # type: ignore[no-any-return]


def export_mixed(
    model: nn.Module,
    sites: list[ssf.Site],
    norms: dict[str, int],
    pre_logits: bool,
    ops: dict[str, BiasFree] | None = None,
) -> bytes:
    """The mixed graph (inputs ``INPUTS``, output ``features``, batch dynamic), checked against the torch
    forward it was traced from. ``sites``: the ones applied as ``y * scale + shift``, in their columns' order;
    ``norms``: {path: channels} of the fused BatchNorms in theirs (the conv sites they absorb have no op of
    their own); ``ops``: {path: op} of the sites whose op runs without its bias (``fused.bias_free_ops``:
    their shift columns hold it). ``model`` is left as it was."""
    ops = ops or {}
    cols, norm_cols = _Columns([s.channels for s in sites]), _Columns(list(norms.values()))
    # eval before exporting: the exporter restores the mode it found, and a new module's is training (it
    # would leave every BatchNorm of the backbone in training mode)
    was_training = model.training
    trunk = _Trunk(model, cols, norm_cols, pre_logits).eval()
    saved: list[tuple[nn.Module, Any]] = []
    try:
        slots: list[tuple[str, Any]] = [
            (
                s.apply_at,
                lambda m, i=i, s=s: _Slot(
                    ops.get(s.path, type(m).forward.__get__(m)), i, s.channel_dim, cols
                ),
            )
            for i, s in enumerate(sites)
        ]  # a site's op: the bias-free op or the class's own forward, whatever is patched on the module
        slots += [
            (path, lambda m, i=i: _NormSlot(i, m.act if isinstance(m, BatchNormAct2d) else None, norm_cols))
            for i, path in enumerate(norms)
        ]
        for path, make in slots:
            module = model.get_submodule(path)
            saved.append((module, module.__dict__.get("forward")))
            module.forward = make(module)  # type: ignore[method-assign]
        size = tuple(int(d) for d in ssf.sites.input_size(model))
        g = torch.Generator().manual_seed(0)

        def example(batch: int) -> tuple[torch.Tensor, ...]:
            width, norm_width = sum(cols.sizes), sum(norm_cols.sizes)
            return (
                torch.randn(batch, *size, generator=g),
                1 + 0.1 * torch.randn(batch, width, generator=g),
                0.1 * torch.randn(batch, width, generator=g),
                1 + 0.1 * torch.randn(batch, norm_width, generator=g),
                0.1 * torch.randn(batch, norm_width, generator=g),
            )

        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                trunk,
                example(2),
                buf,  # type: ignore[arg-type]
                input_names=list(INPUTS),
                output_names=["features"],
                dynamic_axes={**{n: {0: "batch"} for n in INPUTS}, "features": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
            data = buf.getvalue()
            session = new_session(data)
            for batch in (3, 1):  # not the traced batch: the batch axis must really be dynamic
                inputs = example(batch)
                want = trunk(*inputs).numpy()
                got = run(session, *inputs)
                err = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
                if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
                    raise OnnxExportError(f"the mixed graph differs from its torch forward (max error {err})")
    finally:
        model.train(was_training)
        for module, forward in saved:
            del module.forward
            if forward is not None:
                module.forward = forward  # type: ignore[method-assign]
    return data


def run(session: Any, *inputs: torch.Tensor) -> Any:
    """The graph's features for ``INPUTS`` in order (the graph keeps only those it uses: a backbone without
    BatchNorms has no norm inputs)."""
    named = dict(zip(INPUTS, inputs, strict=True))
    return session.run(["features"], {i.name: named[i.name].numpy() for i in session.get_inputs()})[0]


class MixedSession:
    """The mixed graph's session with the tables it reads (CPU, float32) and the heads run after it."""

    def __init__(self, model: nn.Module, sites: list[ssf.Site]) -> None:
        self.linear_head = linear_head_keys(model)
        self.heads = HeadRunner(model)
        cpu = torch.device("cpu")
        plan, rest = split_fused(model, sites, cpu, torch.float32)
        ops = bias_free_ops(model, rest)  # Linear/Conv sites without their bias, which the shift rows hold
        self.tables = SiteTables(rest, cpu, torch.float32, biases={p: op.bias for p, op in ops.items()})
        self.norms = NormTables(model, plan, cpu, torch.float32, self.tables.capacity) if plan else None
        self.tables.norms = self.norms
        channels = {p: int(model.get_submodule(p).num_features) for p in plan}  # type: ignore[arg-type]
        self.session = new_session(export_mixed(model, rest, channels, self.linear_head is not None, ops))

    def _inputs(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.tables.gather(rows)
        if self.norms is None:
            empty = x.new_zeros(int(x.shape[0]), 0)
            return (x.float(), *self.tables.gathered, empty, empty)
        a = torch.cat([self.norms.A[p].index_select(0, rows) for p in self.norms.paths], dim=1)
        c = torch.cat([self.norms.C[p].index_select(0, rows) for p in self.norms.paths], dim=1)
        return (x.float(), *self.tables.gathered, a, c)

    def run(self, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        rows = torch.tensor([entry.row for entry, n in groups for _ in range(n)], dtype=torch.long)
        trunk = torch.from_numpy(run(self.session, *self._inputs(x, rows)))
        with torch.inference_mode():
            return run_heads(trunk, groups, self.linear_head, self.heads)

    def warmup(self, example: torch.Tensor) -> None:
        """One forward on the identity row (the bare backbone)."""
        run(self.session, *self._inputs(example, torch.zeros(example.shape[0], dtype=torch.long)))
