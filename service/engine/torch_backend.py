"""The PyTorch backend: the shared backbone for mixed batches and merged copies for single-task batches.

Everything here runs on the engine's single model thread (one process owns the accelerator), so table
writes, forwards and merges never race.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

import ssf
from service.engine.backend import BatchPath, BatchRun
from service.engine.merged import ByteLRU, MergedBuilder, build_plain, meta_skeleton
from service.engine.metrics import EngineMetrics
from service.engine.mixed import MixedModel, SiteTables, to_device
from service.engine.protocol import DeviceUnavailable
from service.engine.residency import TaskEntry

if TYPE_CHECKING:
    from service.engine.onnx_graph import OnnxGraphs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    try:
        return ssf.resolve_device(device)
    except ssf.DeviceError as e:
        raise DeviceUnavailable(str(e)) from None


class TorchBackend:
    """Owns the model: resident tables, the mixed forward, and the merged-copy LRU."""

    mixes = True
    single_task_path: BatchPath = "merged"

    def __init__(
        self,
        model: nn.Module,
        sites: list[ssf.Site],
        device: torch.device,
        dtype: torch.dtype,
        max_cache_bytes: int,
        metrics: EngineMetrics,
    ) -> None:
        self.device, self.dtype, self.metrics = device, dtype, metrics
        if device.type == "cuda" and dtype == torch.float32:
            # TF32 (on by default for cuDNN convolutions) keeps 10 mantissa bits: float32 must stay exact
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.base: dict[str, torch.Tensor] = dict(model.state_dict())  # pristine; shares the model's storage
        self.sites = [s for s in sites if s.foldable]
        self.skeleton = meta_skeleton(model)
        self.builder = MergedBuilder(self.skeleton, self.base, self.sites)
        self.bare = build_plain(self.skeleton, self.base)  # the bare backbone (shares every tensor)
        self.mixed = MixedModel(model, self.sites, device, dtype)
        self.tables: SiteTables = self.mixed.tables
        self.cache: ByteLRU[nn.Module] = ByteLRU("merged", max_cache_bytes, metrics)
        self._exporter: OnnxGraphs | None = None  # built on the first export (imports onnx)
        self._copy_bytes = 0  # what the last merged copy owned: the room a new one needs

    def use_cuda_graphs(self, max_batch: int) -> None:
        """Replay the mixed path's trunk as CUDA graphs, one per power-of-two batch up to ``max_batch``."""
        from service.engine.cuda_graphs import GraphedTrunk

        sizes = tuple(1 << i for i in range(max(1, max_batch - 1).bit_length() + 1))
        tables = self.tables
        self.mixed.runner = GraphedTrunk(self.mixed.trunk, tables.ptrs, sizes)

    def use_compile(self) -> None:
        """Run the mixed path's trunk through ``torch.compile`` (service.engine.compiled)."""
        from service.engine.compiled import CompiledTrunk

        self.tables.reuse = False  # the trunk is traced with the functional gather
        self.mixed.runner = CompiledTrunk(self.mixed.trunk)

    # --------------------------------------------------------------------------------- residency
    def install(self, entry: TaskEntry) -> None:
        sites = {
            p: (s.to(self.device, self.dtype), b.to(self.device, self.dtype))
            for p, (s, b) in entry.delta.sites.items()
        }
        entry.row = self.tables.add(sites)
        entry.head = to_device(entry.delta.head, self.device, self.dtype)

    def adopt(self, entry: TaskEntry) -> None:
        """Nothing is built ahead of the version: merged copies are made on demand."""

    def release(self, entry: TaskEntry) -> None:
        self.tables.release(entry.row)
        entry.row = 0
        if entry.stored is not None:  # None: an upload that failed before it got a version
            self.cache.discard(entry.key)

    # ---------------------------------------------------------------------------------- forwards
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def run(self, path: BatchPath, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> BatchRun:
        if path == "mixed":
            return BatchRun(self.run_mixed(x, groups))
        ((entry, _),) = groups
        model, merge_s = self.merged_model(entry)
        with torch.inference_mode():
            return BatchRun([model(self.prepare(x)).float().cpu()], merge_s)

    def run_mixed(self, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        outs = self.mixed(self.prepare(x), groups)
        if self.device.type == "cpu" or len(outs) == 1:
            return [_host(y) for y in outs]
        # one device-to-host copy for the batch: each ``.cpu()`` waits for the device (64 of them made a
        # batch of 64 distinct tasks host-bound on an H200)
        flat = torch.cat([y.float().reshape(-1) for y in outs]).cpu()
        parts = flat.split([y.numel() for y in outs])
        return [part.view(y.shape) for part, y in zip(parts, outs, strict=True)]

    def merged_cached(self, entry: TaskEntry) -> bool:
        return entry.key in self.cache

    def merged_model(self, entry: TaskEntry) -> tuple[nn.Module, float]:
        """The task's merged copy and the seconds spent building it now (0.0 when it was cached)."""
        merge_s = 0.0

        def build() -> tuple[nn.Module, int]:
            nonlocal merge_s
            # Evict before building, and build into the evicted copy's tensors: memory already touched
            # (a fresh ViT-B copy spends most of its merge page-faulting 343 MB of new tensors).
            evicted = self.cache.make_room(self._copy_bytes)
            reuse = evicted[0] if evicted else None
            model, owned, merge_s = self.builder.build(entry.delta.sites, entry.head, reuse=reuse)
            self._copy_bytes = owned
            self.metrics.merge_seconds.labels("torch").observe(merge_s)
            return model, owned

        model, _ = self.cache.get_or_build(entry.key, build)
        return model, merge_s

    @torch.inference_mode()
    def run_merged(self, entry: TaskEntry, x: torch.Tensor) -> torch.Tensor:
        return self.run("merged", x, [(entry, int(x.shape[0]))]).outputs[0]

    @torch.inference_mode()
    def run_bare(self, x: torch.Tensor) -> torch.Tensor:
        return self.bare(self.prepare(x)).float().cpu()

    def warmup(self, example: torch.Tensor) -> None:
        identity = TaskEntry(stored=None, delta=None)  # type: ignore[arg-type]
        identity.head = {k: v for k, v in self.base.items() if k.startswith(self._head_prefix())}
        # a runner compiles (batch 1 is its own shape to torch.compile) or captures per batch size: both
        # sizes before the server says it is ready, not on the first requests
        for x in [example] if self.mixed.runner is None else [example[:1], example]:
            self.mixed(self.prepare(x), [(identity, x.shape[0])])
        self.run_bare(example)

    def _head_prefix(self) -> str:
        return ssf.head_prefix(self.bare) + "."

    # ------------------------------------------------------------------------------------ export
    def export_onnx(self, entry: TaskEntry) -> bytes:
        if self._exporter is None:
            from service.engine.onnx_graph import OnnxGraphs

            self._exporter = OnnxGraphs(self.skeleton, self.base, self.sites)
        return self._exporter.merged_bytes(entry.delta)


def _host(y: torch.Tensor) -> torch.Tensor:
    """float32 on the host (no op at all when it already is: a mixed batch has one output per group)."""
    return y if y.dtype == torch.float32 and y.device.type == "cpu" else y.float().cpu()
