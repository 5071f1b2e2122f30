"""A bounded resident set (SSF_MAX_RESIDENT_TASKS): the least recently used task gives its row back, and
its next request loads it again from the store and answers exactly as before."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from service.engine.engine import Engine
from service.engine.resident_lru import ResidentLRU
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.deltas import reference_logits as reference
from tests.helpers.images import images
from tests.helpers.real_engine import probs, run, vit_engine

FAMILY = "vit"


def test_lru_order_and_bound() -> None:
    lru = ResidentLRU(2)
    assert lru.add("a") == [] and lru.add("b") == []
    lru.touch("a")  # b is now the least recently used
    assert lru.add("c") == ["b"]
    assert lru.add("c") == [] and len(lru) == 2  # re-adding a resident name evicts nothing
    lru.discard("a")
    assert lru.add("d") == [] and lru.add("e") == ["c"]
    unbounded = ResidentLRU(0)
    assert all(unbounded.add(str(i)) == [] for i in range(100)) and len(unbounded) == 100


def test_evicted_tasks_reload_on_demand_and_answer_the_same(weights_dir: Path) -> None:
    models = [make_task(FAMILY, seed=20 + i) for i in range(5)]
    batch = images(2, seed=7)

    async def scenario(engine: Engine) -> None:
        for i, m in enumerate(models):
            await engine.add_task(delta_bytes(FAMILY, m, f"t{i}"), None, replace=False)
        residency = engine.residency
        assert sorted(residency.entries) == ["t3", "t4"]  # at most two rows; the oldest went first
        await asyncio.sleep(0.05)
        assert engine.backend.tables.rows_used == 2  # evicted rows went back to the free list
        x = engine.preprocess(batch)
        for _round in range(2):
            for i in (0, 3, 1, 0, 4, 2):  # every cold one is loaded from the store again
                got = probs(await engine.predict(f"t{i}", batch, top_k=5))
                want = torch.softmax(reference(models[i], x), -1)
                assert (got - want).abs().max() <= 1e-4
                assert f"t{i}" in residency.entries and len(residency.entries) <= 2
        await asyncio.sleep(0.05)
        assert engine.backend.tables.rows_used <= 2
        # concurrent requests for cold tasks: each is loaded once, every answer is its own task's
        results = await asyncio.gather(*(engine.predict(f"t{i}", batch, top_k=5) for i in (1, 3, 1, 3)))
        for i, r in zip((1, 3, 1, 3), results, strict=True):
            assert (probs(r) - torch.softmax(reference(models[i], x), -1)).abs().max() <= 1e-4

    run(vit_engine(weights_dir, path_policy="mixed", max_resident_tasks=2), scenario)
