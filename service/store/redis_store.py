"""The registry shared by replicas: Redis (AOF on in the shipped config).

Keys (names are validated before they become part of any key):

    ssf:index                 hash name -> current version (what ``versions()`` reads: one round trip)
    ssf:staged                hash name -> staged version
    ssf:revs                  hash name -> revision of the current pointer (survives delete, like seq)
    ssf:kept:<name>           sorted set of the kept versions (score = version)
    ssf:task:<name>:<N>       the StoredTask record of version N (JSON)
    ssf:blob:<name>:<N>       the delta bytes of version N
    ssf:seq:<name>            the last version ever given (survives delete: numbers are never reused)
    ssf:changes               pub/sub channel: the changed task's name (a hint only)
    ssf:audit                 stream of audit records (XADD MAXLEN audit_max_records: exact, writes are rare)

A put (or promote) is WATCH on the task's pointers + MULTI/EXEC, so two replicas replacing one task
concurrently get n+1 and n+2, never a lost update; the same transaction prunes the versions
``base.keep_set`` does not keep. Pub/sub can drop messages silently (a killed subscriber connection
loses what was published meanwhile), so correctness never depends on it: replicas reconcile on a timer
(``service.store.sync.Reconciler``).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis

from service.store.base import (
    Head,
    StoredTask,
    StoreUnavailable,
    TaskExists,
    TaskHistory,
    TaskNotFound,
    VersionNotKept,
    from_record,
    keep_set,
    merge_info,
    validate_name,
)

log = logging.getLogger(__name__)

INDEX = "ssf:index"
STAGED = "ssf:staged"
REVS = "ssf:revs"
AUDIT = "ssf:audit"
CHANNEL = "ssf:changes"


def _task_key(name: str, version: int) -> str:
    return f"ssf:task:{name}:{version}"


def _blob_key(name: str, version: int) -> str:
    return f"ssf:blob:{name}:{version}"


def _kept_key(name: str) -> str:
    return f"ssf:kept:{name}"


def _seq_key(name: str) -> str:
    return f"ssf:seq:{name}"


def _int(raw: Any) -> int | None:
    return None if raw is None else int(raw)


def _notify(callback: Callable[[str], None], name: str) -> None:
    try:
        callback(name)
    except Exception:  # the caller's bug must not end the subscription
        log.exception("change hint callback failed for %r", name)


class RedisStore:
    def __init__(
        self, url: str, timeout_s: float = 1.0, keep_versions: int = 5, audit_max_records: int = 10_000
    ) -> None:
        if keep_versions < 2:
            raise ValueError("keep_versions must be at least 2 (the current version and the one before)")
        self.keep_versions, self.audit_max_records = keep_versions, audit_max_records
        self.url = url
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=5
        )
        self._stop = threading.Event()
        self._watchers: list[threading.Thread] = []

    def __repr__(self) -> str:
        return (
            f"RedisStore({self._redis.connection_pool.connection_kwargs.get('host')!r})"  # never the password
        )

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as e:
            # Connection refused/reset, timeouts, LOADING after a restart, OOM, READONLY replica, MISCONF:
            # all mean "the registry cannot take this now" (503); never leak a raw redis exception upward.
            # The message names the class only: redis errors may carry host names or key names.
            raise StoreUnavailable(f"task registry (redis) unavailable: {type(e).__name__}") from None

    @staticmethod
    def _head(pipe: Any, name: str) -> Head:
        """The task's pointers, read inside a WATCH (immediate mode) or a plain connection."""
        return Head(
            _int(pipe.hget(INDEX, name)), _int(pipe.hget(STAGED, name)), _int(pipe.hget(REVS, name)) or 0
        )

    def _watch(self, name: str, fn: Callable[[redis.client.Pipeline], Any]) -> Any:
        # redis-py types the callable as returning None; with value_from_callable it returns ours
        return self._call(
            lambda: self._redis.transaction(
                fn,  # type: ignore[arg-type]
                INDEX,
                STAGED,
                _seq_key(name),
                _kept_key(name),
                value_from_callable=True,
            )
        )

    def _prune(self, pipe: Any, name: str, kept: list[int], head: Head, new: int | None = None) -> None:
        """Queue (after MULTI) the removal of every version ``keep_set`` does not keep."""
        everything = set(kept) | ({new} if new is not None else set())
        keep = keep_set(everything, head, self.keep_versions)
        gone = sorted(everything - keep)
        if gone:
            pipe.zrem(_kept_key(name), *gone)
            pipe.delete(*(k for v in gone for k in (_blob_key(name, v), _task_key(name, v))))

    @staticmethod
    def _kept(pipe: Any, name: str) -> list[int]:
        return [int(v) for v in pipe.zrange(_kept_key(name), 0, -1)]

    def put(
        self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False, stage: bool = False
    ) -> StoredTask:
        validate_name(name)
        digest = hashlib.sha256(data).hexdigest()

        def transaction(pipe: redis.client.Pipeline) -> StoredTask:
            head = self._head(pipe, name)
            if (head.current is not None or head.staged is not None) and not replace and not stage:
                raise TaskExists(name)
            last = int(pipe.get(_seq_key(name)) or 0)
            version = max(last, head.current or 0, head.staged or 0) + 1
            kept = self._kept(pipe, name)
            stored = StoredTask(
                name, version, digest, len(data), datetime.now(UTC).isoformat(timespec="seconds"), dict(info)
            )
            if stage:
                new_head = Head(head.current, version, head.revision)
            else:
                new_head = Head(version, head.staged, head.revision + 1)
            pipe.multi()
            pipe.set(_blob_key(name, version), data)
            pipe.set(_task_key(name, version), json.dumps(stored.record()))
            pipe.set(_seq_key(name), version)
            pipe.zadd(_kept_key(name), {str(version): version})
            if stage:
                pipe.hset(STAGED, name, version)
            else:
                pipe.hset(REVS, name, new_head.revision)
                pipe.hset(INDEX, name, version)
            self._prune(pipe, name, kept, new_head, version)
            if stage:
                return stored
            return from_record(stored.record(), new_head.revision, new_head.staged)

        stored: StoredTask = self._watch(name, transaction)
        self._publish(name)
        return stored

    def promote(self, name: str, version: int) -> StoredTask:
        validate_name(name)
        version = int(version)

        def transaction(pipe: redis.client.Pipeline) -> StoredTask:
            head = self._head(pipe, name)
            if head.current is None and head.staged is None:
                raise TaskNotFound(name)
            raw = pipe.get(_task_key(name, version))
            if raw is None:
                raise VersionNotKept(name, version)
            kept = self._kept(pipe, name)
            new_head = Head(version, None if head.staged == version else head.staged, head.revision + 1)
            pipe.multi()
            pipe.hset(REVS, name, new_head.revision)
            pipe.hset(INDEX, name, version)
            if head.staged == version:
                pipe.hdel(STAGED, name)
            self._prune(pipe, name, kept, new_head)
            return from_record(json.loads(raw), new_head.revision, new_head.staged)

        stored: StoredTask = self._watch(name, transaction)
        self._publish(name)
        return stored

    def update_info(self, name: str, version: int, patch: dict[str, Any]) -> StoredTask:
        validate_name(name)
        version = int(version)
        key = _task_key(name, version)

        def transaction(pipe: redis.client.Pipeline) -> StoredTask:
            head = self._head(pipe, name)
            if head.current is None and head.staged is None:
                raise TaskNotFound(name)
            raw = pipe.get(key)
            if raw is None:
                raise VersionNotKept(name, version)
            record = json.loads(raw)
            record["info"] = merge_info(dict(record.get("info") or {}), patch)
            pipe.multi()
            pipe.set(key, json.dumps(record))
            if head.current == version:
                return from_record(record, head.revision, head.staged)
            return from_record(record)

        result: StoredTask = self._call(
            lambda: self._redis.transaction(
                transaction,  # type: ignore[arg-type]
                INDEX,
                STAGED,
                key,
                value_from_callable=True,
            )
        )
        return result

    def _publish(self, name: str) -> None:
        try:
            self._redis.publish(CHANNEL, name)
        except redis.RedisError:  # a hint only: the change is committed, replicas reconcile anyway
            log.warning("could not publish change hint for %s", name)

    def _heads_now(self, names: list[str] | None = None) -> dict[str, Head]:
        """Every task's pointers in one MULTI (a consistent snapshot, one round trip)."""

        def fetch() -> list[Any]:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hgetall(INDEX)
            pipe.hgetall(STAGED)
            pipe.hgetall(REVS)
            result: list[Any] = pipe.execute()
            return result

        index, staged, revs = self._call(fetch)
        out: dict[str, Head] = {}
        for raw in sorted(set(index) | set(staged)):
            name = raw.decode()
            current, stage = _int(index.get(raw)), _int(staged.get(raw))
            out[name] = Head(current, None if stage == current else stage, _int(revs.get(raw)) or 0)
        return out

    def _one_head(self, name: str) -> Head:
        def fetch() -> list[Any]:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hget(INDEX, name)
            pipe.hget(STAGED, name)
            pipe.hget(REVS, name)
            result: list[Any] = pipe.execute()
            return result

        current, staged, rev = self._call(fetch)
        return Head(_int(current), _int(staged), _int(rev) or 0)

    def _record(self, name: str, version: int, head: Head) -> StoredTask:
        raw = self._call(lambda: self._redis.get(_task_key(name, int(version))))
        if raw is None:
            raise VersionNotKept(name, version)
        if head.current == version:
            return from_record(json.loads(raw), head.revision, head.staged)
        return from_record(json.loads(raw))

    def get(self, name: str) -> StoredTask:
        validate_name(name)
        head = self._one_head(name)
        if head.current is None:
            raise TaskNotFound(name)
        try:
            return self._record(name, head.current, head)
        except VersionNotKept:  # deleted between the two reads
            raise TaskNotFound(name) from None

    def get_version(self, name: str, version: int) -> StoredTask:
        validate_name(name)
        head = self._one_head(name)
        if head.current is None and head.staged is None:
            raise TaskNotFound(name)
        return self._record(name, int(version), head)

    def history(self, name: str) -> TaskHistory:
        validate_name(name)
        head = self._one_head(name)
        if head.current is None and head.staged is None:
            raise TaskNotFound(name)
        kept = sorted(self._call(lambda: self._kept(self._redis, name)), reverse=True)
        raws = self._call(lambda: self._redis.mget([_task_key(name, v) for v in kept])) if kept else []
        records = []
        for v, raw in zip(kept, raws, strict=True):
            if raw is not None:  # pruned between the two reads
                rec = json.loads(raw)
                records.append(
                    from_record(rec, head.revision, head.staged) if v == head.current else from_record(rec)
                )
        return TaskHistory(name, head, records)

    def read(self, name: str, version: int) -> bytes:
        validate_name(name)
        data = self._call(lambda: self._redis.get(_blob_key(name, int(version))))
        if data is None:
            raise TaskNotFound(name)
        return bytes(data)

    def delete(self, name: str) -> None:
        validate_name(name)

        def transaction(pipe: redis.client.Pipeline) -> None:
            head = self._head(pipe, name)
            if head.current is None and head.staged is None:
                raise TaskNotFound(name)
            versions = set(self._kept(pipe, name)) | {v for v in (head.current, head.staged) if v}
            keys = [k for v in versions for k in (_blob_key(name, v), _task_key(name, v))]
            pipe.multi()
            pipe.hdel(INDEX, name)
            pipe.hdel(STAGED, name)
            pipe.delete(_kept_key(name), *keys)

        self._watch(name, transaction)
        self._publish(name)

    def heads(self) -> dict[str, Head]:
        return self._heads_now()

    def versions(self) -> dict[str, int]:
        raw = self._call(lambda: self._redis.hgetall(INDEX))
        return {k.decode(): int(v) for k, v in sorted(raw.items())}

    def list(self) -> list[StoredTask]:
        heads = {n: h for n, h in self._heads_now().items() if h.current is not None}
        if not heads:
            return []
        keys = [_task_key(n, h.current) for n, h in heads.items() if h.current is not None]
        raws = self._call(lambda: self._redis.mget(keys))
        return [
            from_record(json.loads(r), heads[n].revision, heads[n].staged)
            for n, r in zip(heads, raws, strict=True)
            if r is not None
        ]

    # ------------------------------------------------------------------------------- audit log
    def append_audit(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, separators=(",", ":"))
        self._call(
            lambda: self._redis.xadd(AUDIT, {"r": data}, maxlen=self.audit_max_records, approximate=False)
        )

    def read_audit(self, task: str | None = None, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Newest first from the stream, in pages, until ``limit`` records of ``task`` are found."""
        out: builtins.list[dict[str, Any]] = []
        last = "+"
        page = max(limit, 100)
        pages = self.audit_max_records * 2 // page + 2  # the stream is bounded, so is this loop
        for _ in range(pages):
            if len(out) >= limit:
                break
            entries = self._call(
                lambda bound=last: self._redis.xrevrange(AUDIT, max=bound, min="-", count=page)  # type: ignore[misc]
            )
            if last != "+":
                entries = entries[1:]  # the bound itself was read on the previous page
            if not entries:
                break
            for _entry_id, fields in entries:
                try:
                    record = json.loads(fields[b"r"])
                except (KeyError, ValueError):
                    continue
                if task is None or record.get("task") == task:
                    out.append(record)
                    if len(out) >= limit:
                        break
            last = entries[-1][0].decode()
        return out[::-1]

    def watch(self, callback: Callable[[str], None]) -> None:
        """Deliver change hints to ``callback(name)`` from a daemon thread that resubscribes after errors."""
        thread = threading.Thread(target=self._listen, args=(callback,), name="ssf-redis-watch", daemon=True)
        self._watchers.append(thread)
        thread.start()

    def _listen(self, callback: Callable[[str], None]) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                backoff = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and message.get("type") == "message":
                        _notify(callback, message["data"].decode(errors="replace"))
            except redis.RedisError as e:
                log.info("change hints interrupted (%s); resubscribing", type(e).__name__)
                _notify(callback, "")  # "" means: something may have been missed, reconcile everything
            except Exception:  # never let the hint thread die: correctness does not need it, latency does
                log.exception("change hint listener failed; resubscribing")
            finally:
                pubsub.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def close(self) -> None:
        self._stop.set()
        for thread in self._watchers:
            thread.join(timeout=2)
        self._redis.close()
