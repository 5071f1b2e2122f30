"""The engine's threads: one model thread (every forward, table write and merge runs there, so the backend
never races) and a small CPU pool (image decoding, delta validation, store calls). The event loop only
schedules.

Decoding goes through ``FairSlots``: at most one job per pool thread, handed out by tenant, the tenant served
longest ago first. Plain FIFO would let a tenant with many requests in decoding keep another tenant's one
request waiting behind all of them (the fair share in the scheduler comes after decoding).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


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
    def __init__(self, cpu_threads: int = 2) -> None:
        self.model = ThreadPoolExecutor(1, thread_name_prefix="ssf-model")
        self.cpu = ThreadPoolExecutor(cpu_threads, thread_name_prefix="ssf-cpu")
        self.decoding = FairSlots(cpu_threads)

    async def on_model(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.model, fn, *args)

    async def on_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def decode(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the CPU pool, in fair order between tenants (``FairSlots``)."""
        return await self.decoding.run(tenant, lambda: self.on_cpu(fn, *args))

    def later_on_model(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue work on the model thread without waiting; dropped once the engine has stopped."""
        try:
            self.model.submit(fn, *args)
        except RuntimeError:  # shut down: the memory goes with the engine
            pass

    def shutdown(self) -> None:
        self.model.shutdown(wait=False, cancel_futures=True)
        self.cpu.shutdown(wait=False)  # a late decode finishes, then meets a closed scheduler
