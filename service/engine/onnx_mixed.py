"""The ONNX backend's mixed path: one ONNX Runtime session serves every resident task, batches mixing them.

The graph is the plain backbone with ``y * scale + shift`` after each SSF site's op, where ``scale`` and
``shift`` are that site's columns of two graph inputs, ``scale_rows`` and ``shift_rows`` (``[batch, sum of
the sites' channels]``: each sample's row of the site tables, which the backend gathers). Its output is
what all tasks share: the pre-logits when the head is one Linear (each task's Linear then runs on its own
samples in torch, as in the torch backend's mixed path), else the features (the head runs per task).
So a task is a row in the tables, not a session of its own; a one-task batch may still run on the task's
merged session, which is the bare backbone's cost.

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
from torch import nn

import ssf
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


class _Trunk(nn.Module):
    def __init__(self, model: nn.Module, cols: _Columns, pre_logits: bool) -> None:
        super().__init__()
        self.model, self.cols, self.pre_logits = model, cols, pre_logits

    def forward(
        self, image: torch.Tensor, scale_rows: torch.Tensor, shift_rows: torch.Tensor
    ) -> torch.Tensor:
        self.cols.scale, self.cols.shift = scale_rows, shift_rows
        feats = self.model.forward_features(image)  # type: ignore[operator]
        if self.pre_logits:
            return self.model.forward_head(feats, pre_logits=True)  # type: ignore[operator,no-any-return]
        return feats  # type: ignore[no-any-return]


def export_mixed(model: nn.Module, sites: list[ssf.Site], pre_logits: bool) -> bytes:
    """The mixed graph (inputs ``image``, ``scale_rows``, ``shift_rows``; output ``features``; batch dynamic),
    checked against the torch forward it was traced from. ``model`` is left as it was."""
    cols = _Columns([s.channels for s in sites])
    # eval before exporting: the exporter restores the mode it found, and a new module's is training (it
    # would leave every BatchNorm of the backbone in training mode)
    was_training = model.training
    trunk = _Trunk(model, cols, pre_logits).eval()
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for i, s in enumerate(sites):
            module = model.get_submodule(s.apply_at)
            saved.append((module, module.__dict__.get("forward")))
            op = type(module).forward.__get__(module)  # the class's own forward, whatever is patched on it
            module.forward = _Slot(op, i, s.channel_dim, cols)  # type: ignore[method-assign]
        size = tuple(int(d) for d in ssf.sites.input_size(model))
        g = torch.Generator().manual_seed(0)

        def example(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            width = sum(cols.sizes)
            return (
                torch.randn(batch, *size, generator=g),
                1 + 0.1 * torch.randn(batch, width, generator=g),
                0.1 * torch.randn(batch, width, generator=g),
            )

        buf = io.BytesIO()
        names = ["image", "scale_rows", "shift_rows"]
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                trunk,
                example(2),
                buf,  # type: ignore[arg-type]
                input_names=names,
                output_names=["features"],
                dynamic_axes={**{n: {0: "batch"} for n in names}, "features": {0: "batch"}},
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


def run(session: Any, image: torch.Tensor, scale_rows: torch.Tensor, shift_rows: torch.Tensor) -> Any:
    """The graph's features for these inputs (a backbone without sites has no row inputs)."""
    inputs = {"image": image, "scale_rows": scale_rows, "shift_rows": shift_rows}
    return session.run(["features"], {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0]


class MixedSession:
    """The mixed graph's session with the site tables it reads (CPU, float32) and the heads run after it."""

    def __init__(self, model: nn.Module, sites: list[ssf.Site]) -> None:
        self.linear_head = linear_head_keys(model)
        self.heads = HeadRunner(model)
        self.session = new_session(export_mixed(model, sites, pre_logits=self.linear_head is not None))
        self.tables = SiteTables(sites, torch.device("cpu"), torch.float32)

    def run(self, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        rows = torch.tensor([entry.row for entry, n in groups for _ in range(n)], dtype=torch.long)
        self.tables.gather(rows)
        trunk = torch.from_numpy(run(self.session, x.float(), *self.tables.gathered))
        with torch.inference_mode():
            return run_heads(trunk, groups, self.linear_head, self.heads)

    def warmup(self, example: torch.Tensor) -> None:
        """One forward on the identity row (the bare backbone)."""
        self.tables.gather(torch.zeros(example.shape[0], dtype=torch.long))
        run(self.session, example.float(), *self.tables.gathered)
