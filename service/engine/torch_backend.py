"""The PyTorch backend: the shared backbone for mixed batches and merged copies for single-task batches.

Everything here runs on the engine's single model thread (one process owns the accelerator), so table
writes, forwards and merges never race.
"""

from __future__ import annotations

import torch
from torch import nn

import ssf
from service.engine.merged import ByteLRU, MergedBuilder, build_plain, meta_skeleton
from service.engine.metrics import EngineMetrics
from service.engine.resident import MixedModel, SiteTables, TaskEntry, to_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


class TorchBackend:
    """Owns the model: resident tables, the mixed forward, and the merged-copy LRU."""

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
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.base: dict[str, torch.Tensor] = dict(model.state_dict())  # pristine; shares the model's storage
        self.sites = [s for s in sites if s.foldable]
        self.skeleton = meta_skeleton(model)
        self.builder = MergedBuilder(self.skeleton, self.base, self.sites)
        self.bare = build_plain(self.skeleton, self.base)  # the bare backbone (shares every tensor)
        self.tables = SiteTables(self.sites, device, dtype)
        self.mixed = MixedModel(model, self.sites, self.tables)
        self.cache: ByteLRU[nn.Module] = ByteLRU("merged", max_cache_bytes, metrics)

    # --------------------------------------------------------------------------------- residency
    def install(self, entry: TaskEntry) -> None:
        sites = {
            p: (s.to(self.device, self.dtype), b.to(self.device, self.dtype))
            for p, (s, b) in entry.delta.sites.items()
        }
        entry.row = self.tables.add(sites)
        entry.head = to_device(entry.delta.head, self.device, self.dtype)

    def release(self, entry: TaskEntry) -> None:
        self.tables.release(entry.row)
        entry.row = 0
        if entry.stored is not None:  # None: an upload that failed before it got a version
            self.cache.discard(entry.key)

    # ---------------------------------------------------------------------------------- forwards
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def run_mixed(self, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> list[torch.Tensor]:
        return [y.float().cpu() for y in self.mixed(self.prepare(x), groups)]

    def merged_cached(self, entry: TaskEntry) -> bool:
        return entry.key in self.cache

    def merged_model(self, entry: TaskEntry) -> nn.Module:
        def build() -> tuple[nn.Module, int]:
            model, owned, seconds = self.builder.build(entry.delta.sites, entry.head)
            self.metrics.merge_seconds.labels("torch").observe(seconds)
            self.last_merge_s = seconds
            return model, owned

        self.last_merge_s = 0.0
        model, _ = self.cache.get_or_build(entry.key, build)
        return model

    @torch.inference_mode()
    def run_merged(self, entry: TaskEntry, x: torch.Tensor) -> torch.Tensor:
        model = self.merged_model(entry)
        return model(self.prepare(x)).float().cpu()

    @torch.inference_mode()
    def run_bare(self, x: torch.Tensor) -> torch.Tensor:
        return self.bare(self.prepare(x)).float().cpu()

    def warmup(self, example: torch.Tensor) -> None:
        """One forward per path, so the first request pays no lazy initialisation."""
        identity = TaskEntry(stored=None, delta=None)  # type: ignore[arg-type]
        identity.head = {k: v for k, v in self.base.items() if k.startswith(self._head_prefix())}
        self.mixed(self.prepare(example), [(identity, example.shape[0])])
        self.run_bare(example)

    def _head_prefix(self) -> str:
        return ssf.head_prefix(self.bare) + "."
