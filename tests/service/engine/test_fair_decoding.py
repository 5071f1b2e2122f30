"""Decoding slots handed out by tenant (``service.engine.workers.FairSlots``): a tenant with many requests
in decoding does not keep another tenant's request behind all of them, one tenant alone keeps arrival
order, and a waiter cancelled at any point neither runs nor loses a slot; a tenant beyond its share decodes
at a lower CPU priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from service.engine.workers import FairSlots, Workers


async def _run_all(slots: FairSlots, jobs: list[tuple[str, str]]) -> list[str]:
    """Start every job (tenant, name) in order; each records its name when it runs, then yields."""
    ran: list[str] = []
    gate = asyncio.Event()

    async def job(name: str) -> None:
        ran.append(name)
        await gate.wait()
        gate.clear()

    async def one(tenant: str, name: str) -> None:
        await slots.run(tenant, lambda: job(name))

    tasks = [asyncio.create_task(one(t, n)) for t, n in jobs]
    await asyncio.sleep(0)
    while len(ran) < len(jobs):  # let one job finish at a time
        gate.set()
        await asyncio.sleep(0.001)
    gate.set()
    await asyncio.gather(*tasks)
    return ran


def test_a_newcomer_runs_before_a_busy_tenants_backlog() -> None:
    jobs = [("a", f"a{i}") for i in range(5)] + [("b", "b0")]
    ran = asyncio.run(_run_all(FairSlots(1), jobs))
    assert ran[:2] == ["a0", "b0"], ran  # FIFO would run b0 last
    assert [n for n in ran if n.startswith("a")] == ["a0", "a1", "a2", "a3", "a4"]


def test_one_tenant_keeps_arrival_order_and_every_slot() -> None:
    async def scenario() -> None:
        slots = FairSlots(2)
        running, peak = 0, 0
        order: list[int] = []

        async def job(i: int) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            order.append(i)
            await asyncio.sleep(0.002)
            running -= 1

        await asyncio.gather(*(slots.run("-", lambda i=i: job(i)) for i in range(6)))
        assert order == list(range(6)) and peak == 2 and slots.running == 0 and not slots.waiting

    asyncio.run(scenario())


def test_a_cancelled_waiter_never_runs_and_the_slot_is_passed_on() -> None:
    async def scenario() -> None:
        slots = FairSlots(1)
        release = asyncio.Event()
        ran: list[str] = []

        async def job(name: str) -> None:
            ran.append(name)
            if name == "first":
                await release.wait()

        async def queue_two(second: str, third: str) -> tuple[asyncio.Task[None], ...]:
            """ "first" holds the only slot; ``second`` (tenant b) and ``third`` (tenant c) wait for it."""
            release.clear()
            tasks = [asyncio.create_task(slots.run("a", lambda: job("first")))]
            await asyncio.sleep(0)
            tasks += [
                asyncio.create_task(slots.run(t, lambda n=n: job(n)))
                for t, n in (("b", second), ("c", third))
            ]
            await asyncio.sleep(0)
            return tuple(tasks)

        first, doomed, last = await queue_two("doomed", "last")
        doomed.cancel()
        release.set()
        await asyncio.gather(first, last)
        assert doomed.cancelled() and ran == ["first", "last"]
        # cancelled just as the slot was handed over: it passes the slot on instead of keeping it
        first, handed, after = await queue_two("handed", "after")
        release.set()
        await asyncio.sleep(0)  # first finishes: the slot goes to "handed", whose task has not resumed yet
        handed.cancel()
        await asyncio.gather(first, after)
        assert handed.cancelled() and ran[-1] == "after" and "handed" not in ran
        assert slots.running == 0 and not slots.waiting

    asyncio.run(scenario())


@pytest.mark.skipif(sys.platform != "linux", reason="the nice value is per thread on Linux only")
def test_over_share_decoding_runs_at_the_lower_priority_and_the_rest_at_the_normal_one() -> None:
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario() -> tuple[int, int, int]:
        workers = Workers(over_share_nice=7)
        try:
            return (
                await workers.decode("a", nice, over_share=True),
                await workers.decode("b", nice),
                await workers.decode("c", nice, over_share=False),
            )
        finally:
            workers.shutdown()

    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base > 7:
        pytest.skip(f"this process already runs at nice {base}")
    assert asyncio.run(scenario()) == (7, base, base)


def test_without_a_nice_value_over_share_decoding_uses_the_common_pool() -> None:
    async def scenario() -> str:
        workers = Workers(over_share_nice=0)
        try:
            return await workers.decode("a", lambda: threading.current_thread().name, over_share=True)
        finally:
            workers.shutdown()

    assert asyncio.run(scenario()).startswith("ssf-cpu")
