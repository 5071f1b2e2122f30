"""The registry shared by replicas: Redis (AOF on in the shipped config).

Keys (names are validated before they become part of any key):

    ssf:index                 hash name -> current version (what ``versions()`` reads: one round trip)
    ssf:task:<name>:<N>       the StoredTask record of version N (JSON)
    ssf:blob:<name>:<N>       the delta bytes of version N
    ssf:seq:<name>            the last version ever given (survives delete: numbers are never reused)
    ssf:changes               pub/sub channel: the changed task's name (a hint only)

A put is WATCH ssf:index + MULTI/EXEC, so two replicas replacing one task concurrently get n+1 and n+2,
never a lost update. Pub/sub can drop messages silently (a killed subscriber connection loses what was
published meanwhile), so correctness never depends on it: replicas reconcile on a timer
(``service.store.sync.Reconciler``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import redis

from service.store.base import StoredTask, StoreUnavailable, TaskExists, TaskNotFound, validate_name

log = logging.getLogger(__name__)

INDEX = "ssf:index"
CHANNEL = "ssf:changes"
KEEP_VERSIONS = 2


def _task_key(name: str, version: int) -> str:
    return f"ssf:task:{name}:{version}"


def _blob_key(name: str, version: int) -> str:
    return f"ssf:blob:{name}:{version}"


def _notify(callback: Callable[[str], None], name: str) -> None:
    try:
        callback(name)
    except Exception:  # the caller's bug must not end the subscription
        log.exception("change hint callback failed for %r", name)


class RedisStore:
    def __init__(self, url: str, timeout_s: float = 1.0) -> None:
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

    def put(self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False) -> StoredTask:
        validate_name(name)
        digest = hashlib.sha256(data).hexdigest()

        def transaction(pipe: redis.client.Pipeline) -> StoredTask:
            current = pipe.hget(INDEX, name)
            if current is not None and not replace:
                raise TaskExists(name)
            last = int(pipe.get(f"ssf:seq:{name}") or 0)
            version = max(last, int(current or 0)) + 1
            stored = StoredTask(
                name, version, digest, len(data), datetime.now(UTC).isoformat(timespec="seconds"), dict(info)
            )
            pipe.multi()
            pipe.set(_blob_key(name, version), data)
            pipe.set(_task_key(name, version), json.dumps(asdict(stored)))
            pipe.set(f"ssf:seq:{name}", version)
            pipe.hset(INDEX, name, version)
            old = version - KEEP_VERSIONS
            if old >= 1:
                pipe.delete(_blob_key(name, old), _task_key(name, old))
            return stored

        # redis-py types the callable as returning None; with value_from_callable it returns ours
        stored: StoredTask = self._call(
            lambda: self._redis.transaction(
                transaction,  # type: ignore[arg-type]
                INDEX,
                f"ssf:seq:{name}",
                value_from_callable=True,
            )
        )
        self._publish(name)
        return stored

    def _publish(self, name: str) -> None:
        try:
            self._redis.publish(CHANNEL, name)
        except redis.RedisError:  # a hint only: the change is committed, replicas reconcile anyway
            log.warning("could not publish change hint for %s", name)

    def get(self, name: str) -> StoredTask:
        validate_name(name)

        def fetch() -> StoredTask:
            version = self._redis.hget(INDEX, name)
            if version is None:
                raise TaskNotFound(name)
            raw = self._redis.get(_task_key(name, int(version)))
            if raw is None:  # deleted between the two reads
                raise TaskNotFound(name)
            return StoredTask(**json.loads(raw))

        result: StoredTask = self._call(fetch)
        return result

    def read(self, name: str, version: int) -> bytes:
        validate_name(name)
        data = self._call(lambda: self._redis.get(_blob_key(name, int(version))))
        if data is None:
            raise TaskNotFound(name)
        return bytes(data)

    def delete(self, name: str) -> None:
        validate_name(name)

        def transaction(pipe: redis.client.Pipeline) -> None:
            version = pipe.hget(INDEX, name)
            if version is None:
                raise TaskNotFound(name)
            keys = [
                k
                for v in range(max(1, int(version) - KEEP_VERSIONS), int(version) + 1)
                for k in (_blob_key(name, v), _task_key(name, v))
            ]
            pipe.multi()
            pipe.hdel(INDEX, name)
            pipe.delete(*keys)

        self._call(lambda: self._redis.transaction(transaction, INDEX))
        self._publish(name)

    def versions(self) -> dict[str, int]:
        raw = self._call(lambda: self._redis.hgetall(INDEX))
        return {k.decode(): int(v) for k, v in sorted(raw.items())}

    def list(self) -> list[StoredTask]:
        versions = self.versions()
        if not versions:
            return []
        raws = self._call(lambda: self._redis.mget([_task_key(n, v) for n, v in versions.items()]))
        return [StoredTask(**json.loads(r)) for r in raws if r is not None]

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
