"""The ONNX Runtime backend: per task a session over its merged graph (``onnx_graph``), in an LRU bounded in
bytes and keyed by (task, version). Every batch holds one task; there is no mixed path."""

from __future__ import annotations

import time

import onnxruntime as ort
import torch
from torch import nn

import ssf
from service.engine.backend import BatchPath, BatchRun
from service.engine.merged import ByteLRU, meta_skeleton
from service.engine.metrics import EngineMetrics
from service.engine.onnx_graph import OnnxGraphs, new_session
from service.engine.residency import TaskEntry


class OnnxBackend:
    mixes = False
    single_task_path: BatchPath = "onnx"

    def __init__(
        self, model: nn.Module, sites: list[ssf.Site], max_cache_bytes: int, metrics: EngineMetrics
    ) -> None:
        self.device = torch.device("cpu")
        self.metrics = metrics
        model = model.eval().requires_grad_(False)
        self.graphs = OnnxGraphs(meta_skeleton(model), model.state_dict(), [s for s in sites if s.foldable])
        self.sessions: ByteLRU[ort.InferenceSession] = ByteLRU("onnx", max_cache_bytes, metrics)

    def _build(self, entry: TaskEntry) -> tuple[ort.InferenceSession, int, float]:
        start = time.perf_counter()
        data = self.graphs.merged_bytes(entry.delta)
        session = new_session(data)
        seconds = time.perf_counter() - start
        self.metrics.merge_seconds.labels("onnx").observe(seconds)
        return session, len(data), seconds

    def install(self, entry: TaskEntry) -> None:
        """Build the task's session ahead of its version number (an upload): failures surface here."""
        session, nbytes, _ = self._build(entry)
        entry.prebuilt = (session, nbytes)

    def adopt(self, entry: TaskEntry) -> None:
        if entry.prebuilt is not None:
            session, nbytes = entry.prebuilt
            entry.prebuilt = None
            self.sessions.put(entry.key, session, nbytes)

    def release(self, entry: TaskEntry) -> None:
        entry.prebuilt = None
        if entry.stored is not None:
            self.sessions.discard(entry.key)

    def merged_cached(self, entry: TaskEntry) -> bool:
        return entry.key in self.sessions

    def run(self, path: BatchPath, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> BatchRun:
        ((entry, _),) = groups
        merge_s = 0.0

        def build() -> tuple[ort.InferenceSession, int]:
            nonlocal merge_s
            session, nbytes, merge_s = self._build(entry)
            return session, nbytes

        session, _ = self.sessions.get_or_build(entry.key, build)
        out = session.run(["logits"], {"image": x.float().numpy()})[0]
        return BatchRun([torch.from_numpy(out)], merge_s)

    def warmup(self, example: torch.Tensor) -> None:
        self.graphs.base_session.run(["logits"], {"image": example.float().numpy()})

    def export_onnx(self, entry: TaskEntry) -> bytes:
        return self.graphs.merged_bytes(entry.delta)
