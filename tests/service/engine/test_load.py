"""Many tasks under Zipf traffic through the auto scheduler, with replaces mid-stream: every answer matches
the reference of the exact version it names (no cross-task leakage, no torn versions, either path)."""

from __future__ import annotations

import asyncio
import gc
import random
import sys
from pathlib import Path

import pytest
import torch

import ssf
from service.engine.engine import Engine
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.deltas import reference_logits as reference
from tests.helpers.images import images
from tests.helpers.models import FAMILY_VIT as FAMILY
from tests.helpers.real_engine import probs, run, vit_engine

TASKS, REQUESTS, REPLACED = 12, 96, (0, 5)


def test_zipf_traffic_with_replaces_answers_every_request_from_its_own_version(weights_dir: Path) -> None:
    models = {(i, 1): make_task(FAMILY, seed=200 + i) for i in range(TASKS)}
    models.update({(i, 2): make_task(FAMILY, seed=300 + i) for i in REPLACED})
    batch = images(1, seed=11)
    rng = random.Random(0)
    weights = [1 / (k + 1) for k in range(TASKS)]  # Zipf(1.0)
    picks = rng.choices(range(TASKS), weights=weights, k=REQUESTS)

    async def scenario(engine: Engine) -> None:
        for i in range(TASKS):
            await engine.add_task(delta_bytes(FAMILY, models[(i, 1)], f"z{i}"), None, replace=False)
        calls = []
        for n, i in enumerate(picks):
            calls.append(asyncio.create_task(engine.predict(f"z{i}", batch, top_k=5)))
            if n == REQUESTS // 2:
                for j in REPLACED:
                    await engine.add_task(delta_bytes(FAMILY, models[(j, 2)], f"z{j}"), None, replace=True)
            if n % 8 == 0:
                await asyncio.sleep(0.005)
        results = await asyncio.gather(*calls)
        x = engine.preprocess(batch)
        want = {key: torch.softmax(reference(m, x), -1) for key, m in models.items()}
        for i, r in zip(picks, results, strict=True):
            assert r.task == f"z{i}"
            assert (probs(r) - want[(i, r.version)]).abs().max() <= 1e-4, (i, r.version)
        assert {r.version for i, r in zip(picks, results, strict=True) if i == 0} == {1, 2}
        sample = engine.metrics.registry.get_sample_value
        assert sample("ssf_engine_batches_total", {"path": "mixed"}) >= 1
        assert sample("ssf_engine_batches_total", {"path": "merged"}) >= 1  # the hot task filled batches
        assert sample("ssf_engine_tasks_per_batch_sum") > sample("ssf_engine_tasks_per_batch_count")

    run(vit_engine(weights_dir, max_batch_size=8, merged_min_batch=4, max_queue_delay_ms=20), scenario)


def test_torch_threads_bounds_the_forward_and_the_decoding_threads(weights_dir: Path) -> None:
    """SSF_TORCH_THREADS: the model thread and the CPU pool's threads run their ops on that many threads
    (the conftest sets 2 again for the next test)."""
    engine = vit_engine(weights_dir, torch_threads=1)

    async def scenario(engine: Engine) -> None:
        model = await engine.workers.on_model(torch.get_num_threads)
        cpu = await engine.workers.on_cpu(torch.get_num_threads)
        assert (model, cpu) == (1, 1)

    run(engine, scenario)


def test_the_engine_sets_the_switch_interval_while_it_runs_and_gives_it_back(weights_dir: Path) -> None:
    """SSF_GIL_SWITCH_INTERVAL_MS: how long the model thread may wait for the interpreter lock after an op
    while the event loop holds it."""
    before = sys.getswitchinterval()

    async def scenario(engine: Engine) -> None:
        assert sys.getswitchinterval() == pytest.approx(0.0015)

    run(vit_engine(weights_dir, gil_switch_interval_ms=1.5), scenario)
    assert sys.getswitchinterval() == before


def test_the_heap_is_frozen_while_the_engine_runs(weights_dir: Path) -> None:
    """Once the stored tasks are resident the engine freezes the heap (a full collection would otherwise
    walk the backbone's and every task's objects with the interpreter held, stopping every thread), and
    gives it back to the collector when it stops."""

    async def scenario(engine: Engine) -> None:
        assert gc.get_freeze_count() > 10_000  # the libraries and the backbone, at least
        assert engine.ready

    assert gc.get_freeze_count() == 0
    run(vit_engine(weights_dir), scenario)
    assert gc.get_freeze_count() == 0


def test_a_resident_task_leaves_the_collector_a_few_objects_not_a_few_per_site(weights_dir: Path) -> None:
    """Tasks uploaded after start are not frozen: every full collection walks their objects with the
    interpreter held. The engine keeps each delta's sites packed in one tensor (``ssf.packed``), so a task
    costs the collector a fixed few objects whatever the backbone's number of sites: 26 a task here (the
    tables' growth included) against 215 with a tensor per site's scale and shift (38 sites)."""
    n = 20

    async def scenario(engine: Engine) -> None:
        sites = len(engine.residency.spec.sites)
        gc.collect()
        before = len(gc.get_objects())
        for i in range(n):
            await engine.add_task(delta_bytes(FAMILY, make_task(FAMILY, seed=400 + i), f"g{i}"), None, False)
        gc.collect()
        per_task = (len(gc.get_objects()) - before) / n
        assert sites >= 20  # the bound below would not tell packed from unpacked on a small backbone
        assert per_task < sites, f"{per_task:.1f} tracked objects per task ({sites} sites)"
        entry = engine.residency.entries["g0"]
        assert isinstance(entry.delta.sites, ssf.PackedSites)

    run(vit_engine(weights_dir), scenario)
