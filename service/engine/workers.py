"""The engine's threads: one model thread (every forward, table write and merge runs there, so the backend
never races) and a small CPU pool (image decoding, delta validation, store calls). The event loop only
schedules.

Decoding goes through ``FairSlots``: at most one job per pool thread, handed out by tenant, the tenant served
longest ago first. Plain FIFO would let a tenant with many requests in decoding keep another tenant's one
request waiting behind all of them (the fair share in the scheduler comes after decoding). On Linux, a
tenant holding more than half of its queue share while others are active decodes on a thread of its own at a
lower CPU priority (``over_share_nice``): on a host where decoding shares the cores with the forward, the
tenant beyond its share no longer slows the others' decoding.

Decoding runs beside the forward, not between forwards. Holding it while a batch runs was tried on 2 cores
(ssf_demo_vit, 10 tasks, paired HTTP servers): a decode thread beside the forward takes a core from one of
its OpenMP threads, so held decoding made the forward 10-25% cheaper per image (5.3-5.8 against 6.5-7.6 ms),
but the held decodes then sat on the model's critical path (the next batch must wait for them, or it holds
only the few decoded meanwhile) and near capacity the server served less: 116-137 against 137-151 img/s at
the p99 target, and 1 of 5 paired windows at 155 img/s met it against 5 of 5.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger(__name__)


def own_threads(n: int) -> None:
    """The calling thread runs torch's intra-op work on ``n`` threads. ``get_num_threads`` first: torch sets a
    thread's count on its first parallel op from the last value set anywhere, which would undo this one."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def single_threaded(nice: int = 0) -> None:
    """A helper thread (decoding, validation) runs torch ops on itself alone, so the model thread's OpenMP
    team is the process's only one. With more OpenMP threads than cores, libgomp stops spinning between
    parallel regions and every op of a forward wakes its sleeping workers: measured on 2 cores, one more team
    of 2 (a decode thread's normalize is large enough to run in parallel) made ssf_demo_vit's forwards 1.2x
    slower and its mixed path 1.10x the bare one instead of 1.04x (bench/many_tasks.py)."""
    own_threads(1)
    if nice:
        lower_priority(nice)


def lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` (Linux: the nice value is per thread); a value the process may
    not set (below its own) logs once and leaves the thread as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.warning("over-share decoding runs at the normal CPU priority: nice %d refused (%s)", nice, e)


class FairSlots:
    """``slots`` jobs at a time; a waiting job gets a free slot by tenant, least recently served tenant
    first (arrival order within a tenant). Runs on the event loop only."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running = 0
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self.served: dict[str, int] = {}  # tenant -> the hand-out count when it last got a slot
        self.count = 0

    async def run(self, tenant: str, job: Callable[[], Awaitable[T]]) -> T:
        if self.running < self.slots and not self.waiting:
            self.running += 1
            self._mark(tenant)
        else:
            slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(tenant, deque()).append(slot)
            try:
                await slot  # resolved by _release: the slot is ours
            except asyncio.CancelledError:
                if slot.done() and not slot.cancelled():
                    self._release()  # handed to us as we were cancelled: pass it on
                raise
        try:
            return await job()
        finally:
            self._release()

    def _mark(self, tenant: str) -> None:
        self.count += 1
        self.served[tenant] = self.count
        if len(self.served) > 4 * (len(self.waiting) + self.slots) + 64:  # bounded by the tenants seen lately
            self.served = {t: n for t, n in self.served.items() if t in self.waiting or n > self.count - 64}

    def _release(self) -> None:
        while self.waiting:
            tenant = min(self.waiting, key=lambda t: self.served.get(t, 0))
            queue = self.waiting[tenant]
            slot = queue.popleft()
            if not queue:
                del self.waiting[tenant]
            if not slot.done():  # a waiter cancelled meanwhile is skipped
                self._mark(tenant)
                slot.set_result(None)
                return
        self.running -= 1


class Workers:
    def __init__(self, cpu_threads: int = 2, over_share_nice: int = 0) -> None:
        self.model = ThreadPoolExecutor(1, thread_name_prefix="ssf-model")
        self.cpu = ThreadPoolExecutor(cpu_threads, "ssf-cpu", initializer=single_threaded)
        self.decoding = FairSlots(cpu_threads)
        self.over_share: ThreadPoolExecutor | None = None  # Linux only: elsewhere nice is per process
        if over_share_nice and sys.platform == "linux":
            self.over_share = ThreadPoolExecutor(
                1, "ssf-over-share", initializer=single_threaded, initargs=(over_share_nice,)
            )
            self.over_share_decoding = FairSlots(1)

    async def on_model(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.model, fn, *args)

    async def on_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def decode(self, tenant: str, fn: Callable[..., T], *args: Any, over_share: bool = False) -> T:
        """``fn(*args)`` on the CPU pool, in fair order between tenants (``FairSlots``); for a tenant
        ``over_share``, on the lower-priority thread when there is one."""
        pool = self.over_share if over_share else None
        if pool is None:
            return await self.decoding.run(tenant, lambda: self.on_cpu(fn, *args))
        loop = asyncio.get_running_loop()
        return await self.over_share_decoding.run(tenant, lambda: loop.run_in_executor(pool, fn, *args))

    def later_on_model(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue work on the model thread without waiting; dropped once the engine has stopped."""
        try:
            self.model.submit(fn, *args)
        except RuntimeError:  # shut down: the memory goes with the engine
            pass

    def shutdown(self) -> None:
        self.model.shutdown(wait=False, cancel_futures=True)
        self.cpu.shutdown(wait=False)  # a late decode finishes, then meets a closed scheduler
        if self.over_share is not None:
            self.over_share.shutdown(wait=False)
