"""The ONNX Runtime backend: batches of many tasks through one mixed graph whose per-sample scale and shift
rows are inputs (``onnx_mixed``), and per task a session over its merged graph (``onnx_graph``) for one-task
batches, made on demand in an LRU bounded in bytes and keyed by (task, version). A backbone the mixed graph
cannot be exported for keeps the per-task sessions only (every batch then holds one task, each session built
when the task is installed)."""

from __future__ import annotations

import logging
import time

import onnxruntime as ort
import torch
from torch import nn

import ssf
from service.engine.backend import BatchPath, BatchRun
from service.engine.merged import ByteLRU, meta_skeleton
from service.engine.metrics import EngineMetrics
from service.engine.onnx_graph import OnnxGraphs, new_session
from service.engine.onnx_mixed import MixedSession
from service.engine.residency import TaskEntry

log = logging.getLogger("ssf.engine")


class OnnxBackend:
    mixes = False  # an instance whose mixed graph was built sets True
    single_task_path: BatchPath = "onnx"

    def __init__(
        self,
        model: nn.Module,
        sites: list[ssf.Site],
        max_cache_bytes: int,
        metrics: EngineMetrics,
    ) -> None:
        self.device = torch.device("cpu")
        self.metrics = metrics
        model = model.to("cpu", torch.float32).eval().requires_grad_(False)
        foldable = [s for s in sites if s.foldable]
        self.graphs = OnnxGraphs(meta_skeleton(model), model.state_dict(), foldable)
        self.sessions: ByteLRU[ort.InferenceSession] = ByteLRU("onnx", max_cache_bytes, metrics)
        self.mixed: MixedSession | None = None
        try:
            self.mixed = MixedSession(model, foldable)
        except Exception as e:  # noqa: BLE001 - whatever the exporter cannot trace: per-task sessions
            log.warning("no mixed ONNX graph for this backbone, one session per task: %s", str(e)[:300])
        self.mixes = self.mixed is not None

    def _build(self, entry: TaskEntry) -> tuple[ort.InferenceSession, int, float]:
        start = time.perf_counter()
        data = self.graphs.merged_bytes(entry.delta)
        session = new_session(data)
        seconds = time.perf_counter() - start
        self.metrics.merge_seconds.labels("onnx").observe(seconds)
        return session, len(data), seconds

    def install(self, entry: TaskEntry) -> None:
        """With the mixed graph: the task's rows in its tables (sessions are made on demand). Without: build
        the task's session ahead of its version number (an upload), so failures surface here."""
        if self.mixed is not None:
            sites = {p: (s.float(), b.float()) for p, (s, b) in entry.delta.sites.items()}
            entry.row = self.mixed.tables.add(sites)
            entry.head = {k: v.float() for k, v in entry.delta.head.items()}
            return
        session, nbytes, _ = self._build(entry)
        entry.prebuilt = (session, nbytes)

    def adopt(self, entry: TaskEntry) -> None:
        if entry.prebuilt is not None:
            session, nbytes = entry.prebuilt
            entry.prebuilt = None
            self.sessions.put(entry.key, session, nbytes)

    def release(self, entry: TaskEntry) -> None:
        entry.prebuilt = None
        if self.mixed is not None:
            self.mixed.tables.release(entry.row)
            entry.row = 0
        if entry.stored is not None:
            self.sessions.discard(entry.key)

    def merged_cached(self, entry: TaskEntry) -> bool:
        return entry.key in self.sessions

    def run(self, path: BatchPath, x: torch.Tensor, groups: list[tuple[TaskEntry, int]]) -> BatchRun:
        if path == "mixed" and self.mixed is not None:
            return BatchRun(self.mixed.run(x, groups))
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
        if self.mixed is not None:
            self.mixed.warmup(example)

    def export_onnx(self, entry: TaskEntry) -> bytes:
        return self.graphs.merged_bytes(entry.delta)
