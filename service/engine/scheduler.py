"""Dynamic batching over many tasks, with a bounded queue, deadlines and a per-batch choice of path.

Requests wait at most ``max_queue_delay_ms`` for company, up to ``max_batch_size`` images. Each batch runs
on one of three paths:

- ``merged``: one task's requests on its merged copy (the bare backbone's cost), chosen only when that
  loses no batch size: the task fills a whole batch on its own, or its requests are all that wait (then
  when its copy is cached, or it has ``merged_min_batch`` images and the copy is cheap to build relative
  to the measured mixed-path overhead it saves). A smaller one-task batch beside other tasks' requests
  would split one forward into two smaller ones, which costs more than the mixed path's per-site ops save;
- ``mixed``: the oldest requests of any tasks in one forward through the gather sites;
- ``onnx``: one task's requests on its ONNX Runtime session (the onnx backend has no mixed path).

Admission is checked once per request, before any decoding: ``admit`` reserves the request's images and
``submit`` queues them against that reservation. Requests whose deadline has passed are never executed; a
full queue answers Overloaded at once. The knobs are ``EngineConfig``'s, under their ``SSF_*`` names.

Fair share (docs/multi-team.md): each request runs in a ``Lane`` (its tenant, the tenant's weight, and its
priority class), which the HTTP layer sets in the ``LANE`` context variable. Batches are filled in weighted
fair queuing order (start-time fair queuing over images: a tenant's next request starts at
``max(V - credit, its last finish)`` and finishes ``images / weight`` later; the smallest start runs first),
interactive before batch within a tenant. The credit (``BURST_BATCHES`` full batches of virtual time) is
the sleeper credit of CPU schedulers such as Linux's CFS: a tenant served in the last ``ACTIVE_S`` seconds
whose last finish lies behind the clock (it used less than its share) may run a short burst back to back
instead of alternating with a busy tenant request by request. A backlogged tenant's finish tags run ahead
of the clock, so it never has credit; a newcomer starts at ``V`` without any; no tenant gets more than
its share plus the credit over any interval. While several tenants are active each may hold at most its
weighted share of ``max_queue_size`` (at least one request's worth), so a tenant that offers more than
its share is answered 429 while the others keep their place. With one tenant (every request without one
shares the lane ``-``) nothing differs from plain arrival order and one queue bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from service.engine.backend import BatchPath, BatchRun
from service.engine.metrics import EngineMetrics
from service.engine.protocol import DeadlineExceeded, Overloaded, Unavailable
from service.engine.residency import TaskEntry
from service.settings import EngineConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lane:
    """Who a request is queued for: a tenant (``-`` for none), its weight, and its priority class."""

    tenant: str = "-"
    weight: float = 1.0
    batch: bool = False  # the batch class runs after the tenant's interactive requests
    images: int = 0  # images this request was admitted with (the HTTP layer charges quotas with it)


DEFAULT_LANE = Lane()
LANE: ContextVar[Lane | None] = ContextVar("ssf_lane", default=None)
ACTIVE_S = 2.0  # a tenant counts as active this long after its last request, for the queue shares
BURST_BATCHES = 4  # the sleeper credit of fair queuing, in full batches of virtual time (module docstring)


def current_lane() -> Lane:
    return LANE.get() or DEFAULT_LANE


@dataclass(eq=False)
class Pending:
    entry: TaskEntry
    x: torch.Tensor
    deadline: float  # time.monotonic()
    future: asyncio.Future[torch.Tensor]
    enqueued: float = field(default_factory=time.monotonic)
    lane: Lane = DEFAULT_LANE

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

    def merge_pays_off(self, images: int, amortize: float, one_task_path: str = "merged") -> bool:
        mixed, merged = self.per_image_s.get("mixed"), self.per_image_s.get(one_task_path)
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
        one_task_path: BatchPath = "merged",
    ) -> None:
        self.config, self.runner, self.executor, self.metrics = config, runner, executor, metrics
        self.merged_cached = merged_cached
        self.grouped_path = grouped_path  # set when the backend cannot mix: every batch holds one task
        self.one_task_path = one_task_path  # a mixing backend's path for a one-task batch (its merged copy)
        self.costs = CostModel()
        self.queue: list[Pending] = []
        self.images_waiting = 0
        self.images_admitted = 0  # admitted, not yet queued (decoding)
        self.busy = False
        self.held: dict[str, int] = {}  # images admitted or waiting, by tenant
        self.seen: dict[str, tuple[float, float]] = {}  # tenant -> (weight, last request at)
        self._vtime = 0.0  # weighted fair queuing: the start tag of the last request taken
        self._finish: dict[str, float] = {}  # tenant -> the finish tag of its last request taken
        self._taken_at: dict[str, float] = {}  # tenant -> when its last request was taken (time.monotonic)
        self._tags: dict[int, tuple[str, float, float]] = {}  # id(Pending) -> (tenant, start, finish)
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
        self.held.clear()

    # ---------------------------------------------------------------------------- admission
    def share(self, lane: Lane) -> int | None:
        """The images ``lane``'s tenant may hold while other tenants are active; None when it is alone."""
        now = time.monotonic()
        self.seen[lane.tenant] = (lane.weight, now)
        active = {t: w for t, (w, at) in self.seen.items() if self.held.get(t, 0) > 0 or now - at < ACTIVE_S}
        for t in [t for t in self.seen if t not in active]:
            del self.seen[t]  # bounded by the tenants active in the last ACTIVE_S
        if len(active) <= 1:
            return None
        bound = math.ceil(self.config.max_queue_size * lane.weight / sum(active.values()))
        return max(bound, self.config.max_images_per_request)

    def _refuse(self, held: int, limit: int, tenant: str | None) -> Overloaded:
        self.metrics.rejected.labels("queue_full").inc()
        per_image = self.costs.per_image_s.get("mixed", 0.01)
        retry = max(1.0, round(held * per_image, 1))
        who = f"tenant {tenant!r} holds" if tenant else "the queue holds"
        return Overloaded(f"{who} {held} images (limit {limit})", retry)

    def precheck(self) -> None:
        """Refuse a tenant's request before its body is read when its share is already full."""
        lane = current_lane()
        bound = self.share(lane)
        if bound is not None and self.held.get(lane.tenant, 0) >= bound:
            raise self._refuse(self.held.get(lane.tenant, 0), bound, lane.tenant)

    def admit(self, n: int) -> bool:
        """Reserve room for ``n`` images, or refuse at once (before any decoding) when the queue (or, with
        several tenants active, the tenant's share of it) is full. The caller then either ``submit``s
        them or ``withdraw``s the reservation, in the same context (the lane is read from it). Returns
        whether the tenant now holds more than half of its share while other tenants are active (its
        decoding then runs at a lower CPU priority: ``Workers.decode``)."""
        if self.closed:
            raise Unavailable("the engine is stopping")
        lane = current_lane()
        bound = self.share(lane)
        if bound is None:
            held = self.images_waiting + self.images_admitted
            if held + n > self.config.max_queue_size:
                raise self._refuse(held, self.config.max_queue_size, None)
        else:
            mine = self.held.get(lane.tenant, 0)
            if mine + n > bound:
                raise self._refuse(mine, bound, lane.tenant)
        self.images_admitted += n
        self.held[lane.tenant] = self.held.get(lane.tenant, 0) + n
        if lane is not DEFAULT_LANE:
            lane.images += n
        return bound is not None and self.held[lane.tenant] > bound // 2

    def _release(self, tenant: str, n: int) -> None:
        left = self.held.get(tenant, 0) - n
        if left > 0:
            self.held[tenant] = left
        else:
            self.held.pop(tenant, None)

    def withdraw(self, n: int) -> None:
        """Give back an admission that will not be submitted (the request failed before it was queued)."""
        self.images_admitted -= n
        self._release(current_lane().tenant, n)

    def submit(
        self, entry: TaskEntry, x: torch.Tensor, deadline: float, admitted: bool = False
    ) -> asyncio.Future[torch.Tensor]:
        """Queue an admitted request (``admitted``), or admit and queue one in a single step."""
        n = int(x.shape[0])
        if not admitted:
            self.admit(n)
        self.images_admitted -= n
        lane = current_lane()
        if self.closed:
            self._release(lane.tenant, n)
            raise Unavailable("the engine is stopping")
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(entry, x, deadline, future, lane=lane))
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
            self._release(p.lane.tenant, p.n)
        self.queue = alive
        self.metrics.queue_depth.set(self.images_waiting)

    def _take(self, items: list[Pending]) -> None:
        now = time.monotonic()
        chosen = {id(p) for p in items}
        self.queue = [p for p in self.queue if id(p) not in chosen]
        self.images_waiting -= sum(p.n for p in items)
        self.metrics.queue_depth.set(self.images_waiting)
        for p in items:
            self._release(p.lane.tenant, p.n)
            # commit the fair-queuing tags of what runs now; a request the one-tenant fast path took (no
            # tag) gets its tag here, so a tenant served alone still moves the virtual clock and another
            # tenant coming back does not tie with it on a stale finish tag
            tag = self._tags.get(id(p)) or self._tag(p.lane, p.n)
            tenant, start, finish = tag
            self._finish[tenant] = max(self._finish.get(tenant, -math.inf), finish)
            self._taken_at[tenant] = now
            self._vtime = max(self._vtime, start)
        self._tags.clear()
        for tenant in [t for t, at in self._taken_at.items() if t not in self.held and now - at > ACTIVE_S]:
            del self._finish[tenant], self._taken_at[tenant]  # gone: bounded by the tenants active lately

    def _start(self, tenant: str, vtime: float, finish: dict[str, float]) -> float:
        """The start tag of ``tenant``'s next request at virtual time ``vtime``: a newcomer starts at the
        clock; a tenant served lately at its last finish, but no earlier than the clock less the credit."""
        last = finish.get(tenant)
        return vtime if last is None else max(vtime - BURST_BATCHES * self.config.max_batch_size, last)

    def _tag(self, lane: Lane, images: int) -> tuple[str, float, float]:
        """(tenant, start, finish) of a request of ``lane`` taken next (``_start``); it finishes
        ``images / weight`` after its start."""
        start = self._start(lane.tenant, self._vtime, self._finish)
        return lane.tenant, start, start + images / max(lane.weight, 1e-9)

    def fair_order(self) -> list[Pending]:
        """The queue in weighted fair queuing order (interactive before batch within a tenant); the queue
        itself, in arrival order, when one tenant's interactive requests are all that wait."""
        self._tags.clear()
        lanes: dict[str, tuple[list[Pending], list[Pending]]] = {}
        for p in self.queue:
            interactive, batch = lanes.setdefault(p.lane.tenant, ([], []))
            (batch if p.lane.batch else interactive).append(p)
        if len(lanes) <= 1 and not any(b for _, b in lanes.values()):
            return self.queue
        heads = {t: [*i, *b] for t, (i, b) in lanes.items()}  # each tenant's requests in its own order
        finish = dict(self._finish)
        vtime, order = self._vtime, []
        position = dict.fromkeys(heads, 0)
        for _ in range(len(self.queue)):  # start-time fair queuing: the smallest start tag runs next
            best: tuple[float, float, float, str] | None = None
            for t, items in heads.items():
                if position[t] < len(items):
                    p = items[position[t]]
                    start = self._start(t, vtime, finish)
                    key = (start, start + p.n / max(p.lane.weight, 1e-9), p.enqueued, t)
                    best = key if best is None or key < best else best
            assert best is not None
            start, end, _, t = best
            p = heads[t][position[t]]
            finish[t], vtime = end, max(vtime, start)
            self._tags[id(p)] = (t, start, end)
            position[t] += 1
            order.append(p)
        return order

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
        """The path and requests of the next batch (oldest first within each choice; with several tenants,
        fair order, and a one-task batch only from the requests fair order would run next)."""
        ordered = self.fair_order()
        window = ordered if ordered is self.queue else self._fill(ordered)
        by_task: dict[tuple[str, int], list[Pending]] = {}
        for p in window:
            by_task.setdefault(p.entry.key, []).append(p)
        if self.grouped_path is not None:
            return self.grouped_path, self._fill(by_task[window[0].entry.key])
        policy = self.config.path_policy
        if policy == "merged":
            return self.one_task_path, self._fill(by_task[window[0].entry.key])
        if policy == "auto":
            if ordered is self.queue:  # one tenant: the task with the most images waiting may go alone
                _, group = max(by_task.items(), key=lambda kv: sum(p.n for p in kv[1]))
            else:  # several: only the task fair order runs next may (else a busy tenant's merged batches
                group = by_task[window[0].entry.key]  # would keep jumping another tenant's request)
            n = sum(p.n for p in group)
            if self._merged_wins(group[0].entry, n, alone=len(by_task) == 1):
                return self.one_task_path, self._fill(group)
        items = self._fill(ordered)
        return "mixed", items

    def _merged_wins(self, entry: TaskEntry, images: int, alone: bool) -> bool:
        """Whether ``images`` of one task (``alone``: nothing else waits in the window) run merged. Only
        when the batch stays as large as the mixed one would be: measured on ssf_demo_vit with 1,000
        Zipf(1.0) tasks under overload, one-task batches of 8-13 images taken from a queue of hundreds
        (a cached copy, or a build that paid off) ran at 3.7 ms an image against 2.9 ms for full mixed
        batches, and their merges took the model thread besides: 0.91x the throughput of mixing them."""
        cfg = self.config
        if images >= cfg.max_batch_size:
            return True
        if not alone:
            return False
        if self.merged_cached(entry):
            return True
        return images >= cfg.merged_min_batch and self.costs.merge_pays_off(
            images, cfg.merge_amortize_batches, self.one_task_path
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
            self.metrics.tenant_queue_wait_seconds.labels(p.lane.tenant).observe(now - p.enqueued)
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
