"""Both registries against the same contract; Redis is a real redis-server (tests/conftest.py)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.store import InvalidTaskName, LocalStore, StoreUnavailable, TaskExists, TaskNotFound, open_store
from service.store.base import TaskStore
from service.store.redis_store import RedisStore
from tests.helpers.servers import RedisServer


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskStore]:
    if request.param == "local":
        s: TaskStore = LocalStore(tmp_path / "store")
    else:
        s = RedisStore(request.getfixturevalue("redis_server").url)
    yield s
    s.close()


def test_put_get_read_list_delete(store: TaskStore) -> None:
    a = store.put("alpha", b"A1", {"num_classes": 3})
    assert (a.name, a.version, a.size_bytes, a.info) == ("alpha", 1, 2, {"num_classes": 3})
    assert len(a.sha256) == 64
    store.put("beta", b"B1", {})
    assert store.get("alpha") == a
    assert store.read("alpha", 1) == b"A1"
    assert [t.name for t in store.list()] == ["alpha", "beta"]
    assert store.versions() == {"alpha": 1, "beta": 1}
    store.delete("alpha")
    with pytest.raises(TaskNotFound):
        store.get("alpha")
    with pytest.raises(TaskNotFound):
        store.delete("alpha")
    assert store.versions() == {"beta": 1}


def test_replace_makes_a_new_version_and_keeps_the_old_bytes(store: TaskStore) -> None:
    store.put("t", b"v1", {})
    with pytest.raises(TaskExists):
        store.put("t", b"again", {})
    v2 = store.put("t", b"v2", {}, replace=True)
    assert v2.version == 2 and store.get("t").version == 2
    assert store.read("t", 1) == b"v1" and store.read("t", 2) == b"v2"  # in-flight requests on v1 finish
    for v in range(3, 7):
        store.put("t", f"v{v}".encode(), {}, replace=True)
    with pytest.raises(TaskNotFound):
        store.read("t", 1)  # pruned: the default keeps the newest 5 versions (current included)
    assert [t.version for t in store.history("t").versions] == [6, 5, 4, 3, 2]


def test_versions_are_never_reused_after_delete(store: TaskStore) -> None:
    store.put("t", b"v1", {})
    store.put("t", b"v2", {}, replace=True)
    store.delete("t")
    assert store.put("t", b"new", {}).version == 3  # a replica holding v2 must see the new one as newer


def test_concurrent_replaces_lose_no_update(store: TaskStore) -> None:
    store.put("hot", b"0", {})
    versions: list[int] = []
    lock = threading.Lock()

    def replace(i: int) -> None:
        for j in range(5):
            v = store.put("hot", f"{i}-{j}".encode(), {}, replace=True).version
            with lock:
                versions.append(v)

    threads = [threading.Thread(target=replace, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(versions) == list(range(2, 42))
    assert store.get("hot").version == 41


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "A", "x" * 64, "", "tаsk", "..\\x", "%2e%2e", "a\nb", "ok\n", "-x"]
)
def test_hostile_names_never_reach_a_path_or_key(store: TaskStore, name: str, tmp_path: Path) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidTaskName):
        store.put(name, b"x", {})
    with pytest.raises(InvalidTaskName):
        store.get(name)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("fail_at", ["v2.safetensors", "v2.json", "seq/t", "current"])
def test_local_crash_mid_write_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    store = LocalStore(tmp_path)
    store.put("t", b"good", {})
    real = os.replace
    calls = {"n": 0}

    def crash_at(src: str, dst: str) -> None:
        calls["n"] += 1
        if str(dst).endswith(fail_at):  # the temp file is written and fsynced; the rename never happens
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_at)
    with pytest.raises(OSError, match="disk full"):
        store.put("t", b"bad", {}, replace=True)
    monkeypatch.setattr(os, "replace", real)
    assert calls["n"] >= 1
    assert store.get("t").version == 1 and store.read("t", 1) == b"good"
    assert store.versions() == {"t": 1} and [t.version for t in store.list()] == [1]
    with pytest.raises(TaskNotFound):
        store.read("t", 2)  # the uncommitted version is not readable either
    assert not list(tmp_path.rglob(".tmp-*"))
    nxt = store.put("t", b"next", {}, replace=True)
    assert nxt.version >= 2 and store.read("t", nxt.version) == b"next"
    assert store.read("t", 1) == b"good"  # the previous version stays for in-flight requests


def test_local_crash_while_creating_leaves_no_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    real = os.replace

    def crash_on_commit(src: str, dst: str) -> None:
        if str(dst).endswith("current"):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_commit)
    with pytest.raises(OSError):
        store.put("t", b"bad", {})
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(TaskNotFound):
        store.get("t")
    assert store.versions() == {} and store.list() == []
    assert store.put("t", b"ok", {}).sha256 == hashlib.sha256(b"ok").hexdigest()


def test_local_layout_uses_only_generated_names(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("t.1", b"a", {"labels": ["../../etc/passwd"]})
    store.put("t.1", b"b", {}, replace=True)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        ".lock",
        "revs/t.1",
        "seq/t.1",
        "tasks/t.1/current",
        "tasks/t.1/v1.json",
        "tasks/t.1/v1.safetensors",
        "tasks/t.1/v2.json",
        "tasks/t.1/v2.safetensors",
    ]
    assert store.get("t.1").created_at.endswith("+00:00")  # ISO-8601 UTC


def test_two_local_stores_on_one_directory_agree(tmp_path: Path) -> None:
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    a.put("t", b"1", {})
    assert b.get("t").version == 1
    assert b.put("t", b"2", {}, replace=True).version == 2
    assert a.versions() == {"t": 2}


def test_redis_replicas_see_each_other_and_hints_arrive(redis_server: RedisServer) -> None:
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    seen: list[str] = []
    b.watch(seen.append)
    time.sleep(0.3)
    a.put("t", b"1", {"k": 1})
    assert b.get("t").info == {"k": 1}
    deadline = time.monotonic() + 5
    while "t" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "t" in seen
    a.close()
    b.close()


def test_dropped_subscription_resubscribes_and_says_so(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    seen: list[str] = []
    store.watch(seen.append)
    time.sleep(0.3)
    redis.Redis.from_url(redis_server.url).client_kill_filter(_type="pubsub")
    deadline = time.monotonic() + 5
    while "" not in seen and time.monotonic() < deadline:  # "" = "you may have missed something"
        time.sleep(0.05)
    assert "" in seen
    time.sleep(0.5)
    store.put("after", b"1", {})
    deadline = time.monotonic() + 5
    while "after" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "after" in seen
    store.close()


def test_redis_outage_is_fast_and_durable(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    for i in range(50):
        store.put(f"t{i}", f"{i}".encode(), {})  # acknowledged writes
    redis_server.kill()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.put("x", b"1", {})
    with pytest.raises(StoreUnavailable):
        store.versions()
    assert time.monotonic() - start < 3
    # kill -9 right after the writes: AOF everysec has written them to the OS (fsync is what a power cut
    # would need), so the restarted server replays every acknowledged one.
    redis_server.start()  # same port, same directory
    deadline = time.monotonic() + 10
    versions: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            versions = store.versions()
            break
        except StoreUnavailable:
            time.sleep(0.2)
    assert versions == {f"t{i}": 1 for i in range(50)}
    store.close()


def test_open_store_picks_by_spec(tmp_path: Path, redis_server: RedisServer) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(redis_server.url), RedisStore)
    with pytest.raises(ValueError, match="redis://HOST:PORT/DB"):
        open_store("redis:///0")


def test_redis_errors_other_than_connection_are_unavailable_too(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    store.put("t", b"1", {})
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # every write is now refused with OOM (a ResponseError)
    try:
        with pytest.raises(StoreUnavailable, match="OutOfMemoryError|ResponseError"):
            store.put("t", b"2", {}, replace=True)
    finally:
        admin.config_set("maxmemory", "0")
    assert store.get("t").version == 1 and store.read("t", 1) == b"1"  # the failed write left nothing
    assert store.put("t", b"2", {}, replace=True).version == 2
    store.close()


def test_a_raising_hint_callback_does_not_end_the_subscription(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    seen: list[str] = []

    def callback(name: str) -> None:
        seen.append(name)
        raise RuntimeError("bug in the caller")

    store.watch(callback)
    admin = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 10
    while not any(n for _, n in admin.pubsub_numsub("ssf:changes")) and time.monotonic() < deadline:
        time.sleep(0.02)
    for i in range(3):
        store.put(f"t{i}", b"1", {})
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen == ["t0", "t1", "t2"]
    store.close()


def test_redis_key_layout(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, keep_versions=2)
    store.put("t", b"1", {})
    store.put("t", b"2", {}, replace=True)
    store.put("t", b"3", {}, replace=True)
    store.put("u", b"1", {})
    store.put("u", b"2", {}, stage=True)
    store.delete("u")
    admin = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = sorted(admin.keys("*"))
    assert keys == [
        "ssf:blob:t:2",  # the previous version, for requests in flight
        "ssf:blob:t:3",
        "ssf:index",
        "ssf:kept:t",
        "ssf:revs",  # kept after delete, like seq: revisions only grow
        "ssf:seq:t",
        "ssf:seq:u",  # kept after delete: numbers are never reused
        "ssf:task:t:2",
        "ssf:task:t:3",
    ]
    assert admin.zrange("ssf:kept:t", 0, -1) == ["2", "3"]
    assert admin.hgetall("ssf:index") == {"t": "3"}
    store.close()


def _replace_many(root: str, tag: str, n: int) -> list[int]:
    store = LocalStore(root)
    return [store.put("shared", f"{tag}-{i}".encode(), {}, replace=True).version for i in range(n)]


def test_two_processes_on_one_directory_lose_no_update(tmp_path: Path) -> None:
    LocalStore(tmp_path).put("shared", b"0", {})
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no lock state inherited
    with ctx.Pool(2) as pool:
        results = pool.starmap(_replace_many, [(str(tmp_path), "a", 10), (str(tmp_path), "b", 10)])
    assert sorted(results[0] + results[1]) == list(range(2, 22))
    assert LocalStore(tmp_path).versions() == {"shared": 21}
