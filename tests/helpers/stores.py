"""The smallest TaskStore, in memory: for engine tests that are about the engine, not the registry."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from service.store.base import StoredTask, TaskExists, TaskNotFound


class MemoryStore:
    """The smallest TaskStore: versions immutable, replace makes n+1 atomically."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, StoredTask] = {}
        self._bytes: dict[tuple[str, int], bytes] = {}
        self._callbacks: list[Callable[[str], None]] = []

    def put(self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False) -> StoredTask:
        with self._lock:
            current = self._tasks.get(name)
            if current is not None and not replace:
                raise TaskExists(name)
            version = 1 if current is None else current.version + 1
            stored = StoredTask(
                name=name,
                version=version,
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                info=dict(info),
            )
            self._tasks[name] = stored
            self._bytes[(name, version)] = data
            return stored

    def get(self, name: str) -> StoredTask:
        with self._lock:
            if name not in self._tasks:
                raise TaskNotFound(name)
            return self._tasks[name]

    def read(self, name: str, version: int) -> bytes:
        with self._lock:
            if (name, version) not in self._bytes:
                raise TaskNotFound(name)
            return self._bytes[(name, version)]

    def delete(self, name: str) -> None:
        with self._lock:
            if self._tasks.pop(name, None) is None:
                raise TaskNotFound(name)

    def list(self) -> list[StoredTask]:
        with self._lock:
            return [self._tasks[n] for n in sorted(self._tasks)]

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {n: t.version for n, t in self._tasks.items()}

    def watch(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        pass
