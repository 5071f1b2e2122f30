"""The embedded registry for one machine: a directory, atomic writes, immutable versions.

Layout (every path is generated here; a client's name is only used after it matched TASK_NAME):

    <root>/tasks/<name>/v<N>.safetensors   the delta bytes of version N (never rewritten)
    <root>/tasks/<name>/v<N>.json          its StoredTask record
    <root>/tasks/<name>/current            "N": the live version; written last, so a version is
                                           visible only once its bytes and record are on disk
    <root>/tasks/<name>/staged             "M": the staged version, if any (its commit point)
    <root>/seq/<name>                      the last version ever given, kept after a delete so a
                                           re-created task never reuses a number a replica has cached
    <root>/revs/<name>                     the revision of the current pointer (grows at every change of
                                           it, kept after a delete like seq)
    <root>/audit.jsonl                     the audit log, one JSON record a line, the newest
                                           ``audit_max_records`` kept

The kept versions of a task are the ``vN.json`` files in its directory: its current and staged versions
and the newest others, ``keep_versions`` in all (``base.keep_set``); every write prunes the rest.

Each write goes to a temporary file, is fsynced and then renamed into place. An fcntl lock file
serialises writers across processes sharing the directory; a thread lock does so within one.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.store.base import (
    Head,
    StoredTask,
    TaskExists,
    TaskHistory,
    TaskNotFound,
    VersionNotKept,
    from_record,
    keep_set,
    merge_info,
    validate_name,
)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # noqa: PTH105  (tests inject faults here)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the file's fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    def __init__(self, root: str | Path, keep_versions: int = 5, audit_max_records: int = 10_000) -> None:
        if keep_versions < 2:
            raise ValueError("keep_versions must be at least 2 (the current version and the one before)")
        self.keep_versions, self.audit_max_records = keep_versions, audit_max_records
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"store {str(self.root)!r} exists and is not a directory")
        (self.root / "tasks").mkdir(parents=True, exist_ok=True)
        (self.root / "seq").mkdir(exist_ok=True)
        (self.root / "revs").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._lock_path = self.root / ".lock"

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock, open(self._lock_path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _dir(self, name: str) -> Path:
        return self.root / "tasks" / validate_name(name)

    @staticmethod
    def _int_file(path: Path) -> int | None:
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _current(self, name: str) -> int | None:
        return self._int_file(self._dir(name) / "current")  # validates the name first

    def _head(self, name: str) -> Head:
        directory = self._dir(name)
        current = self._int_file(directory / "current")
        staged = self._int_file(directory / "staged")
        if staged == current:  # a crash between a promotion's two writes: it is current, not staged
            staged = None
        revision = self._int_file(self.root / "revs" / name) or 0
        return Head(current, staged, revision)

    def _exists(self, head: Head) -> bool:
        return head.current is not None or head.staged is not None

    def _record(self, name: str, version: int, head: Head | None = None) -> StoredTask:
        try:
            raw = json.loads((self._dir(name) / f"v{int(version)}.json").read_text())
        except FileNotFoundError:
            raise VersionNotKept(name, version) from None
        if head is not None and head.current == version:
            return from_record(raw, head.revision, head.staged)
        return from_record(raw)

    def _kept(self, directory: Path) -> list[int]:
        out = []
        for path in directory.glob("v*.json"):
            stem = path.name[1:-5]
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out, reverse=True)

    def put(
        self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False, stage: bool = False
    ) -> StoredTask:
        directory = self._dir(name)
        with self._exclusive():
            head = self._head(name)
            if self._exists(head) and not replace and not stage:
                raise TaskExists(name)
            seq_path = self.root / "seq" / name
            last = self._int_file(seq_path) or 0
            version = max(last, head.current or 0, head.staged or 0) + 1
            stored = StoredTask(
                name=name,
                version=version,
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                info=dict(info),
            )
            directory.mkdir(exist_ok=True)
            files = [directory / f"v{version}.safetensors", directory / f"v{version}.json"]
            try:
                _atomic_write(files[0], data)
                _atomic_write(files[1], json.dumps(stored.record()).encode())
                _atomic_write(seq_path, str(version).encode())  # before the commit: numbers never reused
                if stage:
                    _atomic_write(directory / "staged", str(version).encode())  # the commit point
                    new_head = Head(head.current, version, head.revision)
                else:
                    new_head = Head(version, head.staged, head.revision + 1)
                    _atomic_write(self.root / "revs" / name, str(new_head.revision).encode())
                    _atomic_write(directory / "current", str(version).encode())  # the commit point
            except BaseException:
                for path in files:  # never committed: not even read(name, version) may see it
                    path.unlink(missing_ok=True)
                raise
            _fsync_dir(directory)
            _fsync_dir(seq_path.parent)
            self._prune(directory, new_head)
        if stage:
            return stored
        return from_record(stored.record(), new_head.revision, new_head.staged)

    def _prune(self, directory: Path, head: Head) -> None:
        """Remove every version ``keep_set`` does not keep (the previous current version is the newest of
        the others, so requests in flight on it finish). Also sweeps files a crashed writer left behind.
        Called under the lock."""
        keep = keep_set(self._kept(directory), head, self.keep_versions)
        for path in directory.glob("v*.*"):
            stem = path.name.split(".", 1)[0][1:]
            if stem.isdigit() and int(stem) not in keep:
                path.unlink(missing_ok=True)

    def get(self, name: str) -> StoredTask:
        head = self._head(name)
        if head.current is None:
            raise TaskNotFound(name)
        try:
            return self._record(name, head.current, head)
        except VersionNotKept:
            raise TaskNotFound(name) from None

    def get_version(self, name: str, version: int) -> StoredTask:
        head = self._head(name)
        if not self._exists(head):
            raise TaskNotFound(name)
        return self._record(name, version, head)

    def history(self, name: str) -> TaskHistory:
        head = self._head(name)
        if not self._exists(head):
            raise TaskNotFound(name)
        records = []
        for version in self._kept(self._dir(name)):
            with contextlib.suppress(VersionNotKept):  # pruned meanwhile
                records.append(self._record(name, version, head))
        return TaskHistory(name, head, records)

    def promote(self, name: str, version: int) -> StoredTask:
        directory = self._dir(name)
        with self._exclusive():
            head = self._head(name)
            if not self._exists(head):
                raise TaskNotFound(name)
            if not (directory / f"v{int(version)}.json").exists():
                raise VersionNotKept(name, version)
            new_head = Head(int(version), None if head.staged == version else head.staged, head.revision + 1)
            _atomic_write(self.root / "revs" / name, str(new_head.revision).encode())
            _atomic_write(directory / "current", str(int(version)).encode())  # the commit point
            if head.staged == version:
                (directory / "staged").unlink(missing_ok=True)
            _fsync_dir(directory)
            self._prune(directory, new_head)
            return self._record(name, version, new_head)

    def update_info(self, name: str, version: int, patch: dict[str, Any]) -> StoredTask:
        directory = self._dir(name)
        with self._exclusive():
            head = self._head(name)
            if not self._exists(head):
                raise TaskNotFound(name)
            old = self._record(name, version)
            new = StoredTask(
                old.name, old.version, old.sha256, old.size_bytes, old.created_at, merge_info(old.info, patch)
            )
            _atomic_write(directory / f"v{int(version)}.json", json.dumps(new.record()).encode())
            return self._record(name, version, head)

    def read(self, name: str, version: int) -> bytes:
        try:
            return (self._dir(name) / f"v{int(version)}.safetensors").read_bytes()
        except FileNotFoundError:
            raise TaskNotFound(name) from None

    def delete(self, name: str) -> None:
        directory = self._dir(name)
        with self._exclusive():
            if not self._exists(self._head(name)):
                raise TaskNotFound(name)
            (directory / "current").unlink(missing_ok=True)  # invisible first, then gone
            (directory / "staged").unlink(missing_ok=True)
            _fsync_dir(directory)
            shutil.rmtree(directory, ignore_errors=True)

    def heads(self) -> dict[str, Head]:
        out = {}
        for directory in sorted((self.root / "tasks").iterdir()):
            if directory.is_dir():
                head = self._head(directory.name)
                if self._exists(head):
                    out[directory.name] = head
        return out

    def versions(self) -> dict[str, int]:
        return {name: h.current for name, h in self.heads().items() if h.current is not None}

    def list(self) -> list[StoredTask]:
        out = []
        for name, head in self.heads().items():
            if head.current is not None:
                with contextlib.suppress(TaskNotFound):
                    out.append(self._record(name, head.current, head))
        return out

    # ------------------------------------------------------------------------------- audit log
    def append_audit(self, record: dict[str, Any]) -> None:
        """Append a line; past ``audit_max_records`` plus a tenth, rewrite the newest ones (bounded)."""
        path = self.root / "audit.jsonl"
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._exclusive():
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            count_path = self.root / ".audit-lines"
            count = (self._int_file(count_path) or 0) + 1
            if count > self.audit_max_records + max(1, self.audit_max_records // 10):
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                lines = lines[-self.audit_max_records :]
                _atomic_write(path, "".join(lines).encode())
                count = len(lines)
            _atomic_write(count_path, str(count).encode())

    def read_audit(self, task: str | None = None, limit: int = 100) -> builtins.list[dict[str, Any]]:
        path = self.root / "audit.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out: builtins.list[dict[str, Any]] = []
        for line in reversed(lines):
            if len(out) >= limit:
                break
            try:
                record = json.loads(line)
            except ValueError:  # a torn last line after a crash: skipped
                continue
            if task is None or record.get("task") == task:
                out.append(record)
        return out[::-1]

    def watch(self, callback: Callable[[str], None]) -> None:
        """One process per directory in practice; other writers are found by the engine's reconcile."""

    def close(self) -> None:
        pass
