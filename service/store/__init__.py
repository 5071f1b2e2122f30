"""Task registries: a local directory (one machine) or Redis (replicas), chosen by ``open_store``."""

from __future__ import annotations

from urllib.parse import urlparse

from service.store.base import (
    Head,
    InvalidTaskName,
    StoredTask,
    StoreError,
    StoreUnavailable,
    TaskExists,
    TaskHistory,
    TaskNotFound,
    TaskStore,
    VersionNotKept,
    validate_name,
)
from service.store.local import LocalStore
from service.store.sync import Reconciler


def open_store(spec: str, keep_versions: int = 5, audit_max_records: int = 10_000) -> TaskStore:
    """``redis://HOST:PORT/DB`` -> RedisStore; anything else is a directory -> LocalStore. Each task keeps
    ``keep_versions`` versions; the audit log keeps ``audit_max_records`` records."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from service.store.redis_store import RedisStore

        parsed = urlparse(spec)
        if spec.startswith("redis") and not parsed.hostname:
            raise ValueError(f"store URL must look like redis://HOST:PORT/DB, got {parsed.scheme}://...")
        return RedisStore(spec, keep_versions=keep_versions, audit_max_records=audit_max_records)
    return LocalStore(spec, keep_versions=keep_versions, audit_max_records=audit_max_records)


__all__ = [
    "Head",
    "InvalidTaskName",
    "LocalStore",
    "Reconciler",
    "StoreError",
    "StoreUnavailable",
    "StoredTask",
    "TaskExists",
    "TaskNotFound",
    "TaskHistory",
    "TaskStore",
    "VersionNotKept",
    "open_store",
    "validate_name",
]
