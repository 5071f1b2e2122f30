"""The scheduler's fair share, without HTTP: weighted fair queuing order, priority classes within a tenant,
per-tenant queue shares while several tenants are active, and nothing changed for one tenant alone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service.engine.backend import BatchRun
from service.engine.metrics import EngineMetrics
from service.engine.protocol import Overloaded
from service.engine.residency import TaskEntry
from service.engine.scheduler import BURST_BATCHES, LANE, Lane, Pending, Scheduler
from service.settings import EngineConfig
from service.store.base import StoredTask


def _pending(task: str, n: int, lane: Lane, at: float) -> Pending:
    stored = StoredTask(name=task, version=1, sha256="", size_bytes=0, created_at="")
    entry = TaskEntry(stored=stored, delta=None)  # type: ignore[arg-type]
    return Pending(entry, torch.zeros(n, 1), time.monotonic() + 60, future=None, enqueued=at, lane=lane)  # type: ignore[arg-type]


def _scheduler(**config: object) -> Scheduler:
    cfg = EngineConfig(**{"max_batch_size": 4, "path_policy": "mixed", **config})  # type: ignore[arg-type]
    return Scheduler(cfg, lambda path, items: BatchRun([]), None, EngineMetrics(), lambda e: False)  # type: ignore[arg-type]


def test_weighted_order_serves_each_tenant_its_weight() -> None:
    heavy, light = Lane("a", weight=2.0), Lane("b", weight=1.0)
    s = _scheduler()
    # a arrived first with 12 requests; b with 6 right after: a must not keep b waiting behind all of it
    s.queue = [_pending("a.t", 1, heavy, i) for i in range(12)] + [
        _pending("b.t", 1, light, 100 + i) for i in range(6)
    ]
    order = [p.lane.tenant for p in s.fair_order()]
    first_nine = order[:9]
    assert first_nine.count("a") == 6 and first_nine.count("b") == 3, order  # 2:1 by weight
    assert order.index("b") <= 2


def test_a_tenant_that_fills_the_queue_does_not_starve_a_newcomer() -> None:
    s = _scheduler()
    a, b = Lane("a"), Lane("b")
    s.queue = [_pending("a.t", 1, a, i) for i in range(20)] + [_pending("b.t", 1, b, 100)]
    path, items = s.choose()
    assert path == "mixed" and "b" in {p.lane.tenant for p in items}  # in the very next batch


def test_batch_class_runs_after_interactive_within_a_tenant_only() -> None:
    s = _scheduler()
    batch, interactive, other = Lane("a", batch=True), Lane("a"), Lane("b")
    s.queue = [_pending("a.t", 1, batch, 0), _pending("a.t", 1, batch, 1), _pending("a.t", 1, interactive, 2)]
    assert [p.lane.batch for p in s.fair_order()] == [False, True, True]
    s.queue.append(_pending("b.t", 1, other, 3))
    order = [(p.lane.tenant, p.lane.batch) for p in s.fair_order()]
    assert order[0] == ("a", False) and order.index(("b", False)) == 1  # b is not behind a's batch work


def test_one_tenant_alone_keeps_arrival_order_and_the_whole_queue() -> None:
    s = _scheduler(max_queue_size=8, max_images_per_request=4)
    s.queue = [_pending(t, 1, Lane("a"), i) for i, t in enumerate(["a.x", "a.y", "a.x"])]
    assert s.fair_order() is s.queue
    token = LANE.set(Lane("solo"))
    try:
        s.admit(8)  # alone: the whole queue
        with pytest.raises(Overloaded):
            s.admit(1)
    finally:
        LANE.reset(token)


def _admit(s: Scheduler, lane: Lane, n: int) -> bool:
    """``s.admit(n)`` for a request of ``lane`` (read from the context, where the HTTP layer sets it)."""
    token = LANE.set(lane)
    try:
        return s.admit(n)
    finally:
        LANE.reset(token)


def test_each_active_tenant_may_hold_only_its_weighted_share() -> None:
    s = _scheduler(max_queue_size=30, max_images_per_request=2)

    def admit(lane: Lane, n: int) -> None:
        _admit(s, lane, n)

    a, b = Lane("a", weight=2.0), Lane("b", weight=1.0)
    admit(b, 1)  # b is active
    for _ in range(10):
        admit(a, 2)  # a's share: 30 * 2/3 = 20 images
    with pytest.raises(Overloaded, match="tenant 'a'"):
        admit(a, 2)
    for _ in range(4):
        admit(b, 2)  # b still has room: 1 + 8 of its 10
    assert s.held == {"a": 20, "b": 9}
    token = LANE.set(a)
    try:
        with pytest.raises(Overloaded):
            s.precheck()  # refused before the body is read
        s.withdraw(2)
        s.precheck()
    finally:
        LANE.reset(token)


def test_a_tenant_is_over_its_share_beyond_half_of_it_and_only_beside_others() -> None:
    s = _scheduler(max_queue_size=32, max_images_per_request=4)
    a, b = Lane("a"), Lane("b")
    assert [_admit(s, a, 4) for _ in range(3)] == [False] * 3  # alone: never over a share
    assert _admit(s, b, 4) is False  # b arrives: shares of 16 images each
    assert _admit(s, a, 4) is True  # a holds 16 > 8
    assert _admit(s, b, 4) is False  # b holds 8, half of its share
    assert _admit(s, b, 4) is True  # 12


def test_tags_are_committed_for_what_runs() -> None:
    async def scenario() -> None:
        s = _scheduler()
        a, b = Lane("a"), Lane("b")
        for lane, task in ((a, "a.t"), (b, "b.t")):
            token = LANE.set(lane)
            try:
                for _ in range(4):
                    s.submit(_pending(task, 1, lane, 0).entry, torch.zeros(1, 1), time.monotonic() + 60)
            finally:
                LANE.reset(token)
        _, items = s.choose()
        s._take(items)
        assert sorted(p.lane.tenant for p in items) == ["a", "a", "b", "b"]
        assert s.held == {"a": 2, "b": 2}
        _, items = s.choose()
        assert sorted(p.lane.tenant for p in items) == ["a", "a", "b", "b"]

    asyncio.run(scenario())


def test_a_merged_batch_never_jumps_the_fair_order() -> None:
    """With the ``auto`` policy a busy tenant's one task is a merged-batch candidate every time (a cached
    copy, a full window of its images); choosing it must not keep another tenant's request waiting: b runs
    within two batches, however long a's queue."""
    cfg = EngineConfig(max_batch_size=4, path_policy="auto", merged_min_batch=2)
    s = Scheduler(cfg, lambda path, items: BatchRun([]), None, EngineMetrics(), lambda e: True)  # type: ignore[arg-type]
    a, b = Lane("a"), Lane("b")
    s.queue = [_pending("a.t", 1, a, i) for i in range(40)] + [_pending("b.t", 1, b, 100)]
    served = []
    for _ in range(2):
        path, items = s.choose()
        s._take(items)
        served.append((path, sorted({p.lane.tenant for p in items})))
    assert any("b" in tenants for _, tenants in served), served


def test_virtual_time_advances_while_one_tenant_is_served_alone() -> None:
    """B, idle while A's requests ran alone (arrival order, the one-tenant fast path), comes back ahead of
    A's queued requests: A's batches alone still advance the virtual clock, so B's old finish tag does not
    tie with A's next start (a tie went to A, the earlier arrival: B waited one batch of A more, every
    time; measured in bench/fairness.py as B's queue wait p50 40 ms at 20 ms batches)."""
    s = _scheduler(max_batch_size=8)
    a, b = Lane("a"), Lane("b")
    s.queue = [_pending("a.t", 8, a, 0), _pending("b.t", 8, b, 1), _pending("a.t", 8, a, 2)]
    for tenant in "ab":  # fair order: a, then b ahead of a's second request
        _, items = s.choose()
        assert [p.lane.tenant for p in items] == [tenant]
        s._take(items)
    for i in range(5):  # b idle: a alone, in arrival order
        s.queue = [_pending("a.t", 8, a, 10 + i), _pending("a.t", 8, a, 20 + i)]
        _, items = s.choose()
        assert s.fair_order() is s.queue
        s._take(items)
    s.queue += [_pending("b.t", 8, b, 100)]  # b returns behind a's queued request
    _, items = s.choose()
    assert [p.lane.tenant for p in items] == ["b"]


def _serve(s: Scheduler, batches: int) -> list[str]:
    """Take ``batches`` batches off the queue; the tenant of each (one request a batch here)."""
    served = []
    for _ in range(batches):
        _, items = s.choose()
        s._take(items)
        served.append(items[0].lane.tenant)
    return served


def test_a_light_tenants_burst_runs_back_to_back_within_its_credit() -> None:
    """B, served lately and below its share, sends a burst while A is backlogged: B's requests run one
    after another (up to the credit) instead of alternating with A's, which stretched B's burst over A's
    batches (bench/fairness.py: B waited 2-5 of A's batches at 16 requests/s, p99 2.5x its p99 alone)."""
    s = _scheduler(max_batch_size=8)
    a, b = Lane("a"), Lane("b")
    s.queue = [_pending("a.t", 8, a, i) for i in range(40)] + [_pending("b.t", 8, b, 100)]
    assert _serve(s, 2) == ["a", "b"]
    assert set(_serve(s, 10)) == {"a"}  # B idle: A alone moves the clock on
    s.queue += [_pending("b.t", 8, b, 200 + i) for i in range(6)]
    served = _serve(s, 8)
    assert served[: BURST_BATCHES + 1] == ["b"] * (BURST_BATCHES + 1), served
    assert served[BURST_BATCHES + 1 :] == ["a", "b", "a"], served  # credit spent: alternating again


def test_a_newcomer_gets_no_credit() -> None:
    """A tenant not served in the last ACTIVE_S seconds starts at the clock: its first request runs next,
    its second alternates with the busy tenant's."""
    s = _scheduler(max_batch_size=8)
    a, b = Lane("a"), Lane("b")
    s.queue = [_pending("a.t", 8, a, i) for i in range(20)]
    assert set(_serve(s, 5)) == {"a"}
    s.queue += [_pending("b.t", 8, b, 100 + i) for i in range(3)]
    assert _serve(s, 4) == ["b", "a", "b", "a"]


def test_no_tenant_gets_more_than_its_share_and_the_credit() -> None:
    """Both backlogged, equal weights: over any run of batches B is ahead of A by at most the credit."""
    s = _scheduler(max_batch_size=8)
    a, b = Lane("a"), Lane("b")
    s.queue = [_pending("a.t", 8, a, i) for i in range(30)] + [_pending("b.t", 8, b, 100)]
    _serve(s, 2)
    assert set(_serve(s, 8)) == {"a"}
    s.queue += [_pending("b.t", 8, b, 200 + i) for i in range(30)]
    served = _serve(s, 40)
    for end in range(1, len(served) + 1):
        window = served[:end]
        assert window.count("b") - window.count("a") <= BURST_BATCHES + 1, served
    assert abs(served[10:].count("b") - served[10:].count("a")) <= 1, served  # then half each
