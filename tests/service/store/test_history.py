"""Version history, staged versions, promotion, info patches and the audit log: both registries against
the same contract (Redis is a real redis-server), plus the storage each keeps after many replaces."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.store import LocalStore, TaskExists, TaskNotFound, VersionNotKept
from service.store.base import Head, TaskStore
from service.store.redis_store import RedisStore

KEEP = 4


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskStore]:
    if request.param == "local":
        s: TaskStore = LocalStore(tmp_path / "store", keep_versions=KEEP, audit_max_records=50)
    else:
        url = request.getfixturevalue("redis_server").url
        s = RedisStore(url, keep_versions=KEEP, audit_max_records=50)
    yield s
    s.close()


def kept(store: TaskStore, name: str) -> list[int]:
    return [t.version for t in store.history(name).versions]


def test_history_keeps_the_newest_n_and_reads_each(store: TaskStore) -> None:
    for v in range(1, 11):
        store.put("t", f"bytes-{v}".encode(), {"v": v}, replace=True)
    assert kept(store, "t") == [10, 9, 8, 7]
    assert store.history("t").head.current == 10
    for v in (7, 8, 9, 10):
        assert store.get_version("t", v).info == {"v": v}
        assert store.read("t", v) == f"bytes-{v}".encode()
    for v in (1, 6):
        with pytest.raises(VersionNotKept):
            store.get_version("t", v)
        with pytest.raises(TaskNotFound):
            store.read("t", v)
    with pytest.raises(TaskNotFound):
        store.history("nope")
    with pytest.raises(TaskNotFound):
        store.get_version("nope", 1)


def test_staged_version_is_not_current_and_promotes_atomically(store: TaskStore) -> None:
    store.put("t", b"1", {})
    staged = store.put("t", b"2", {"s": True}, stage=True)
    assert staged.version == 2
    assert store.get("t").version == 1 and store.get("t").staged_version == 2
    assert store.versions() == {"t": 1}
    assert store.heads()["t"].current == 1 and store.heads()["t"].staged == 2
    rev = store.heads()["t"].revision
    promoted = store.promote("t", 2)
    assert (promoted.version, promoted.staged_version, promoted.revision) == (2, None, rev + 1)
    assert store.get("t").version == 2 and store.heads()["t"] == Head(2, None, rev + 1)
    back = store.promote("t", 1)  # a rollback: an older version, a newer revision
    assert back.version == 1 and back.revision == rev + 2
    assert store.versions() == {"t": 1}
    assert kept(store, "t") == [2, 1]


def test_a_task_may_start_staged_and_be_deleted_with_its_history(store: TaskStore) -> None:
    store.put("s", b"1", {}, stage=True)
    with pytest.raises(TaskNotFound):
        store.get("s")  # no current version: nothing serves it
    assert "s" not in store.versions() and store.heads()["s"] == Head(None, 1, 0)
    assert [t.name for t in store.list()] == []
    with pytest.raises(TaskExists):
        store.put("s", b"2", {})  # the name is taken (by a staged version)
    assert store.put("s", b"2", {}, stage=True).version == 2  # a newer staged version supersedes it
    assert kept(store, "s") == [2, 1] and store.heads()["s"].staged == 2
    store.promote("s", 1)
    assert store.get("s").version == 1 and store.get("s").staged_version == 2
    store.delete("s")
    with pytest.raises(TaskNotFound):
        store.history("s")
    with pytest.raises(TaskNotFound):
        store.get_version("s", 1)
    with pytest.raises(TaskNotFound):
        store.promote("s", 1)
    assert "s" not in store.heads()
    assert store.put("s", b"new", {}).version == 3  # numbers never reused
    assert kept(store, "s") == [3]


def test_current_and_staged_are_never_pruned(store: TaskStore) -> None:
    store.put("t", b"1", {})
    store.put("t", b"2", {}, stage=True)
    for v in range(3, 12):  # many newer versions after a rollback to 1 with 2 staged
        store.put("t", str(v).encode(), {}, replace=True)
    store.promote("t", 11 - KEEP + 3)
    store.put("t", b"x", {}, stage=True)  # 12, staged
    store.promote("t", 10)
    versions = kept(store, "t")
    assert len(versions) == KEEP and 10 in versions and 12 in versions
    assert store.history("t").head == Head(10, 12, store.heads()["t"].revision)
    with pytest.raises(VersionNotKept):
        store.promote("t", 2)  # pruned long ago


def test_update_info_patches_one_version_only(store: TaskStore) -> None:
    store.put("t", b"1", {"metrics": {"test_acc": 0.9}, "labels": ["a"]})
    store.put("t", b"2", {"metrics": {}}, replace=True)
    patched = store.update_info("t", 1, {"metrics": {"test_acc": 0.9, "eval": {"accuracy": 0.5}}})
    assert patched.info == {"metrics": {"test_acc": 0.9, "eval": {"accuracy": 0.5}}, "labels": ["a"]}
    assert store.get_version("t", 1).info == patched.info
    assert store.get("t").info == {"metrics": {}}
    assert store.read("t", 1) == b"1"  # the bytes never change
    current = store.update_info("t", 2, {"metrics": {"eval": {}}})
    assert current.revision == store.get("t").revision and store.get("t").info["metrics"] == {"eval": {}}
    with pytest.raises(VersionNotKept):
        store.update_info("t", 7, {})
    with pytest.raises(TaskNotFound):
        store.update_info("nope", 1, {})


def test_concurrent_promotions_and_uploads_keep_revisions_unique(store: TaskStore) -> None:
    store.put("hot", b"0", {})
    store.put("hot", b"1", {}, replace=True)
    revisions: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(6):
            if j % 2:
                try:  # the second newest kept version: a rollback
                    r = store.promote("hot", kept(store, "hot")[1]).revision
                except VersionNotKept:  # pruned by the other threads' uploads meanwhile
                    continue
            else:
                r = store.put("hot", f"{i}-{j}".encode(), {}, replace=True).revision
            with lock:
                revisions.append(r)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(revisions) >= 12 and len(set(revisions)) == len(revisions)  # no lost or reused revision
    assert store.heads()["hot"].revision == max(revisions)


def test_audit_log_is_bounded_and_filters_by_task(store: TaskStore) -> None:
    for i in range(130):
        store.append_audit({"i": i, "task": "a" if i % 2 else "b", "action": "upload"})
    records = store.read_audit(limit=1000)
    assert 50 <= len(records) <= 55  # bounded (exactly in Redis; the file is trimmed past a tenth more)
    assert [r["i"] for r in records] == list(range(130 - len(records), 130))  # oldest first, the newest
    only_a = store.read_audit(task="a", limit=5)
    assert [r["i"] for r in only_a] == [121, 123, 125, 127, 129]
    assert store.read_audit(task="zzz") == []


def _bytes_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _bytes_in_redis(url: str) -> int:
    admin = redis.Redis.from_url(url)
    return sum(int(admin.memory_usage(k) or 0) for k in admin.scan_iter("ssf:*") if k != b"ssf:audit")


def test_storage_stays_bounded_after_many_replaces(tmp_path: Path, redis_server: object) -> None:
    """Bytes on disk and in Redis after 10 and after 200 replaces of a 64 KiB delta, 5 versions kept."""
    url = redis_server.url  # type: ignore[attr-defined]
    local, remote = LocalStore(tmp_path / "s", keep_versions=5), RedisStore(url, keep_versions=5)
    delta = 64 * 1024
    sizes: dict[str, list[int]] = {"local": [], "redis": []}
    for n in range(1, 201):
        data = n.to_bytes(4, "big") * (delta // 4)
        for s in (local, remote):
            s.put("t", data, {"labels": ["a", "b"]}, replace=True)
        if n in (10, 200):
            sizes["local"].append(_bytes_on_disk(tmp_path / "s" / "tasks"))
            sizes["redis"].append(_bytes_in_redis(url))
    print(f"storage after 10 / 200 replaces (5 kept, 64 KiB deltas): {sizes}")
    for name, (after10, after200) in sizes.items():
        assert after10 == pytest.approx(after200, rel=0.02), name
        # five deltas and their records (Redis counts its allocator's size classes: 64 KiB takes 80 KiB)
        assert 5 * delta <= after200 <= 5 * delta * 1.3, name
    remote.close()
