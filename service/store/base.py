"""The task registry interface: it moves delta bytes and versions, nothing else (no torch, no ssf).

Versions are immutable: ``put(..., replace=True)`` creates version n+1 atomically and never rewrites
version n's bytes. Validation of the bytes happens before ``put``, in the ssf core, through the engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class StoreError(Exception):
    """Base of registry errors."""


class TaskNotFound(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"task {name!r} does not exist")
        self.name = name


class TaskExists(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"task {name!r} already exists; use replace=true to upload a new version")
        self.name = name


class StoreUnavailable(StoreError):
    """The backing service (Redis) cannot be reached; callers answer 503, never lose data."""


class InvalidTaskName(StoreError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"invalid task name {name[:80]!r}: it must match {TASK_NAME.pattern}")
        self.name = name


def validate_name(name: str) -> str:
    """The one gate between a client's name and any key or path the store builds from it."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):  # fullmatch: "$" would allow "\n"
        raise InvalidTaskName(name if isinstance(name, str) else repr(name))
    return name


@dataclass(frozen=True)
class StoredTask:
    """One immutable version of a task. ``info`` is the JSON-able description the engine derived
    from the validated delta (num_classes, labels, method, site_scheme, backbone_fingerprint, metrics)."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    created_at: str
    info: dict[str, Any] = field(default_factory=dict)


class TaskStore(Protocol):
    def put(self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False) -> StoredTask:
        """Store a new version (1 for a new task). Raises TaskExists when it exists and not replace."""
        ...

    def get(self, name: str) -> StoredTask:
        """The current version's record. Raises TaskNotFound."""
        ...

    def read(self, name: str, version: int) -> bytes:
        """The bytes of one version. Raises TaskNotFound when that version is gone."""
        ...

    def delete(self, name: str) -> None:
        """Remove the task (all versions). Raises TaskNotFound."""
        ...

    def list(self) -> list[StoredTask]:
        """Current versions of all tasks, sorted by name."""
        ...

    def versions(self) -> dict[str, int]:
        """{name: current version} in one cheap call; what replicas reconcile against."""
        ...

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(name)`` on changes made elsewhere (a hint only; may be a no-op locally)."""
        ...

    def close(self) -> None: ...
