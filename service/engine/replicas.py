"""Replica following: other replicas' uploads, replaces and deletes reach this engine's residency.

The store's ``Reconciler`` (``service.store.sync``) is the one mechanism: it diffs ``store.versions()`` on
a timer, early when the store hints at a change, and again on reconnect, so a lost hint costs at most one
interval. Each change it reports is applied by ``Residency.follow`` on the event loop; a change that fails
to apply (the registry went away mid-load) raises back to the reconciler, which offers it again next pass.
"""

from __future__ import annotations

import asyncio

from service.engine.residency import Residency
from service.store.base import TaskStore
from service.store.sync import Reconciler


class ReplicaFollower:
    def __init__(self, store: TaskStore, residency: Residency, interval_s: float) -> None:
        self.residency = residency
        self.reconciler = Reconciler(store, self._on_change, interval_s=interval_s, on_staged=self._on_staged)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    async def start(self) -> None:
        """Load every stored task (a registry that is down is retried in the background), then follow."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.reconciler.start)

    async def reconcile(self) -> bool:
        """One pass now; False when the registry is unreachable (what is resident keeps serving)."""
        return await asyncio.to_thread(self.reconciler.reconcile)

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.to_thread(self.reconciler.stop)

    def _on_change(self, name: str, version: int | None) -> None:
        """On the reconciler's thread: apply the change on the loop and wait for it."""
        if self._stopping or self._loop is None:
            return  # the engine is going away: nothing is left to follow for
        future = asyncio.run_coroutine_threadsafe(self.residency.follow(name, version), self._loop)
        future.result()

    def _on_staged(self, name: str, version: int | None) -> None:
        """The same for a change of the task's staged version (made resident, or dropped)."""
        if self._stopping or self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self.residency.follow_staged(name, version), self._loop)
        future.result()
