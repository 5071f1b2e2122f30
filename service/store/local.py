"""The embedded registry for one machine: a directory, atomic writes, immutable versions.

Layout (every path is generated here; a client's name is only used after it matched TASK_NAME):

    <root>/tasks/<name>/v<N>.safetensors   the delta bytes of version N (never rewritten)
    <root>/tasks/<name>/v<N>.json          its StoredTask record
    <root>/tasks/<name>/current            "N": the live version; written last, so a version is
                                           visible only once its bytes and record are on disk
    <root>/seq/<name>                      the last version ever given, kept after a delete so a
                                           re-created task never reuses a number a replica has cached

Each write goes to a temporary file, is fsynced and then renamed into place. An fcntl lock file
serialises writers across processes sharing the directory; a thread lock does so within one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.store.base import StoredTask, TaskExists, TaskNotFound, validate_name


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
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"store {str(self.root)!r} exists and is not a directory")
        (self.root / "tasks").mkdir(parents=True, exist_ok=True)
        (self.root / "seq").mkdir(exist_ok=True)
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

    def _current(self, name: str) -> int | None:
        path = self._dir(name) / "current"  # validates the name first (InvalidTaskName is a ValueError)
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _record(self, name: str, version: int) -> StoredTask:
        try:
            raw = json.loads((self._dir(name) / f"v{version}.json").read_text())
        except FileNotFoundError:
            raise TaskNotFound(name) from None
        return StoredTask(**raw)

    def put(self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False) -> StoredTask:
        directory = self._dir(name)
        with self._exclusive():
            current = self._current(name)
            if current is not None and not replace:
                raise TaskExists(name)
            seq_path = self.root / "seq" / name
            last = int(seq_path.read_text()) if seq_path.exists() else 0
            version = max(last, current or 0) + 1
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
                _atomic_write(files[1], json.dumps(asdict(stored)).encode())
                _atomic_write(seq_path, str(version).encode())  # before the commit: numbers never reused
                _atomic_write(directory / "current", str(version).encode())  # the commit point
            except BaseException:
                for path in files:  # never committed: not even read(name, version) may see it
                    path.unlink(missing_ok=True)
                raise
            _fsync_dir(directory)
            _fsync_dir(seq_path.parent)
            self._prune(directory, keep={version, current or version})
        return stored

    def _prune(self, directory: Path, keep: set[int]) -> None:
        """Remove every version but ``keep`` (the new one and the one that was current before it: requests
        in flight finish on it). Also sweeps files a crashed writer left behind. Called under the lock."""
        for path in directory.glob("v*.*"):
            stem = path.name.split(".", 1)[0][1:]
            if stem.isdigit() and int(stem) not in keep:
                path.unlink(missing_ok=True)

    def get(self, name: str) -> StoredTask:
        version = self._current(name)
        if version is None:
            raise TaskNotFound(name)
        return self._record(name, version)

    def read(self, name: str, version: int) -> bytes:
        try:
            return (self._dir(name) / f"v{int(version)}.safetensors").read_bytes()
        except FileNotFoundError:
            raise TaskNotFound(name) from None

    def delete(self, name: str) -> None:
        directory = self._dir(name)
        with self._exclusive():
            if self._current(name) is None:
                raise TaskNotFound(name)
            (directory / "current").unlink()  # invisible first, then gone
            _fsync_dir(directory)
            shutil.rmtree(directory, ignore_errors=True)

    def versions(self) -> dict[str, int]:
        out = {}
        for directory in sorted((self.root / "tasks").iterdir()):
            version = self._current(directory.name) if directory.is_dir() else None
            if version is not None:
                out[directory.name] = version
        return out

    def list(self) -> list[StoredTask]:
        out = []
        for name, version in self.versions().items():
            with contextlib.suppress(TaskNotFound):
                out.append(self._record(name, version))
        return out

    def watch(self, callback: Callable[[str], None]) -> None:
        """One process per directory in practice; other writers are found by the engine's reconcile."""

    def close(self) -> None:
        pass
