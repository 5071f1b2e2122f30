"""Task registries: a local directory (one machine) or Redis (replicas), chosen by ``open_store``."""

from __future__ import annotations

from urllib.parse import urlparse

from service.store.base import (
    InvalidTaskName,
    StoredTask,
    StoreError,
    StoreUnavailable,
    TaskExists,
    TaskNotFound,
    TaskStore,
    validate_name,
)
from service.store.local import LocalStore
from service.store.sync import Reconciler


def open_store(spec: str) -> TaskStore:
    """``redis://HOST:PORT/DB`` -> RedisStore; anything else is a directory -> LocalStore."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from service.store.redis_store import RedisStore

        parsed = urlparse(spec)
        if spec.startswith("redis") and not parsed.hostname:
            raise ValueError(f"store URL must look like redis://HOST:PORT/DB, got {parsed.scheme}://...")
        return RedisStore(spec)
    return LocalStore(spec)


__all__ = [
    "InvalidTaskName",
    "LocalStore",
    "Reconciler",
    "StoreError",
    "StoreUnavailable",
    "StoredTask",
    "TaskExists",
    "TaskNotFound",
    "TaskStore",
    "open_store",
    "validate_name",
]
