"""200 concurrent predictions over 50 tasks through real HTTP (ssf-serve in a subprocess), with 10 uploads
and 10 replaces in flight: every answer is 200 and carries the scores of the exact version it names.

The per-version reference scores come from a second, quiet server that loads each version alone, so any
mixing of tasks or versions under concurrency (a row, a head or a merged copy of another task or version)
shows as a score mismatch.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from tests.helpers import servers
from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file

pytestmark = pytest.mark.e2e

TASKS, PREDICTS, NEW, REPLACED = 50, 200, 10, 10
IMG = encode("PNG", 7)


def scores(body: dict) -> list[float]:
    return [round(x["score"], 4) for x in sorted(body["predictions"][0], key=lambda x: x["index"])]


async def predict(c: httpx.AsyncClient, task: str) -> httpx.Response:
    return await c.post(f"/tasks/{task}/predict?top_k=4", content=IMG, headers={"Content-Type": "image/png"})


async def upload(c: httpx.AsyncClient, data: bytes, replace: bool) -> httpx.Response:
    params = {"replace": "true"} if replace else {}
    return await c.post("/tasks", params=params, headers=AUTH, files={"delta": ("d.safetensors", data)})


def test_200_concurrent_predictions_over_50_tasks_with_uploads_and_replaces(tmp_path: Path) -> None:
    weights = backbone_file("vit", tmp_path)
    v1 = {f"c{i}": task_delta(f"c{i}", 1000 + i) for i in range(TASKS + NEW)}
    v2 = {f"c{i}": task_delta(f"c{i}", 2000 + i) for i in range(REPLACED)}
    existing, new = [f"c{i}" for i in range(TASKS)], [f"c{i}" for i in range(TASKS, TASKS + NEW)]

    async def reference(url: str) -> dict[tuple[str, int], list[float]]:
        ref = {}
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            for name, data in v1.items():
                assert (await upload(c, data, False)).status_code == 201
                ref[(name, 1)] = scores((await predict(c, name)).json())
            for name, data in v2.items():
                assert (await upload(c, data, True)).status_code == 201
                ref[(name, 2)] = scores((await predict(c, name)).json())
        return ref

    async def load(url: str) -> tuple[list[tuple[str, httpx.Response]], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=PREDICTS + 20)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            for name in existing:
                assert (await upload(c, v1[name], False)).status_code == 201
            rng = random.Random(0)
            picks = [rng.choice(existing) for _ in range(PREDICTS)]
            half = PREDICTS // 2
            predicts = [asyncio.create_task(predict(c, name)) for name in picks[:half]]
            replaces = [asyncio.create_task(upload(c, v2[n], True)) for n in v2]
            admin = replaces + [asyncio.create_task(upload(c, v1[n], False)) for n in new]
            # the second half goes out once the first replace is acknowledged, while the rest are in flight
            await asyncio.wait(replaces, return_when=asyncio.FIRST_COMPLETED)
            predicts += [asyncio.create_task(predict(c, name)) for name in picks[half:]]
            answers = await asyncio.gather(*predicts)
            admin_answers = await asyncio.gather(*admin)
            return list(zip(picks, answers, strict=True)), admin_answers

    (tmp_path / "ref").mkdir()
    ref_server = servers.start(tmp_path / "ref", weights)
    try:
        ref = asyncio.run(reference(ref_server.url))
    finally:
        servers.stop(ref_server)
    server = servers.start(tmp_path, weights, max_queue_size=4096)
    try:
        answers, admin = asyncio.run(load(server.url))
        listed = httpx.get(server.url + "/tasks", timeout=30).json()
    finally:
        servers.stop(server)

    assert [r.status_code for r in admin] == [201] * (NEW + REPLACED), [
        r.text for r in admin if r.status_code != 201
    ]
    statuses = [r.status_code for _, r in answers]
    assert statuses == [200] * PREDICTS, {s: statuses.count(s) for s in set(statuses)}
    versions_seen: dict[int, int] = {}
    for name, r in answers:
        body = r.json()
        assert body["task"] == name
        versions_seen[body["version"]] = versions_seen.get(body["version"], 0) + 1
        assert scores(body) == pytest.approx(ref[(name, body["version"])], abs=2e-4), (name, body["version"])
    assert set(versions_seen) == {1, 2}  # replaces landed while predictions were in flight
    print(f"200 predictions over {TASKS} tasks: answers per version {versions_seen}")
    assert len(listed["tasks"]) == TASKS + NEW
