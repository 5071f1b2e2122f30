"""Where tenants and token records live: Redis beside the task registry, or JSON files in the store
directory. Both hold only records (token digests, never tokens) and answer ``load()`` with everything,
which is small: tenants and tokens are created by an operator, not by traffic.

Redis keys: ``ssf:tenants`` (hash name -> JSON), ``ssf:tokens`` (hash id -> JSON), ``ssf:bucket:*``
(token buckets, expiring when full). Files: ``<store>/tenants/{tenants,tokens}.json``, replaced
atomically under an fcntl lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from service.store.base import StoreUnavailable
from service.tenants.buckets import LUA, LocalBuckets, Refusal, Take
from service.tenants.model import Tenant, TokenRecord

Snapshot = tuple[dict[str, Tenant], dict[str, TokenRecord]]


class Backend(Protocol):
    def load(self) -> Snapshot: ...
    def put_tenant(self, tenant: Tenant) -> None: ...
    def delete_tenant(self, name: str) -> bool: ...
    def put_token(self, record: TokenRecord) -> None: ...
    def delete_token(self, token_id: str) -> bool: ...
    def take(self, takes: list[Take]) -> Refusal | None: ...
    def close(self) -> None: ...


class RedisBackend:
    TENANTS, TOKENS = "ssf:tenants", "ssf:tokens"

    def __init__(self, url: str, timeout_s: float = 1.0) -> None:
        import redis

        self._errors = redis.RedisError
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(LUA)

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._errors as e:  # the message names the class only: never the address
            raise StoreUnavailable(f"tenant registry (redis) unavailable: {type(e).__name__}") from None

    def load(self) -> Snapshot:
        def read() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(self.TENANTS)
            pipe.hgetall(self.TOKENS)
            tenants, tokens = pipe.execute()
            return tenants, tokens

        tenants, tokens = self._call(read)
        return (
            {k.decode(): Tenant.from_json(json.loads(v)) for k, v in tenants.items()},
            {k.decode(): TokenRecord.from_json(json.loads(v)) for k, v in tokens.items()},
        )

    def put_tenant(self, tenant: Tenant) -> None:
        self._call(lambda: self._redis.hset(self.TENANTS, tenant.name, json.dumps(tenant.to_json())))

    def delete_tenant(self, name: str) -> bool:
        return bool(self._call(lambda: self._redis.hdel(self.TENANTS, name)))

    def put_token(self, record: TokenRecord) -> None:
        self._call(lambda: self._redis.hset(self.TOKENS, record.id, json.dumps(record.to_json())))

    def delete_token(self, token_id: str) -> bool:
        return bool(self._call(lambda: self._redis.hdel(self.TOKENS, token_id)))

    def take(self, takes: list[Take]) -> Refusal | None:
        keys = [f"ssf:bucket:{t.key}" for t in takes]
        args: list[float] = []
        for t in takes:
            args += [t.rate, t.burst, t.cost, t.floor]
        ok, wait, which = self._call(lambda: self._script(keys=keys, args=args))
        return None if int(ok) == 1 else Refusal(float(wait), takes[int(which) - 1])

    def close(self) -> None:
        self._redis.close()


class LocalBackend:
    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root) / "tenants"  # created on the first write: reading changes nothing on disk
        self._lock = threading.Lock()
        self._buckets = LocalBuckets()

    def _read(self, name: str) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = json.loads((self.dir / name).read_text())
        except FileNotFoundError:
            return {}
        return raw

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.dir / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _write(self, name: str, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)  # noqa: PTH105
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _update(self, name: str, change: Callable[[dict[str, Any]], bool]) -> bool:
        with self._exclusive():
            data = self._read(name)
            changed = change(data)
            if changed:
                self._write(name, data)
            return changed

    def load(self) -> Snapshot:
        return (
            {k: Tenant.from_json(v) for k, v in self._read("tenants.json").items()},
            {k: TokenRecord.from_json(v) for k, v in self._read("tokens.json").items()},
        )

    def put_tenant(self, tenant: Tenant) -> None:
        self._update("tenants.json", lambda d: d.update({tenant.name: tenant.to_json()}) is None)

    def delete_tenant(self, name: str) -> bool:
        if name not in self._read("tenants.json"):  # nothing to do: and nothing created on disk
            return False
        return self._update("tenants.json", lambda d: d.pop(name, None) is not None)

    def put_token(self, record: TokenRecord) -> None:
        self._update("tokens.json", lambda d: d.update({record.id: record.to_json()}) is None)

    def delete_token(self, token_id: str) -> bool:
        if token_id not in self._read("tokens.json"):
            return False
        return self._update("tokens.json", lambda d: d.pop(token_id, None) is not None)

    def take(self, takes: list[Take]) -> Refusal | None:
        return self._buckets.take(takes)

    def close(self) -> None:
        pass


def open_backend(store: str) -> Backend:
    if store.startswith(("redis://", "rediss://", "unix://")):
        return RedisBackend(store)
    return LocalBackend(store)
