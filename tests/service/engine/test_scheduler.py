"""Scheduling under pressure: deadlines, a full queue, path choice, the byte-bounded merged LRU, draining."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine.backend import BatchRun
from service.engine.engine import Engine
from service.engine.merged import ByteLRU
from service.engine.metrics import EngineMetrics
from service.engine.protocol import DeadlineExceeded, Overloaded, Unavailable
from service.engine.residency import TaskEntry
from service.engine.scheduler import Pending, Scheduler
from service.settings import EngineConfig
from service.store.base import StoredTask
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.images import images
from tests.helpers.models import FAMILY_VIT
from tests.helpers.real_engine import run, vit_engine


def sample(engine: Engine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def add(engine: Engine, *names: str) -> None:
    for i, name in enumerate(names):
        await engine.add_task(delta_bytes(FAMILY_VIT, make_task(FAMILY_VIT, seed=50 + i), name), None, False)


def block_model_thread(engine: Engine, seconds: float) -> None:
    engine.workers.model.submit(time.sleep, seconds)


def test_expired_requests_are_never_executed(weights_dir: Path) -> None:
    async def scenario(engine: Engine) -> None:
        await add(engine, "a")
        executed = sample(engine, "ssf_engine_images_total", path="mixed")
        block_model_thread(engine, 0.5)  # the batch is taken, but cannot run before its deadline
        with pytest.raises(DeadlineExceeded):
            await engine.predict("a", images(2), 3, timeout_s=0.2)
        with pytest.raises(DeadlineExceeded):  # already expired when scheduled
            await engine.predict("a", images(1), 3, timeout_s=0.0)
        await asyncio.sleep(0.4)
        assert sample(engine, "ssf_engine_images_total", path="mixed") == executed
        assert sample(engine, "ssf_engine_rejected_total", reason="deadline") == 2
        assert (await engine.predict("a", images(1), 3)).version == 1  # and the engine still serves

    run(vit_engine(weights_dir, path_policy="mixed"), scenario)


def test_full_queue_answers_overloaded_at_once(weights_dir: Path) -> None:
    async def scenario(engine: Engine) -> None:
        await add(engine, "a")
        block_model_thread(engine, 1.0)
        first = asyncio.create_task(engine.predict("a", images(2), 1))  # taken into the blocked batch
        await asyncio.sleep(0.2)
        queued = [asyncio.create_task(engine.predict("a", images(2), 1)) for _ in range(2)]
        await asyncio.sleep(0.2)  # now 4 images wait: the limit
        started = time.monotonic()
        with pytest.raises(Overloaded) as e:
            await engine.predict("a", images(1), 1)
        assert time.monotonic() - started < 0.5 and e.value.retry_after_s > 0
        assert sample(engine, "ssf_engine_rejected_total", reason="queue_full") == 1
        assert all(r.version == 1 for r in await asyncio.gather(first, *queued))

    run(
        vit_engine(
            weights_dir, path_policy="mixed", max_queue_size=4, max_batch_size=2, max_images_per_request=2
        ),
        scenario,
    )


def test_auto_policy_merges_a_full_batch_and_mixes_the_long_tail(weights_dir: Path) -> None:
    async def scenario(engine: Engine) -> None:
        await add(engine, "hot", "cold1", "cold2")
        await engine.predict("hot", images(4), 1)  # one task fills a batch: merged copy
        assert sample(engine, "ssf_engine_batches_total", path="merged") == 1
        assert sample(engine, "ssf_engine_cache_misses_total", cache="merged") == 1
        await asyncio.gather(*(engine.predict(n, images(1), 1) for n in ("cold1", "cold2", "hot")))
        assert sample(engine, "ssf_engine_batches_total", path="mixed") >= 1
        await engine.predict("hot", images(4), 1)
        assert sample(engine, "ssf_engine_cache_hits_total", cache="merged") >= 1
        assert sample(engine, "ssf_engine_merge_seconds_count", kind="torch") == 1
        assert sample(engine, "ssf_engine_queue_depth") == 0
        assert sample(engine, "ssf_engine_queue_wait_seconds_count") >= 5

    run(vit_engine(weights_dir, max_batch_size=4, merged_min_batch=2, max_queue_delay_ms=50), scenario)


def test_merged_copies_are_evicted_by_bytes(weights_dir: Path) -> None:
    async def scenario(engine: Engine) -> None:
        await add(engine, "a", "b", "c")
        await engine.predict("a", images(1), 1)
        one_copy = engine.backend.cache.bytes
        base = sum(t.nbytes for t in engine.backend.base.values())
        assert 0 < one_copy < base  # a copy owns only what folding replaced
        engine.backend.cache.max_bytes = int(1.5 * one_copy)
        await engine.predict("b", images(1), 1)
        assert engine.backend.cache.keys() == [("b", 1)]
        await engine.predict("c", images(1), 1)
        assert engine.backend.cache.keys() == [("c", 1)]
        assert engine.backend.cache.bytes <= engine.backend.cache.max_bytes
        assert sample(engine, "ssf_engine_cache_evictions_total", cache="merged") == 2

    run(vit_engine(weights_dir, path_policy="merged"), scenario)


def test_byte_lru_order_and_one_build_per_key() -> None:
    cache: ByteLRU[str] = ByteLRU("t", 100, EngineMetrics())
    builds: list[str] = []

    def build(v: str, n: int):  # type: ignore[no-untyped-def]
        return lambda: (builds.append(v) or v, n)

    assert cache.get_or_build(("a", 1), build("a", 40)) == ("a", True)
    assert cache.get_or_build(("b", 1), build("b", 40)) == ("b", True)
    assert cache.get_or_build(("a", 1), build("a", 40)) == ("a", False)  # a is now the most recent
    cache.get_or_build(("c", 1), build("c", 40))  # 120 > 100: the least recent (b) goes
    assert cache.keys() == [("a", 1), ("c", 1)] and cache.bytes == 80
    cache.get_or_build(("huge", 1), build("huge", 500))  # larger than the cache: never kept
    assert ("huge", 1) not in cache and builds == ["a", "b", "c", "huge"]


def test_stop_drains_and_then_refuses(weights_dir: Path) -> None:
    async def scenario() -> None:
        engine = vit_engine(weights_dir, path_policy="mixed", max_queue_delay_ms=100)
        with pytest.raises(Unavailable):
            await engine.predict("a", images(1), 1)  # not started: not ready
        await engine.start()
        await add(engine, "a")
        pending = [asyncio.create_task(engine.predict("a", images(1), 1)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await engine.stop()
        assert all(r.version == 1 for r in await asyncio.gather(*pending))
        with pytest.raises(Unavailable):
            await engine.predict("a", images(1), 1)

    asyncio.run(scenario())


def _pending(name: str, n: int) -> Pending:
    stored = StoredTask(name=name, version=1, sha256="", size_bytes=0, created_at="")
    entry = TaskEntry(stored=stored, delta=None)  # type: ignore[arg-type]  (choose() reads names only)
    return Pending(entry, torch.zeros(n, 1), time.monotonic() + 60, future=None)  # type: ignore[arg-type]


def _scheduler(cached: set[str] | None = None, **config: Any) -> Scheduler:
    cfg = EngineConfig(**{"max_batch_size": 8, "merged_min_batch": 4, **config})
    cached = cached or set()
    return Scheduler(
        cfg,
        lambda path, items: BatchRun([]),
        None,
        EngineMetrics(),
        lambda e: e.name in cached,  # type: ignore[arg-type]
    )


def test_choose_mixes_the_long_tail_in_arrival_order() -> None:
    s = _scheduler()
    s.queue = [_pending("a", 1), _pending("b", 2), _pending("c", 1), _pending("a", 1)]
    path, items = s.choose()
    assert path == "mixed" and [p.entry.name for p in items] == ["a", "b", "c", "a"]


def test_choose_builds_a_copy_for_a_lone_task_when_the_merge_pays_off() -> None:
    s = _scheduler()
    s.queue = [_pending("a", 1) for _ in range(3)]
    assert s.choose()[0] == "mixed"  # alone, but fewer than merged_min_batch images: not worth a build
    s.queue = [_pending("a", 1) for _ in range(5)]
    path, items = s.choose()  # nothing measured yet: try the merge and measure it
    assert path == "merged" and {p.entry.name for p in items} == {"a"} and len(items) == 5
    s.costs.observe("mixed", 1.0, 100)  # 10 ms an image mixed
    s.costs.observe("merged", 0.99, 100)  # 9.9 ms merged: 0.1 ms saved an image
    s.costs.observe_merge(5.0)  # a 5 s merge never pays for itself here
    assert s.choose()[0] == "mixed"
    s.costs.merge_s = 0.001  # a 1 ms merge does (5 images x 0.1 ms x 4 batches it will serve)
    assert s.choose()[0] == "merged"


def test_choose_never_shrinks_a_batch_to_run_one_task_merged() -> None:
    s = _scheduler(cached={"a"})
    s.costs.observe("mixed", 1.0, 100)
    s.costs.observe("merged", 0.5, 100)  # merged at half the mixed cost, and a's copy is warm
    s.queue = [_pending("b", 1), *[_pending("a", 1) for _ in range(5)], _pending("c", 2)]
    path, items = s.choose()  # a's 5 images beside 3 others: one mixed forward of 8, not 5 then 3
    assert path == "mixed" and len(items) == 7
    s.queue = [_pending("b", 1), *[_pending("a", 1) for _ in range(9)]]
    path, items = s.choose()  # a fills a batch on its own: merged, and b waits for the next
    assert path == "merged" and {p.entry.name for p in items} == {"a"} and len(items) == 8


def test_choose_uses_a_cached_copy_and_always_merges_a_full_batch() -> None:
    s = _scheduler(cached={"a"}, merge_amortize_batches=0.0)  # building never pays off
    s.queue = [_pending("a", 2)]
    assert s.choose()[0] == "merged"  # one task in the queue and its copy is warm
    s.queue = [_pending("b", 8), _pending("c", 1)]
    path, items = s.choose()  # b fills a batch on its own: merged even though it must be built
    assert path == "merged" and [p.entry.name for p in items] == ["b"]


def test_fill_never_splits_a_request_and_runs_an_oversized_one_alone() -> None:
    s = _scheduler(path_policy="mixed")
    s.queue = [_pending("a", 6), _pending("b", 3), _pending("c", 2)]
    assert [p.entry.name for p in s.choose()[1]] == ["a"]  # b would overflow 8; c must not overtake it
    s.queue = [_pending("big", 20), _pending("a", 1)]
    assert [p.entry.name for p in s.choose()[1]] == ["big"]


def test_requests_caught_mid_decode_by_stop_are_answered_not_hung(weights_dir: Path) -> None:
    async def scenario() -> None:
        engine = vit_engine(weights_dir, path_policy="mixed")
        await engine.start()
        await add(engine, "a")
        calls = [asyncio.create_task(engine.predict("a", images(4), 1)) for _ in range(4)]
        await asyncio.sleep(0)  # admitted, now decoding on the CPU pool
        await engine.stop(drain_timeout_s=5)
        done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        for outcome in done:
            assert not isinstance(outcome, BaseException) or isinstance(outcome, Unavailable), outcome

    asyncio.run(scenario())


def test_admission_is_checked_once_and_held_until_submitted_or_withdrawn() -> None:
    s = _scheduler(max_queue_size=4, max_images_per_request=4)
    s.admit(3)  # a request decoding: nothing queued yet, but its room is taken
    with pytest.raises(Overloaded):
        s.admit(2)
    s.withdraw(3)  # it failed before it was queued: the room comes back
    s.admit(4)
    entry = _pending("a", 4).entry

    async def queue() -> None:
        s.submit(entry, torch.zeros(4, 1), time.monotonic() + 60, admitted=True)  # no second check

    asyncio.run(queue())
    assert (s.images_admitted, s.images_waiting) == (0, 4)
    with pytest.raises(Overloaded):
        s.admit(1)
