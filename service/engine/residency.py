"""Residency and version publishing: which (task, version) each name serves, and when a version's memory goes.

Residency is keyed by (task, version): a request holds the entry it resolved until it is answered, and a
replaced version's table row and merged copy are freed only when no request holds it. A task that is not
resident costs one store lookup (``resolve``); changes made by other replicas arrive through ``follow``.
Everything here runs on the event loop, except the backend calls it sends to the model thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import ssf
from service.engine.backend import Backend
from service.engine.metrics import EngineMetrics
from service.engine.protocol import DeltaTooLarge, InvalidDelta, check_delta_size
from service.engine.resident_lru import ResidentLRU
from service.engine.workers import Workers
from service.settings import EngineConfig
from service.store.base import StoredTask, TaskNotFound, TaskStore

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TaskEntry:
    """One resident (task, version). Requests hold it from lookup to answer, so a replace never tears."""

    stored: StoredTask
    delta: ssf.Delta
    row: int = 0  # row in the site tables; 0 (identity) for head-only deltas
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device, in the compute dtype
    inflight: int = 0
    retired: bool = False
    prebuilt: Any = None  # an ONNX session built before the version existed, adopted once it does

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def version(self) -> int:
        return self.stored.version

    @property
    def key(self) -> tuple[str, int]:
        return (self.stored.name, self.stored.version)

    @property
    def labels(self) -> list[str]:
        return self.delta.labels


def newer_or_same(a: StoredTask, b: StoredTask) -> bool:
    """Whether ``a`` was made current no earlier than ``b``: by the store's revision of the current pointer
    (a rollback makes an older version current at a newer revision), then by version."""
    return (a.revision, a.version) >= (b.revision, b.version)


class Residency:
    def __init__(
        self,
        store: TaskStore,
        backend: Backend,
        spec: ssf.BackboneSpec,
        config: EngineConfig,
        workers: Workers,
        metrics: EngineMetrics,
    ) -> None:
        self.store, self.backend, self.spec, self.config = store, backend, spec, config
        self.workers, self.metrics = workers, metrics
        self.entries: dict[str, TaskEntry] = {}
        self._retired: list[TaskEntry] = []
        self._bad: set[tuple[str, int]] = set()
        self._name_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # (lock, holders): dropped at 0
        # each task's staged version, resident but never answering live traffic (service/engine/lifecycle.py)
        self.staged: dict[str, TaskEntry] = {}
        self.lru = ResidentLRU(config.max_resident_tasks)  # bounded: the least recently used is evicted

    # ------------------------------------------------------------------------------- validation
    def validate(self, data: bytes) -> ssf.Delta:
        """The server's limits, then the delta format's own checks against this backbone (off the loop)."""
        check_delta_size(len(data), self.config.max_delta_bytes)
        try:
            delta = ssf.load_delta(data, self.spec)
        except ssf.DeltaError as e:
            if e.code == "delta_too_large":
                raise DeltaTooLarge(e.message) from e
            raise InvalidDelta(e.message, code=e.code) from e
        if delta.num_classes > self.config.max_labels:
            raise InvalidDelta(
                f"{delta.num_classes} labels; this server allows at most {self.config.max_labels}",
                code="too_many_labels",
            )
        return ssf.packed(delta, self.spec)  # kept while resident: a few objects a task, not a few a site

    # ------------------------------------------------------------------------------- publishing
    async def install(self, delta: ssf.Delta) -> TaskEntry:
        """Install a delta that has no version yet (an upload); on failure nothing of it stays."""
        # no version yet: ``stored`` is set by ``publish`` once the store has it
        entry = TaskEntry(stored=None, delta=delta)  # type: ignore[arg-type]
        try:
            await self.workers.on_model(self.backend.install, entry)
        except BaseException:
            await self.workers.on_model(self._release, [entry])
            raise
        return entry

    async def discard(self, entry: TaskEntry) -> None:
        """An installed entry that never got a version (the store refused it)."""
        await self.workers.on_model(self._release, [entry])

    def publish(self, entry: TaskEntry, stored: StoredTask) -> TaskEntry:
        """Make an installed entry the task's current version, unless a newer one got there first."""
        entry.stored = stored
        self.backend.adopt(entry)
        current = self.entries.get(stored.name)
        if current is not None and newer_or_same(current.stored, stored):
            self._retire(entry)  # a newer version won the race; this one never served
            return current
        self.entries[stored.name] = entry
        if current is not None:
            self._retire(current)
        for victim in self.lru.add(stored.name):  # over SSF_MAX_RESIDENT_TASKS: loaded again on demand
            self.drop(victim)
            self.metrics.cache_evictions.labels("rows").inc()
        self.metrics.tasks_resident.set(len(self.entries))
        return entry

    def drop(self, name: str) -> bool:
        """The task is gone from the store: stop serving it (requests holding it still finish)."""
        entry = self.entries.pop(name, None)
        self.lru.discard(name)
        if entry is not None:
            self._retire(entry)
        return entry is not None

    @contextmanager
    def hold(self, entry: TaskEntry) -> Iterator[TaskEntry]:
        """Keep ``entry``'s memory while a request uses it."""
        entry.inflight += 1
        try:
            yield entry
        finally:
            entry.inflight -= 1
            if entry.retired:
                self._collect()

    def _retire(self, entry: TaskEntry) -> None:
        entry.retired = True
        self._retired.append(entry)
        self.metrics.tasks_resident.set(len(self.entries))
        self._collect()

    def _collect(self) -> None:
        """Free the rows and cached copies of retired versions no request holds any more."""
        done = [e for e in self._retired if e.inflight == 0]
        if done:
            self._retired = [e for e in self._retired if e.inflight > 0]
            self.workers.later_on_model(self._release, done)

    def _release(self, entries: list[TaskEntry]) -> None:
        for entry in entries:
            self.backend.release(entry)

    # -------------------------------------------------------------------------------- resolving
    async def resolve(self, name: str) -> TaskEntry:
        """The entry that serves ``name`` now, loaded from the store on a miss (TaskNotFound -> 404)."""
        entry = await self._resolve_once(name)
        while entry.retired:  # replaced while it was being loaded: serve the version that won
            entry = await self._resolve_once(name)
        return entry

    async def _resolve_once(self, name: str) -> TaskEntry:
        entry = self.entries.get(name)
        if entry is not None:
            self.lru.touch(name)
            return entry
        lock, holders = self._name_locks.get(name, (asyncio.Lock(), 0))
        self._name_locks[name] = (lock, holders + 1)
        try:
            async with lock:  # concurrent first requests load the task once
                entry = self.entries.get(name)
                if entry is None:
                    stored = await self.workers.on_cpu(self.store.get, name)
                    entry = await self.load(stored)
                    if entry is None:
                        raise TaskNotFound(name)
                return entry
        finally:  # never keep a lock per name ever asked for (unknown names would grow it forever)
            lock, holders = self._name_locks[name]
            if holders == 1:
                del self._name_locks[name]
            else:
                self._name_locks[name] = (lock, holders - 1)

    async def load(self, stored: StoredTask) -> TaskEntry | None:
        """Validate a stored version and make it resident; a bad one is logged and skipped (None)."""
        if (stored.name, stored.version) in self._bad:
            return None
        try:
            data = await self.workers.on_cpu(self.store.read, stored.name, stored.version)
            delta = await self.workers.on_cpu(self.validate, data)
        except (InvalidDelta, DeltaTooLarge) as e:
            self._bad.add((stored.name, stored.version))
            log.error("stored task %s v%d is unusable, skipped: %s", stored.name, stored.version, e.message)
            return None
        except TaskNotFound:
            return None
        entry = await self.install(delta)
        return self.publish(entry, stored)

    # ------------------------------------------------------------------------- replica following
    async def follow(self, name: str, version: int | None) -> None:
        """Apply a change the store reports (``None``: the task was deleted), made here or by a replica.
        What is published is the store's current version when read, ordered by its revision, so a report
        that arrives late never brings back a version made current before the one served."""
        try:
            if version is None:
                raise TaskNotFound(name)
            stored: StoredTask = await self.workers.on_cpu(self.store.get, name)
        except TaskNotFound:
            if self.drop(name):
                self.metrics.reconciles.labels("deleted").inc()
            return
        current = self.entries.get(name)
        if current is not None and newer_or_same(current.stored, stored):
            return  # already serving it (or newer: our own upload or promotion raced the report)
        if current is not None and current.version == stored.version:
            current.stored = stored  # promoted away and back meanwhile: the same version, a newer revision
            return
        if await self.adopt_staged(stored):
            self.metrics.reconciles.labels("loaded").inc()
            return
        if current is None and self.lru.bounded:
            return  # not resident: its next request loads the newest version (no eviction for it now)
        if await self.load(stored) is not None:
            self.metrics.reconciles.labels("loaded").inc()

    # ------------------------------------------------------------------------------ staged versions
    def stage(self, entry: TaskEntry, stored: StoredTask) -> TaskEntry:
        """Make an installed entry the task's staged version (resident, never answering live traffic)."""
        entry.stored = stored
        self.backend.adopt(entry)
        old = self.staged.get(stored.name)
        if old is not None and old.version >= stored.version:
            self._retire(entry)  # a newer staged version got there first
            return old
        self.staged[stored.name] = entry
        if old is not None:
            self._retire(old)
        return entry

    def drop_staged(self, name: str) -> bool:
        entry = self.staged.pop(name, None)
        if entry is not None:
            self._retire(entry)
        return entry is not None

    async def adopt_staged(self, stored: StoredTask) -> bool:
        """``stored`` (just made current) is this replica's staged entry: it serves now, with no load."""
        entry = self.staged.get(stored.name)
        if entry is None or entry.version != stored.version or entry.retired:
            return False
        del self.staged[stored.name]
        entry.stored = stored
        return self.publish(entry, stored) is entry

    async def follow_staged(self, name: str, version: int | None) -> None:
        """Apply a change of the task's staged version the store reports (``None``: none any more)."""
        if version is None:
            self.drop_staged(name)
            return
        old = self.staged.get(name)
        current = self.entries.get(name)
        if (old is not None and old.version == version) or (
            current is not None and current.version == version
        ):
            return
        entry = await self.prepare(name, version)
        if entry is not None:
            self.stage(entry, entry.stored)

    async def prepare(self, name: str, version: int) -> TaskEntry | None:
        """Read, validate and install one kept version without publishing it (``entry.stored`` is its
        record); None when the store no longer keeps it or it is unusable. Raises StoreUnavailable."""
        if (name, version) in self._bad:
            return None
        try:
            stored: StoredTask = await self.workers.on_cpu(self.store.get_version, name, version)
            data = await self.workers.on_cpu(self.store.read, name, version)
            delta = await self.workers.on_cpu(self.validate, data)
        except (InvalidDelta, DeltaTooLarge) as e:
            self._bad.add((name, version))
            log.error("stored task %s v%d is unusable, skipped: %s", name, version, e.message)
            return None
        except TaskNotFound:
            return None
        entry = await self.install(delta)
        entry.stored = stored
        return entry
