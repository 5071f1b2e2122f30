"""Evaluation: score a task's current version (and, if asked, another kept version) on labelled images.

Both versions run in the same batches on the mixed path: each chunk of decoded images is duplicated, the
current version's rows first, the other version's after, and one forward runs both (a backend that
cannot mix runs one forward per version). Chunks go to the model thread one at a time, so live batches
interleave with a long evaluation instead of waiting behind all of it. Images are decoded per chunk, so
memory holds one chunk of pixels however many images are evaluated.

The scores (``score``) are plain functions of the logits, so a test can recompute them offline:
accuracy, per-class accuracy, the confusion matrix, mean confidence (the top-1 softmax probability) and
the expected calibration error over ``ECE_BINS`` equal-width confidence bins.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from service.engine.eval_jobs import ECE_BINS, EvalReport, Progress, VersionEval, now_iso
from service.engine.protocol import BadImage, ImageTooLarge, InvalidParameter, VersionNotFound
from service.engine.residency import TaskEntry
from service.store.base import StoredTask, TaskNotFound

if TYPE_CHECKING:
    from service.engine.engine import Engine

log = logging.getLogger(__name__)


def calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width bins of |accuracy - confidence| weighted by the
    bin's share of images (a confidence c falls in bin ceil(c * bins) - 1, so 1.0 is in the last)."""
    n = confidence.numel()
    if n == 0:
        return 0.0
    index = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        if count:
            gap = correct[in_bin].double().mean() - confidence[in_bin].double().mean()
            total += count / n * abs(float(gap))
    return total


def score(
    logits: torch.Tensor, truth: torch.Tensor, labels: list[str], version: int, current: bool
) -> VersionEval:
    """One version's scores; ``truth`` holds label indices into ``labels``."""
    probs = torch.softmax(logits.double(), dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = predicted == truth
    k = len(labels)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    per_class: dict[str, float | None] = {}
    for i, label in enumerate(labels):
        count = int(confusion[i].sum())
        per_class[label] = int(confusion[i, i]) / count if count else None
    return VersionEval(
        version=version,
        current=current,
        images=int(truth.numel()),
        accuracy=float(correct.double().mean()),
        per_class_accuracy=per_class,
        labels=list(labels),
        confusion=confusion.tolist(),
        mean_confidence=float(confidence.mean()),
        calibration_error=calibration_error(confidence, correct),
        calibration_bins=ECE_BINS,
        evaluated_at=now_iso(),
    )


def label_indices(labels: Sequence[str], known: list[str], version: int) -> torch.Tensor:
    index = {label: i for i, label in enumerate(known)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        shown = ", ".join(repr(u[:60]) for u in unknown[:5])
        raise InvalidParameter(
            f"unknown label(s) {shown} for version {version}; its labels are {known[:20]}",
            code="unknown_label",
        )
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


class Evaluator:
    """The engine's evaluations; holds the engine for its residency, store, workers and backend."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def check(self, name: str, images: Sequence[bytes], labels: Sequence[str]) -> None:
        cfg = self.engine.config
        if not images:
            raise InvalidParameter("send at least one labelled image", code="no_images")
        if len(images) != len(labels):
            raise InvalidParameter(
                f"{len(images)} images but {len(labels)} labels: "
                "send one 'label' field per 'image', in the same order",
                code="label_count_mismatch",
            )
        if len(images) > cfg.eval_max_images:
            raise ImageTooLarge(f"{len(images)} images; an evaluation takes at most {cfg.eval_max_images}")
        for i, data in enumerate(images):
            if len(data) > cfg.max_body_bytes:
                raise ImageTooLarge(f"image {i} is {len(data)} bytes; the limit is {cfg.max_body_bytes}")

    def check_labels(self, name: str, labels: Sequence[str], version: int | None) -> None:
        """Unknown labels against the current version (and ``version``'s stored labels), before any work."""
        current = self.engine.store.get(name)
        label_indices(labels, list(current.info.get("labels", [])), current.version)
        if version is not None and version != current.version:
            other = self._stored_version(name, version)
            label_indices(labels, list(other.info.get("labels", [])), version)

    def _stored_version(self, name: str, version: int) -> StoredTask:
        store: Any = self.engine.store
        getter = getattr(store, "get_version", None)
        try:
            if getter is None:
                current: StoredTask = store.get(name)
                if current.version != version:  # a store without history keeps only the current one
                    raise VersionNotFound(f"task {name!r} has no kept version {version}")
                return current
            stored: StoredTask = getter(name, version)
            return stored
        except TaskNotFound as e:
            if getattr(e, "version", None) is None:  # the task itself is gone: 404 task_not_found
                raise
            raise VersionNotFound(f"task {name!r} has no kept version {version}") from None

    @contextlib.asynccontextmanager
    async def _entries(self, name: str, version: int | None) -> AsyncIterator[list[TaskEntry]]:
        """The current entry and, when asked, the other version's: resident for the evaluation only
        unless it already is (a staged version), and released afterwards."""
        engine = self.engine
        residency = engine.residency
        current = await residency.resolve(name)
        with residency.hold(current):
            if version is None or version == current.version:
                yield [current]
                return
            stored = await engine.workers.on_cpu(self._stored_version, name, version)
            resident = _resident(residency, name, version)
            if resident is not None:
                with residency.hold(resident):
                    yield [current, resident]
                return
            try:
                data = await engine.workers.on_cpu(engine.store.read, name, version)
            except TaskNotFound:
                raise VersionNotFound(f"task {name!r} has no kept version {version}") from None
            delta = await engine.workers.on_cpu(residency.validate, data)
            other = await residency.install(delta)
            other.stored = stored
            try:
                yield [current, other]
            finally:
                await residency.discard(other)

    async def run(
        self,
        name: str,
        images: Sequence[bytes],
        labels: Sequence[str],
        version: int | None,
        sources: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> EvalReport:
        self.check(name, images, labels)
        engine = self.engine
        async with self._entries(name, version) as entries:
            truths = [label_indices(labels, e.labels, e.version) for e in entries]
            chunk = max(1, engine.config.max_batch_size // len(entries))
            outputs: list[list[torch.Tensor]] = [[] for _ in entries]
            for start in range(0, len(images), chunk):
                part = list(images[start : start + chunk])
                x = await engine.workers.on_cpu(self._decode, part, start, sources)
                logits = await engine.workers.on_model(self._forward, x, entries)
                for out, y in zip(outputs, logits, strict=True):
                    out.append(y)
                if progress is not None:
                    progress(start + len(part))
            results = [
                score(torch.cat(out), truth, e.labels, e.version, current=i == 0)
                for i, (e, out, truth) in enumerate(zip(entries, outputs, truths, strict=True))
            ]
        for result in results:
            await engine.workers.on_cpu(self._save, name, result)
        return EvalReport(task=name, images=len(images), results=results)

    def _decode(self, part: list[bytes], offset: int, sources: Sequence[str] | None) -> torch.Tensor:
        pre = self.engine.preprocess
        tensors = []
        for i, data in enumerate(part):
            index = offset + i
            try:
                tensors.append(pre.tensor(pre.decode(data, index), index))
            except (BadImage, ImageTooLarge) as e:
                if sources is not None:
                    e.message = f"{e.message} ({sources[index][:120]})"
                    e.args = (e.message,)
                raise
        return torch.stack(tensors)

    def _forward(self, x: torch.Tensor, entries: list[TaskEntry]) -> list[torch.Tensor]:
        """On the model thread: every entry's logits for ``x``, in one mixed batch where the backend mixes."""
        backend = self.engine.backend
        n = int(x.shape[0])
        if backend.mixes:
            both = torch.cat([x] * len(entries)) if len(entries) > 1 else x
            run = backend.run("mixed", both, [(e, n) for e in entries])
            return [y.float().cpu() for y in run.outputs]
        return [backend.run(backend.single_task_path, x, [(e, n)]).outputs[0].float().cpu() for e in entries]

    def _save(self, name: str, result: VersionEval) -> None:
        """The result joins the version's ``metrics.eval`` in the store (where the store can patch it)."""
        store: Any = self.engine.store
        update = getattr(store, "update_info", None)
        if update is None:
            log.warning(
                "the store cannot record evaluations; %s v%d's result is not kept", name, result.version
            )
            return
        stored = self._stored_version(name, result.version)
        metrics = dict(stored.info.get("metrics") or {})
        metrics["eval"] = result.stored()
        update(name, result.version, {"metrics": metrics})
        self.engine.metrics.eval_accuracy(name, result.version, result.accuracy)


def _resident(residency: Any, name: str, version: int) -> TaskEntry | None:
    """A resident entry of ``name`` at ``version`` other than the current one (a staged version)."""
    staged = getattr(residency, "staged", None)
    if isinstance(staged, dict):
        entry = staged.get(name)
        if isinstance(entry, TaskEntry) and entry.version == version and not entry.retired:
            return entry
    return None
