"""Shadow traffic: a share of a task's live requests also runs on its staged version, in the same batch.

When a task has a staged version resident, each of its requests is picked with probability
``SSF_SHADOW_FRACTION`` as the batch is built. A picked request's input is duplicated under the staged
version's entry: on the mixed path that is one more group of rows in the same forward (the staged
version's scale/shift rows are gathered like any other task's); on a merged or ONNX batch, which holds
one task, the shadow rows run in one extra forward right after it. Shadow rows ride on top of
``SSF_MAX_BATCH_SIZE`` (at a fraction of 1 a mixed batch holds up to twice as many rows), so they never
push a live request out of its batch. The answer always comes from the current version; the staged
version's logits are only compared with it:

- agreement: the share of images whose top-1 label (by name) is the same for both versions;
- drift: the mean total variation distance between the two softmax distributions, labels matched by
  name (a label only one version has counts with probability 0 on the other side), in [0, 1].

Counts are this replica's, since the staged version was first seen (a newly staged version starts over).
Everything here runs on the model thread except ``stats``, so the counts are guarded by a lock.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.engine.backend import Backend, BatchPath, BatchRun
from service.engine.batches import run_batch
from service.engine.metrics import EngineMetrics
from service.engine.residency import TaskEntry
from service.engine.scheduler import Pending


@dataclass
class ShadowStats:
    version: int  # the staged version compared with the current one
    requests: int = 0
    images: int = 0
    agreements: int = 0
    drift_sum: float = 0.0

    def view(self) -> dict[str, float | int | None]:
        return {
            "version": self.version,
            "requests": self.requests,
            "images": self.images,
            "agreement": self.agreements / self.images if self.images else None,
            "drift": self.drift_sum / self.images if self.images else None,
        }


def compare(
    current: torch.Tensor, current_labels: list[str], staged: torch.Tensor, staged_labels: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: top-1 agreement (bool) and total variation distance of the two softmax distributions."""
    p = torch.softmax(current.double(), dim=-1)
    q = torch.softmax(staged.double(), dim=-1)
    top_p = [current_labels[i] for i in p.argmax(dim=-1).tolist()]
    top_q = [staged_labels[i] for i in q.argmax(dim=-1).tolist()]
    agree = torch.tensor([a == b for a, b in zip(top_p, top_q, strict=True)])
    if current_labels == staged_labels:
        return agree, 0.5 * (p - q).abs().sum(dim=-1)
    union = list(dict.fromkeys(current_labels + staged_labels))
    column = {label: i for i, label in enumerate(union)}
    pu = torch.zeros(p.shape[0], len(union), dtype=p.dtype)
    qu = torch.zeros_like(pu)
    pu[:, [column[label] for label in current_labels]] = p
    qu[:, [column[label] for label in staged_labels]] = q
    return agree, 0.5 * (pu - qu).abs().sum(dim=-1)


class Shadow:
    """Picks requests to shadow, runs them with their batch, and keeps the per-task comparison."""

    def __init__(
        self,
        fraction: float,
        staged: Callable[[str], TaskEntry | None],
        metrics: EngineMetrics,
        seed: int | None = None,
    ) -> None:
        self.fraction = fraction
        self.staged = staged  # the task's resident staged entry, if any (read on the model thread)
        self.metrics = metrics
        self._random = random.Random(seed)
        self._stats: dict[str, ShadowStats] = {}
        self._lock = threading.Lock()

    def _pick(self, items: list[Pending]) -> list[Pending]:
        """Shadow rows for the picked requests: the same input under the staged version's entry."""
        if self.fraction <= 0:
            return []
        extra: list[Pending] = []
        for p in items:
            target = self.staged(p.entry.name)
            if target is None or target.retired or target.version == p.entry.version:
                continue
            if self.fraction >= 1 or self._random.random() < self.fraction:
                extra.append(Pending(target, p.x, p.deadline, p.future, p.enqueued))
        return extra

    def run(self, backend: Backend, path: BatchPath, items: list[Pending]) -> BatchRun:
        """``run_batch`` of ``items``, with the shadow rows of the picked ones; answers for ``items`` only."""
        extra = self._pick(items)
        if not extra:
            return run_batch(backend, path, items)
        if path == "mixed":
            run = run_batch(backend, path, items + extra)
            answers, shadows, merge_s = run.outputs[: len(items)], run.outputs[len(items) :], run.merge_s
        else:  # a one-task batch (merged copy or ONNX session): the shadow rows run right after it
            run = run_batch(backend, path, items)
            shadow_path: BatchPath = "mixed" if backend.mixes else backend.single_task_path
            shadow_run = run_batch(backend, shadow_path, extra)
            answers, shadows = run.outputs, shadow_run.outputs
            merge_s = run.merge_s + shadow_run.merge_s
        originals = {id(p.x): (p, y) for p, y in zip(items, answers, strict=True)}
        for s, y_staged in zip(extra, shadows, strict=True):
            p, y_current = originals[id(s.x)]
            self._record(p.entry, s.entry, y_current, y_staged)
        return BatchRun(answers, merge_s)

    def _record(self, current: TaskEntry, staged: TaskEntry, y: torch.Tensor, y_staged: torch.Tensor) -> None:
        agree, drift = compare(y, current.labels, y_staged, staged.labels)
        with self._lock:
            stats = self._stats.get(current.name)
            if stats is None or stats.version != staged.version:
                stats = self._stats[current.name] = ShadowStats(staged.version)
            stats.requests += 1
            stats.images += int(agree.numel())
            stats.agreements += int(agree.sum())
            stats.drift_sum += float(drift.sum())
            view = stats.view()
        self.metrics.shadow(
            current.name, int(agree.numel()), float(view["agreement"] or 0.0), float(view["drift"] or 0.0)
        )

    def stats(self, name: str) -> dict[str, float | int | None] | None:
        """The task's comparison so far, while its staged version is the one compared (else None)."""
        with self._lock:
            stats = self._stats.get(name)
            if stats is None:
                return None
            staged = self.staged(name)
            if staged is None or staged.version != stats.version:
                return None
            return stats.view()

    def forget(self, name: str) -> None:
        with self._lock:
            self._stats.pop(name, None)
