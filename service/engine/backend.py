"""The backend contract: what the engine asks of whatever runs the forwards, and the one place that picks one.

A backend owns the model and its per-task state (table rows, merged copies, ONNX sessions) and runs on the
engine's single model thread, so nothing in it races. The engine holds exactly one backend, chosen by
``select_backend``; nothing else branches on the backend's name. Each batch returns its own timing
(``BatchRun.merge_s``), so no caller reads state a previous call left behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch
from torch import nn

import ssf
from service.engine.metrics import EngineMetrics
from service.settings import EngineConfig

if TYPE_CHECKING:
    from service.engine.residency import TaskEntry

# How one batch runs: ``mixed`` (many tasks in one forward through the gather sites), ``merged`` (one task on
# its merged copy) or ``onnx`` (one task on its ONNX Runtime session). Also the ``path`` label of metrics.
BatchPath = Literal["mixed", "merged", "onnx"]


@dataclass(frozen=True)
class BatchRun:
    """What one batch produced: logits (one tensor per task group, or per request once split back) and the
    seconds spent building a merged copy or session for it (0.0 when it was cached)."""

    outputs: list[torch.Tensor]
    merge_s: float = 0.0


@runtime_checkable
class Backend(Protocol):
    """Implemented by ``TorchBackend`` and ``OnnxBackend``; every method runs on the model thread."""

    device: torch.device
    mixes: bool  # True when ``run`` accepts batches of many tasks on the ``mixed`` path
    single_task_path: BatchPath  # the path of a batch that holds one task

    def install(self, entry: TaskEntry) -> None:
        """Make a validated delta runnable. It may not have a version yet (an upload): anything that can fail
        on this replica fails here, before the store sees the new version."""
        ...

    def adopt(self, entry: TaskEntry) -> None:
        """The installed entry now has its version (``entry.key``): keep what was built ahead for it."""
        ...

    def release(self, entry: TaskEntry) -> None:
        """Free everything held for the entry (its version is retired, or the upload failed)."""
        ...

    def merged_cached(self, entry: TaskEntry) -> bool:
        """Whether a one-task batch of this entry would find its merged copy (or session) built."""
        ...

    def run(self, path: BatchPath, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> BatchRun:
        """One forward. ``groups``: (entry, images) runs in batch order; one output per group."""
        ...

    def warmup(self, example: torch.Tensor) -> None:
        """One forward per path, so the first request pays no lazy initialisation."""
        ...

    def export_onnx(self, entry: TaskEntry) -> bytes:
        """The task's merged ONNX graph (input ``image``, output ``logits``, dynamic batch)."""
        ...


def select_backend(
    config: EngineConfig, model: nn.Module, sites: list[ssf.Site], metrics: EngineMetrics
) -> Backend:
    """The backend ``config.backend`` names, built around ``model`` (the one branch on that name)."""
    if config.backend == "onnx":
        from service.engine.onnx_backend import OnnxBackend

        return OnnxBackend(model, sites, config.max_cache_bytes, metrics)
    from service.engine.torch_backend import DTYPES, TorchBackend, resolve_device

    device = resolve_device(config.device)
    backend = TorchBackend(model, sites, device, DTYPES[config.dtype], config.max_cache_bytes, metrics)
    if config.torch_compile:
        backend.use_compile()
    elif device.type == "cuda" and config.cuda_graphs:
        backend.use_cuda_graphs(config.max_batch_size)
    return backend
