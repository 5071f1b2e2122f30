"""The engine on the real registries: a LocalStore that outlives the engine, and two replicas on one Redis
that follow each other through pub/sub hints (and through reconcile when hints are lost)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from service.engine.engine import Engine
from service.settings import EngineConfig
from service.store import open_store
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.images import images
from tests.helpers.models import MODELS, backbone_file
from tests.helpers.servers import RedisServer

FAMILY = "vit"


def engine_on(store_spec: str, weights_dir: Path) -> Engine:
    config = EngineConfig(reconcile_interval_s=3600)
    return Engine(MODELS[FAMILY], backbone_file(FAMILY, weights_dir), open_store(store_spec), config=config)


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_local_store_tasks_survive_a_restart(tmp_path: Path, weights_dir: Path) -> None:
    data = delta_bytes(FAMILY, make_task(FAMILY, seed=120), "kept")

    async def scenario() -> None:
        first = engine_on(str(tmp_path / "store"), weights_dir)
        await first.start()
        await first.add_task(data, None, replace=False)
        await first.add_task(data, None, replace=True)
        await first.stop()
        second = engine_on(str(tmp_path / "store"), weights_dir)
        await second.start()
        try:
            assert [(t.name, t.version) for t in second.list_tasks()] == [("kept", 2)]
            assert second.residency.entries["kept"].version == 2  # loaded and validated at start
            assert (await second.predict("kept", images(1), 2)).version == 2
        finally:
            await second.stop()

    asyncio.run(scenario())


@pytest.mark.redis
def test_replicas_on_redis_follow_each_other_by_hints(redis_server: RedisServer, weights_dir: Path) -> None:
    v1, v2 = make_task(FAMILY, seed=130), make_task(FAMILY, seed=131)

    async def scenario() -> None:
        a, b = engine_on(redis_server.url, weights_dir), engine_on(redis_server.url, weights_dir)
        await a.start()
        await b.start()
        try:
            await a.add_task(delta_bytes(FAMILY, v1, "fleet"), None, replace=False)
            await eventually(lambda: "fleet" in b.residency.entries)  # no reconcile call: the hint did it
            await a.add_task(delta_bytes(FAMILY, v2, "fleet"), None, replace=True)
            await eventually(lambda: b.residency.entries["fleet"].version == 2)
            assert (await b.predict("fleet", images(1), 1)).version == 2
            await a.delete_task("fleet")
            await eventually(lambda: "fleet" not in b.residency.entries)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


@pytest.mark.redis
def test_replica_catches_up_after_a_redis_outage(redis_server: RedisServer, weights_dir: Path) -> None:
    async def scenario() -> None:
        a, b = engine_on(redis_server.url, weights_dir), engine_on(redis_server.url, weights_dir)
        await a.start()
        await b.start()
        try:
            redis_server.kill()
            redis_server.start()  # empty again (AOF had nothing yet); both replicas reconnect
            await a.add_task(delta_bytes(FAMILY, make_task(FAMILY, seed=140), "after"), None, replace=False)
            await b.reconcile()  # what the periodic loop does when hints were lost
            assert (await b.predict("after", images(1), 1)).version == 1
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())
