"""The task registry interface: it moves delta bytes and versions, nothing else (no torch, no ssf).

Versions are immutable: ``put(..., replace=True)`` creates version n+1 atomically and never rewrites
version n's bytes. Validation of the bytes happens before ``put``, in the ssf core, through the engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
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


class VersionNotKept(TaskNotFound):
    """The task exists (or existed) but does not keep this version (never made, pruned or deleted)."""

    def __init__(self, name: str, version: int) -> None:
        StoreError.__init__(self, f"task {name!r} keeps no version {version}")
        self.name, self.version = name, version


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
    from the validated delta (num_classes, labels, method, site_scheme, backbone_fingerprint, metrics);
    only ``update_info`` changes it (an evaluation's results), never the bytes.

    ``revision`` and ``staged_version`` describe the task's pointers when the record was read as its
    current version (0 and None otherwise): ``revision`` grows by one at every change of the current
    version (upload, replace, promote, rollback) and is never reused, so replicas order what they
    publish by it; ``staged_version`` is the task's staged version then, if any."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    created_at: str
    info: dict[str, Any] = field(default_factory=dict)
    revision: int = field(default=0, compare=False)
    staged_version: int | None = field(default=None, compare=False)

    def record(self) -> dict[str, Any]:
        """The stored JSON of this version (without the pointer fields, which live with the task)."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "info": self.info,
        }


def from_record(raw: dict[str, Any], revision: int = 0, staged: int | None = None) -> StoredTask:
    fields = {k: raw[k] for k in ("name", "version", "sha256", "size_bytes", "created_at")}
    return StoredTask(**fields, info=dict(raw.get("info") or {}), revision=revision, staged_version=staged)


@dataclass(frozen=True)
class Head:
    """A task's pointers: its current version (None while only a staged version exists), its staged
    version, and the revision of the current pointer. What replicas reconcile against."""

    current: int | None
    staged: int | None = None
    revision: int = 0


@dataclass(frozen=True)
class TaskHistory:
    """Every kept version of a task, newest first, with its pointers."""

    name: str
    head: Head
    versions: list[StoredTask]


def keep_set(all_versions: Iterable[int], head: Head, keep: int) -> set[int]:
    """The versions a task keeps: its current and staged versions always, then the newest others until
    ``keep`` versions are kept (so never more than max(keep, 2))."""
    kept = {v for v in (head.current, head.staged) if v is not None}
    for v in sorted(set(all_versions), reverse=True):
        if len(kept) >= keep:
            break
        kept.add(v)
    return kept


def merge_info(info: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``info`` with ``patch``'s top-level keys replaced (``update_info``'s one rule)."""
    if not isinstance(patch, dict):
        raise TypeError("patch must be a dict")
    return {**info, **patch}


class TaskStore(Protocol):
    def put(
        self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False, stage: bool = False
    ) -> StoredTask:
        """Store a new version (1 for a new task). Raises TaskExists when it exists and not replace.
        With ``stage`` the new version becomes the task's staged version instead of its current one
        (no ``replace`` needed; a previously staged version stays in the history)."""
        ...

    def get(self, name: str) -> StoredTask:
        """The current version's record. Raises TaskNotFound."""
        ...

    def read(self, name: str, version: int) -> bytes:
        """The bytes of one version. Raises TaskNotFound when that version is gone."""
        ...

    def delete(self, name: str) -> None:
        """Remove the task (all versions, its history and staged version). Raises TaskNotFound."""
        ...

    def get_version(self, name: str, version: int) -> StoredTask:
        """One kept version's record (VersionNotKept when it is not kept; TaskNotFound for no task)."""
        ...

    def history(self, name: str) -> TaskHistory:
        """The task's kept versions, newest first, and its pointers. Raises TaskNotFound."""
        ...

    def promote(self, name: str, version: int) -> StoredTask:
        """Make a kept version current atomically (a rollback when it is older); it stops being staged.
        Returns it as current (with the new revision). TaskNotFound / VersionNotKept."""
        ...

    def update_info(self, name: str, version: int, patch: dict[str, Any]) -> StoredTask:
        """Replace top-level keys of one kept version's ``info`` (the bytes never change)."""
        ...

    def heads(self) -> dict[str, Head]:
        """{name: Head} of every task (staged-only tasks included) in one cheap call."""
        ...

    def append_audit(self, record: dict[str, Any]) -> None:
        """Append one audit record (JSON-able) to the bounded audit log."""
        ...

    def read_audit(self, task: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` audit records (of ``task``), oldest first."""
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
