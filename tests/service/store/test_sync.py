"""Reconciler: polling finds every change even when pub/sub hints are lost or Redis goes away.

No timing asserts: every wait is a bounded loop with a generous deadline, and what is asserted is the
state reached, not how fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.store import LocalStore, StoreUnavailable
from service.store.base import Head, TaskStore
from service.store.redis_store import CHANNEL, RedisStore
from service.store.sync import Reconciler
from tests.helpers.servers import RedisServer


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int | None]] = []
        self.state: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, name: str, version: int | None) -> None:
        with self.lock:
            self.events.append((name, version))
            if version is None:
                self.state.pop(name, None)
            else:
                self.state[name] = version


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def redis_pair(redis_server: RedisServer) -> Iterator[tuple[RedisStore, RedisStore]]:
    writer, replica = RedisStore(redis_server.url), RedisStore(redis_server.url)
    yield writer, replica
    writer.close()
    replica.close()


def test_first_pass_reports_everything_then_only_diffs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"1", {})
    store.put("b", b"1", {})
    rec = Recorder()
    r = Reconciler(store, rec, interval_s=60)
    assert r.reconcile() is True
    assert sorted(rec.events) == [("a", 1), ("b", 1)]
    rec.events.clear()
    assert r.reconcile() is True and rec.events == []  # nothing changed, nothing reported
    store.put("a", b"2", {}, replace=True)
    store.delete("b")
    store.put("c", b"1", {})
    r.reconcile()
    assert rec.events == [("a", 2), ("b", None), ("c", 1)]
    assert r.known == {"a": 2, "c": 1} == rec.state


def test_initial_map_suppresses_known_tasks(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"1", {})
    rec = Recorder()
    Reconciler(store, rec, initial={"a": 1, "gone": 4}).reconcile()
    assert rec.events == [("gone", None)]


def test_background_thread_polls_a_store_without_hints(tmp_path: Path) -> None:
    writer, replica = LocalStore(tmp_path), LocalStore(tmp_path)  # LocalStore.watch is a no-op
    rec = Recorder()
    with Reconciler(replica, rec, interval_s=0.2) as r:
        writer.put("t", b"1", {})
        assert wait_until(lambda: rec.state == {"t": 1})
        writer.put("t", b"2", {}, replace=True)
        assert wait_until(lambda: rec.state == {"t": 2})
        writer.delete("t")
        assert wait_until(lambda: rec.state == {})
        assert r.available and r.staleness_s() < 60
    assert r._thread is not None and not r._thread.is_alive()


def test_a_failing_callback_is_offered_the_change_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("t", b"1", {})
    calls: list[tuple[str, int | None]] = []

    def flaky(name: str, version: int | None) -> None:
        calls.append((name, version))
        if len(calls) == 1:
            raise RuntimeError("load failed")

    r = Reconciler(store, flaky)
    r.reconcile()
    assert r.known == {}  # not recorded as seen: the load failed
    r.reconcile()
    assert calls == [("t", 1), ("t", 1)] and r.known == {"t": 1}


class DownStore:
    """A store whose backing service is down until ``up`` is set."""

    def __init__(self, inner: TaskStore) -> None:
        self.inner = inner
        self.up = False

    def versions(self) -> dict[str, int]:
        if not self.up:
            raise StoreUnavailable("down")
        return self.inner.versions()

    def heads(self) -> dict[str, Head]:
        if not self.up:
            raise StoreUnavailable("down")
        return self.inner.heads()

    def watch(self, callback: Callable[[str], None]) -> None:
        raise StoreUnavailable("down")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_start_with_the_store_down_then_recover(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path)
    inner.put("t", b"1", {})
    store = DownStore(inner)
    rec = Recorder()
    r = Reconciler(store, rec, interval_s=60, retry_s=0.05)
    r.start()  # neither the first pass nor watch() raises
    try:
        assert not r.available and r.known == {} and r.staleness_s() == float("inf")
        assert wait_until(lambda: r.failures >= 3)  # retrying at retry_s, not interval_s
        store.up = True
        assert wait_until(lambda: rec.state == {"t": 1})  # reconciled on reconnect, not after 60 s
        assert r.available and r.last_error is None
    finally:
        r.stop()


def _subscribed(url: str) -> Callable[[], bool]:
    client = redis.Redis.from_url(url)

    def check() -> bool:
        return any(n >= 1 for _, n in client.pubsub_numsub(CHANNEL))

    return check


def test_hints_wake_the_loop_long_before_the_interval(
    redis_server: RedisServer, redis_pair: tuple[RedisStore, RedisStore]
) -> None:
    writer, replica = redis_pair
    rec = Recorder()
    with Reconciler(replica, rec, interval_s=300) as r:  # polling alone would take 5 minutes
        assert wait_until(_subscribed(redis_server.url))
        writer.put("t", b"1", {})
        assert wait_until(lambda: rec.state == {"t": 1}, timeout_s=30)
        assert r.hints >= 1


def test_lost_hints_are_caught_by_polling(
    redis_server: RedisServer, redis_pair: tuple[RedisStore, RedisStore]
) -> None:
    writer, replica = redis_pair
    admin = redis.Redis.from_url(redis_server.url)
    rec = Recorder()
    with Reconciler(replica, rec, interval_s=0.5):
        assert wait_until(_subscribed(redis_server.url))
        for i in range(5):
            admin.client_kill_filter(_type="pubsub")  # whatever is published now may be lost silently
            writer.put("t", f"{i}".encode(), {}, replace=i > 0)
            assert wait_until(lambda i=i: rec.state == {"t": i + 1})  # type: ignore[misc]


def test_polling_alone_without_watch(redis_pair: tuple[RedisStore, RedisStore]) -> None:
    writer, replica = redis_pair
    rec = Recorder()
    with Reconciler(replica, rec, interval_s=0.3, use_watch=False) as r:
        writer.put("a", b"1", {})
        writer.put("b", b"1", {})
        assert wait_until(lambda: rec.state == {"a": 1, "b": 1})
        writer.delete("a")
        assert wait_until(lambda: rec.state == {"b": 1})
        assert r.hints == 0


def test_redis_outage_keeps_state_and_recovers(
    redis_server: RedisServer, redis_pair: tuple[RedisStore, RedisStore]
) -> None:
    writer, replica = redis_pair
    for i in range(5):
        writer.put(f"t{i}", b"x", {})
    rec = Recorder()
    with Reconciler(replica, rec, interval_s=0.3) as r:
        assert wait_until(lambda: len(rec.state) == 5)
        redis_server.kill()
        assert wait_until(lambda: not r.available)
        assert r.known == {f"t{i}": 1 for i in range(5)}  # the last known state is kept
        assert r.last_error is not None
        redis_server.start()  # same port and directory: AOF replays what was acknowledged
        assert wait_until(lambda: r.available)
        assert r.known == {f"t{i}": 1 for i in range(5)}  # nothing lost across the restart

        def replace_t0() -> bool:
            try:
                writer.put("t0", b"y", {}, replace=True)
                return True
            except StoreUnavailable:
                return False

        assert wait_until(replace_t0)
        assert wait_until(lambda: rec.state.get("t0") == 2)
        assert not any(v is None for _, v in rec.events)  # an outage never looks like a delete


def test_stop_is_prompt_and_idempotent(tmp_path: Path) -> None:
    r = Reconciler(LocalStore(tmp_path), Recorder(), interval_s=3600)
    r.start()
    r.stop()
    r.stop()
    assert r._thread is not None and not r._thread.is_alive()
    with pytest.raises(RuntimeError):
        r.start()


def test_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Reconciler(LocalStore(tmp_path), Recorder(), interval_s=0)
