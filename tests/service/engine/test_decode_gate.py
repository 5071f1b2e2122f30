"""Decoding between forwards (``SSF_DECODE_BETWEEN_FORWARDS``): on a CPU device whose forward takes every
core, no decode runs while a batch does; the decodes held by a batch join the next one instead of leaving it
the few decoded meanwhile; ``auto`` chooses it only where the forward's threads take every core."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine.backend import BatchRun
from service.engine.engine import Engine
from service.engine.metrics import EngineMetrics
from service.engine.residency import TaskEntry
from service.engine.scheduler import Pending, Scheduler
from service.engine.workers import FairSlots
from service.settings import EngineConfig
from service.store.base import StoredTask
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.images import images
from tests.helpers.models import FAMILY_VIT
from tests.helpers.real_engine import run, vit_engine


def test_a_paused_pool_lets_its_running_jobs_finish_and_starts_none_until_resumed() -> None:
    async def scenario() -> None:
        slots = FairSlots(2)
        started: list[str] = []
        release = {n: asyncio.Event() for n in ("a0", "a1", "b0", "a2")}

        async def job(name: str) -> None:
            started.append(name)
            await release[name].wait()

        tasks = [asyncio.create_task(slots.run(n[0], lambda n=n: job(n))) for n in ("a0", "a1")]
        await asyncio.sleep(0)
        pause = asyncio.create_task(slots.pause())
        tasks += [asyncio.create_task(slots.run(n[0], lambda n=n: job(n))) for n in ("a2", "b0")]
        await asyncio.sleep(0.01)
        assert not pause.done() and started == ["a0", "a1"]  # the running two hold the pause
        release["a0"].set()
        await asyncio.sleep(0.01)
        assert not pause.done() and started == ["a0", "a1"]  # a0's slot is not passed on while paused
        release["a1"].set()
        await asyncio.wait_for(pause, 1)  # both finished: the pause holds
        await asyncio.sleep(0.01)
        assert started == ["a0", "a1"] and slots.running == 0
        slots.resume()  # both slots at once, the tenant served longest ago first
        await asyncio.sleep(0.01)
        assert started == ["a0", "a1", "b0", "a2"] and slots.running == 2
        release["b0"].set()
        release["a2"].set()
        await asyncio.gather(*tasks)
        assert slots.running == 0 and not slots.waiting

    asyncio.run(scenario())


class _Gate:
    def __init__(self, on: bool) -> None:
        self.decode_between_forwards = on

    @contextlib.asynccontextmanager
    async def forward_alone(self) -> AsyncIterator[None]:
        yield


def _pending(entry: TaskEntry, enqueued: float) -> Pending:
    return Pending(entry, torch.zeros(1, 1), time.monotonic() + 60, future=None, enqueued=enqueued)  # type: ignore[arg-type]


@pytest.mark.parametrize("on", [True, False])
def test_the_batch_after_a_held_one_waits_for_the_requests_decoding_within_the_gap(on: bool) -> None:
    """One request waited through the last batch (older than the queue delay) and three are decoding
    (admitted, not queued): with decoding held during batches they were held too, so the batch waits for
    them, though no longer than ``max_queue_delay_ms`` after the last batch; without, it goes at once."""

    async def scenario() -> None:
        stored = StoredTask(name="a", version=1, sha256="", size_bytes=0, created_at="")
        entry = TaskEntry(stored=stored, delta=None)  # type: ignore[arg-type]
        s = Scheduler(
            EngineConfig(max_batch_size=8, max_queue_delay_ms=400),
            lambda path, items: BatchRun([]),
            None,  # type: ignore[arg-type]
            EngineMetrics(),
            lambda e: False,
            gate=_Gate(on),
        )
        s.queue, s.images_waiting = [_pending(entry, time.monotonic() - 1.0)], 1
        s.admit(3)  # three requests decoding
        s._gap_until = time.monotonic() + 0.4  # the last batch ended just now
        gather = asyncio.create_task(s._gather_company())
        await asyncio.sleep(0.05)
        assert gather.done() is not on
        for _ in range(3):  # their decodes finish
            s.submit(entry, torch.zeros(1, 1), time.monotonic() + 60, admitted=True)
        await asyncio.wait_for(gather, 0.2)  # nothing decoding any more, the oldest overdue: it goes
        assert s.images_waiting == 4

    asyncio.run(scenario())


def _instrument(engine: Engine, forward_s: float, decode_s: float) -> dict[str, Any]:
    """Record every forward's and decode's (start, end) and each batch's images; both made slow."""
    seen: dict[str, Any] = {"forwards": [], "decodes": [], "batches": [], "started": threading.Event()}
    lock = threading.Lock()
    runner, decode = engine.scheduler.runner, engine.preprocess.decode_all

    def forward(path: Any, items: list[Pending]) -> BatchRun:
        start = time.perf_counter()
        seen["started"].set()
        time.sleep(forward_s)
        out = runner(path, items)
        with lock:
            seen["forwards"].append((start, time.perf_counter()))
            seen["batches"].append(sum(p.n for p in items))
        return out

    def slow_decode(data: Any) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(decode_s)
        x = decode(data)
        with lock:
            seen["decodes"].append((start, time.perf_counter()))
        return x

    engine.scheduler.runner = forward
    engine.preprocess.decode_all = slow_decode  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("setting", ["on", "off"])
def test_no_decode_runs_beside_a_forward_and_the_held_ones_form_the_next_batch(
    weights_dir: Path, setting: str
) -> None:
    async def scenario(engine: Engine) -> None:
        await engine.add_task(delta_bytes(FAMILY_VIT, make_task(FAMILY_VIT, seed=7), "a"), None, False)
        assert engine.workers.decode_between_forwards is (setting == "on")
        seen = _instrument(engine, forward_s=0.15, decode_s=0.01)
        first = asyncio.create_task(engine.predict("a", images(1), 1))
        await asyncio.to_thread(seen["started"].wait, 5)  # the first batch runs: 6 requests arrive
        rest = [asyncio.create_task(engine.predict("a", images(1, seed=i), 1)) for i in range(6)]
        await asyncio.gather(first, *rest)
        beside = [(d, f) for d in seen["decodes"] for f in seen["forwards"] if d[0] < f[1] and f[0] < d[1]]
        if setting == "on":
            assert not beside, beside
            assert seen["batches"] == [1, 6]  # the six held decodes together, right after the first
        else:
            assert beside  # the same traffic decodes beside the forward when the gate is off

    run(vit_engine(weights_dir, decode_between_forwards=setting, max_queue_delay_ms=50), scenario)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.parametrize(
    ("setting", "threads", "expected"),
    [
        ("auto", "cores", True),  # the forward takes every core: decoding waits for it
        ("auto", "fewer", False),  # a core left to decoding: it runs there, beside the forward
        ("off", "cores", False),
        ("on", "fewer", True),
    ],
)
def test_auto_holds_decoding_only_when_the_forward_takes_every_core(
    weights_dir: Path, setting: str, threads: str, expected: bool
) -> None:
    cores = _cores()
    if threads == "fewer" and cores < 2:
        pytest.skip("one core: no thread count leaves a core free")
    count = cores if threads == "cores" else cores - 1

    async def scenario(engine: Engine) -> None:
        assert engine.workers.decode_between_forwards is expected

    run(vit_engine(weights_dir, decode_between_forwards=setting, torch_threads=count), scenario)
