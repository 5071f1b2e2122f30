"""Dynamic batching over many tasks, with a bounded queue, deadlines and a per-batch choice of path.

Requests wait at most ``max_queue_delay_ms`` for company, up to ``max_batch_size`` images. Each batch runs
on one of three paths:

- ``merged``: one task's requests on its merged copy (the bare backbone's cost), chosen when that task has
  at least ``merged_min_batch`` images waiting and its copy is cached, or fills a whole batch, or is cheap
  to build relative to the measured mixed-path overhead it saves;
- ``mixed``: the oldest requests of any tasks in one forward through the gather sites;
- ``onnx``: one task's requests on its ONNX Runtime session (the onnx backend has no mixed path).

Admission is checked once per request, before any decoding: ``admit`` reserves the request's images and
``submit`` queues them against that reservation. Requests whose deadline has passed are never executed; a
full queue answers Overloaded at once. The knobs are ``EngineConfig``'s, under their ``SSF_*`` names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from service.engine.backend import BatchPath, BatchRun
from service.engine.metrics import EngineMetrics
from service.engine.protocol import DeadlineExceeded, Overloaded, Unavailable
from service.engine.residency import TaskEntry
from service.settings import EngineConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    entry: TaskEntry
    x: torch.Tensor
    deadline: float  # time.monotonic()
    future: asyncio.Future[torch.Tensor]
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


class CostModel:
    """Moving averages of measured per-image forward cost by path and of merge time."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.per_image_s: dict[str, float] = {}
        self.merge_s: float | None = None

    def observe(self, path: str, seconds: float, images: int) -> None:
        value = seconds / max(images, 1)
        old = self.per_image_s.get(path)
        self.per_image_s[path] = value if old is None else old + self.alpha * (value - old)

    def observe_merge(self, seconds: float) -> None:
        self.merge_s = (
            seconds if self.merge_s is None else self.merge_s + self.alpha * (seconds - self.merge_s)
        )

    def merge_pays_off(self, images: int, amortize: float) -> bool:
        mixed, merged = self.per_image_s.get("mixed"), self.per_image_s.get("merged")
        if mixed is None or merged is None or self.merge_s is None:
            return True  # nothing measured yet: try it, and measure
        saved = max(mixed - merged, 0.0) * images * amortize
        return self.merge_s <= saved


# run(path, items) executes on the model thread: each item's logits and the merge seconds it took
BatchRunner = Callable[[BatchPath, list[Pending]], BatchRun]


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        runner: BatchRunner,
        executor: Executor,
        metrics: EngineMetrics,
        merged_cached: Callable[[TaskEntry], bool],
        grouped_path: BatchPath | None = None,
    ) -> None:
        self.config, self.runner, self.executor, self.metrics = config, runner, executor, metrics
        self.merged_cached = merged_cached
        self.grouped_path = grouped_path  # set when the backend cannot mix: every batch holds one task
        self.costs = CostModel()
        self.queue: list[Pending] = []
        self.images_waiting = 0
        self.images_admitted = 0  # admitted, not yet queued (decoding)
        self.busy = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ssf-scheduler")

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
        except TimeoutError:
            log.warning("drain timed out with %d images waiting", self.images_waiting)
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self.queue:
            if not p.future.done():
                p.future.set_exception(DeadlineExceeded("the server stopped before this request ran"))
        self.queue.clear()

    def admit(self, n: int) -> None:
        """Reserve room for ``n`` images, or refuse at once (before any decoding) when the queue is full.
        The caller then either ``submit``s them or ``withdraw``s the reservation."""
        if self.closed:
            raise Unavailable("the engine is stopping")
        held = self.images_waiting + self.images_admitted
        if held + n > self.config.max_queue_size:
            self.metrics.rejected.labels("queue_full").inc()
            per_image = self.costs.per_image_s.get("mixed", 0.01)
            retry = max(1.0, round(held * per_image, 1))
            raise Overloaded(f"{held} images are queued (limit {self.config.max_queue_size})", retry)
        self.images_admitted += n

    def withdraw(self, n: int) -> None:
        """Give back an admission that will not be submitted (the request failed before it was queued)."""
        self.images_admitted -= n

    def submit(
        self, entry: TaskEntry, x: torch.Tensor, deadline: float, admitted: bool = False
    ) -> asyncio.Future[torch.Tensor]:
        """Queue an admitted request (``admitted``), or admit and queue one in a single step."""
        n = int(x.shape[0])
        if not admitted:
            self.admit(n)
        self.images_admitted -= n
        if self.closed:
            raise Unavailable("the engine is stopping")
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(entry, x, deadline, future))
        self.images_waiting += n
        self.metrics.queue_depth.set(self.images_waiting)
        self._idle.clear()
        self._wakeup.set()
        return future

    # --------------------------------------------------------------------------------------- loop
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather_company()
            self._drop_dead()
            if not self.queue:
                continue
            path, items = self.choose()
            self._take(items)
            self.busy = True
            try:
                ran, outs = await loop.run_in_executor(self.executor, self._timed_run, path, items)
            except Exception as e:  # a bug in a forward: answer this batch's requests, keep serving
                log.exception("batch on path %s failed", path)
                for p in items:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            finally:
                self.busy = False
            answers = dict(zip(map(id, ran), outs, strict=True))
            for p in items:
                if p.future.done():
                    continue
                if id(p) in answers:
                    p.future.set_result(answers[id(p)])
                else:
                    self.metrics.rejected.labels("deadline").inc()
                    p.future.set_exception(
                        DeadlineExceeded("the request's deadline passed before it could run")
                    )

    async def _gather_company(self) -> None:
        """Wait until a batch is full or the oldest request has waited ``max_queue_delay_ms``."""
        until = self.queue[0].enqueued + self.config.max_queue_delay_ms / 1000
        while self.images_waiting < self.config.max_batch_size:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _drop_dead(self) -> None:
        now = time.monotonic()
        alive = []
        for p in self.queue:
            if p.future.done():  # the caller went away (cancelled)
                self.metrics.rejected.labels("cancelled").inc()
            elif p.deadline <= now:
                self.metrics.rejected.labels("deadline").inc()
                p.future.set_exception(DeadlineExceeded("the request's deadline passed before it could run"))
            else:
                alive.append(p)
                continue
            self.images_waiting -= p.n
        self.queue = alive
        self.metrics.queue_depth.set(self.images_waiting)

    def _take(self, items: list[Pending]) -> None:
        chosen = {id(p) for p in items}
        self.queue = [p for p in self.queue if id(p) not in chosen]
        self.images_waiting -= sum(p.n for p in items)
        self.metrics.queue_depth.set(self.images_waiting)

    def _fill(self, candidates: list[Pending]) -> list[Pending]:
        items: list[Pending] = []
        total = 0
        for p in candidates:
            if items and total + p.n > self.config.max_batch_size:
                break
            items.append(p)
            total += p.n
        return items

    def choose(self) -> tuple[BatchPath, list[Pending]]:
        """The path and requests of the next batch (oldest first within each choice)."""
        by_task: dict[tuple[str, int], list[Pending]] = {}
        for p in self.queue:
            by_task.setdefault(p.entry.key, []).append(p)
        if self.grouped_path is not None:
            return self.grouped_path, self._fill(by_task[self.queue[0].entry.key])
        policy = self.config.path_policy
        if policy == "merged":
            return "merged", self._fill(by_task[self.queue[0].entry.key])
        if policy == "auto":
            key, group = max(by_task.items(), key=lambda kv: sum(p.n for p in kv[1]))
            n = sum(p.n for p in group)
            if self._merged_wins(group[0].entry, n, single=len(by_task) == 1):
                return "merged", self._fill(group)
        items = self._fill(self.queue)
        return "mixed", items

    def _merged_wins(self, entry: TaskEntry, images: int, single: bool) -> bool:
        cfg = self.config
        if self.merged_cached(entry) and (single or images >= cfg.merged_min_batch):
            return True
        if images >= cfg.max_batch_size:
            return True
        return images >= cfg.merged_min_batch and self.costs.merge_pays_off(
            images, cfg.merge_amortize_batches
        )

    def _timed_run(self, path: BatchPath, items: list[Pending]) -> tuple[list[Pending], list[torch.Tensor]]:
        """On the model thread: deadlines are checked once more here, so an expired request never runs."""
        now = time.monotonic()
        items = [p for p in items if p.deadline > now and not p.future.done()]
        if not items:
            return [], []
        images = sum(p.n for p in items)
        for p in items:
            self.metrics.queue_wait_seconds.observe(now - p.enqueued)
        start = time.perf_counter()
        run = self.runner(path, items)
        seconds = time.perf_counter() - start - run.merge_s
        if run.merge_s:
            self.costs.observe_merge(run.merge_s)
        self.costs.observe(path, seconds, images)
        self.metrics.batches.labels(path).inc()
        self.metrics.images.labels(path).inc(images)
        self.metrics.batch_seconds.labels(path).observe(seconds)
        self.metrics.batch_size.observe(images)
        self.metrics.tasks_per_batch.observe(len({p.entry.key for p in items}))
        return items, run.outputs
