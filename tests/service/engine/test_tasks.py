"""Task lifecycle through the engine: isolation in mixed batches, versions under replace, replicas
reconciling through a shared store, and every way add_task refuses a delta."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine.engine import Engine
from service.engine.protocol import (
    BackboneUnusable,
    DeltaTooLarge,
    InvalidDelta,
    InvalidParameter,
)
from service.store.base import StoredTask, StoreUnavailable, TaskExists, TaskNotFound
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.deltas import reference_logits as reference
from tests.helpers.images import images
from tests.helpers.models import MODELS, backbone_file
from tests.helpers.real_engine import probs, run, vit_engine
from tests.helpers.stores import MemoryStore

FAMILY = "vit"


def test_prediction_does_not_depend_on_batch_mates(weights_dir: Path) -> None:
    models = [make_task(FAMILY, seed=i) for i in range(4)]
    batch = images(2, seed=3)

    async def scenario(engine: Engine) -> None:
        for i, m in enumerate(models):
            await engine.add_task(delta_bytes(FAMILY, m, f"t{i}"), None, replace=False)
        alone = probs(await engine.predict("t0", batch, top_k=5))
        crowd = await asyncio.gather(*(engine.predict(f"t{i}", batch, top_k=5) for i in (1, 0, 2, 3)))
        together = probs(crowd[1])
        assert (alone - together).abs().max() <= 1e-5
        for i, r in zip((1, 0, 2, 3), crowd, strict=True):  # and nobody got a neighbour's answer
            want = torch.softmax(reference(models[i], engine.preprocess(batch)), -1)
            assert (probs(r) - want).abs().max() <= 1e-4

    run(vit_engine(weights_dir, path_policy="mixed", max_queue_delay_ms=100), scenario)


@pytest.mark.parametrize("policy", ["mixed", "merged"])
def test_replace_while_requests_are_in_flight(weights_dir: Path, policy: str) -> None:
    v1, v2 = make_task(FAMILY, seed=10), make_task(FAMILY, seed=11)
    batch = images(1, seed=5)

    async def scenario(engine: Engine) -> None:
        await engine.add_task(delta_bytes(FAMILY, v1, "swap"), None, replace=False)
        before = [asyncio.create_task(engine.predict("swap", batch, top_k=5)) for _ in range(6)]
        await asyncio.sleep(0.01)  # they hold version 1 and wait in the queue
        stored = await engine.add_task(delta_bytes(FAMILY, v2, "swap"), None, replace=True)
        assert stored.version == 2
        after = [asyncio.create_task(engine.predict("swap", batch, top_k=5)) for _ in range(6)]
        results = await asyncio.gather(*before, *after)
        x = engine.preprocess(batch)
        want = {1: torch.softmax(reference(v1, x), -1), 2: torch.softmax(reference(v2, x), -1)}
        assert (want[1] - want[2]).abs().max() > 1e-2
        for r in results:
            assert (probs(r) - want[r.version]).abs().max() <= 1e-4
        assert {r.version for r in results[:6]} == {1} and {r.version for r in results[6:]} == {2}
        await asyncio.sleep(0.05)
        assert engine.backend.tables.rows_used == 1  # version 1's row was freed once nobody held it
        assert ("swap", 1) not in engine.backend.cache

    run(vit_engine(weights_dir, path_policy=policy, max_queue_delay_ms=50), scenario)


def test_replicas_follow_each_other_through_the_store(weights_dir: Path) -> None:
    store = MemoryStore()
    v1, v2 = make_task(FAMILY, seed=20), make_task(FAMILY, seed=21)
    batch = images(1, seed=9)

    async def scenario() -> None:
        a, b = vit_engine(weights_dir, store), vit_engine(weights_dir, store)
        await a.start()
        await b.start()
        try:
            await a.add_task(delta_bytes(FAMILY, v1, "shared"), None, replace=False)
            assert (await b.predict("shared", batch, 3)).version == 1  # a miss checks the store
            await a.add_task(delta_bytes(FAMILY, v2, "shared"), None, replace=True)
            await b.reconcile()
            r = await b.predict("shared", batch, 5)
            want = torch.softmax(reference(v2, b.preprocess(batch)), -1)
            assert r.version == 2 and (probs(r) - want).abs().max() <= 1e-4
            await a.delete_task("shared")
            await b.reconcile()
            with pytest.raises(TaskNotFound):
                await b.predict("shared", batch, 3)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_start_loads_stored_tasks_and_skips_bad_ones(weights_dir: Path) -> None:
    store = MemoryStore()
    store.put("good", delta_bytes(FAMILY, make_task(FAMILY, seed=30), "good"), {})
    store.put("broken", b"not a delta at all", {})
    other = make_task("convnext", seed=1)
    store.put("foreign", delta_bytes("convnext", other, "foreign"), {})

    async def scenario(engine: Engine) -> None:
        assert engine.ready
        assert set(engine.residency.entries) == {"good"}
        assert engine.metrics.registry.get_sample_value("ssf_engine_tasks_resident") == 1
        assert (await engine.predict("good", images(1), 2)).version == 1
        with pytest.raises(TaskNotFound):
            await engine.predict("broken", images(1), 2)

    run(vit_engine(weights_dir, store), scenario)


def test_add_task_refusals(weights_dir: Path) -> None:
    model = make_task(FAMILY, seed=40)
    data = delta_bytes(FAMILY, model, "named-in-file")

    async def scenario(engine: Engine) -> None:
        with pytest.raises(InvalidDelta) as e:
            await engine.add_task(b"garbage" * 10, None, replace=False)
        assert e.value.code == "malformed_delta"
        with pytest.raises(InvalidDelta) as e:
            await engine.add_task(delta_bytes("convnext", make_task("convnext", 0), "x"), None, replace=False)
        assert e.value.code == "fingerprint_mismatch"
        with pytest.raises(DeltaTooLarge):
            await engine.add_task(b"x" * 20_000_000, None, replace=False)
        with pytest.raises(InvalidParameter):
            await engine.add_task(data, "Not A Valid Name", replace=False)
        with pytest.raises(InvalidParameter):  # fullmatch: a trailing newline passes a "$" regex
            await engine.add_task(data, "renamed\n", replace=False)
        stored = await engine.add_task(data, None, replace=False)  # name from the file
        assert stored.name == "named-in-file" and stored.info["num_classes"] == 5
        assert stored.info["backbone_fingerprint"] == engine.spec.fingerprint
        with pytest.raises(TaskExists):
            await engine.add_task(data, None, replace=False)
        renamed = await engine.add_task(data, "renamed", replace=False)
        assert renamed.name == "renamed" and renamed.version == 1
        assert [t.name for t in engine.list_tasks()] == ["named-in-file", "renamed"]
        with pytest.raises(InvalidParameter):
            await engine.predict("renamed", images(1), top_k=0)
        with pytest.raises(TaskNotFound):
            await engine.predict("nobody", images(1), top_k=1)
        info = engine.backbone_info()
        assert info["model"] == "test_vit" and info["input_size"] == [3, 160, 160]
        assert info["fingerprint"].startswith("sha256:")

    run(vit_engine(weights_dir, max_delta_bytes=10_000_000), scenario)


def test_change_notice_from_another_thread_is_followed(weights_dir: Path) -> None:
    store = MemoryStore()
    v1, v2 = make_task(FAMILY, seed=70), make_task(FAMILY, seed=71)

    async def scenario(engine: Engine) -> None:
        await engine.add_task(delta_bytes(FAMILY, v1, "hinted"), None, replace=False)
        store.put("hinted", delta_bytes(FAMILY, v2, "hinted"), {}, replace=True)  # another replica's write
        await asyncio.to_thread(store._callbacks[0], "hinted")  # its notice, delivered on a foreign thread
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.residency.entries["hinted"].version == 2:
                break
        assert (await engine.predict("hinted", images(1), 1)).version == 2
        store.delete("hinted")
        await asyncio.to_thread(store._callbacks[0], "hinted")
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "hinted" not in engine.residency.entries:
                break
        assert engine.metrics.registry.get_sample_value("ssf_engine_tasks_resident") == 0

    run(vit_engine(weights_dir, store), scenario)


@pytest.mark.parametrize("policy", ["mixed", "merged"])
def test_bfloat16_engine_stays_close_to_the_fp32_reference(weights_dir: Path, policy: str) -> None:
    model = make_task(FAMILY, seed=80)
    batch = images(2, seed=4)

    async def scenario(engine: Engine) -> None:
        await engine.add_task(delta_bytes(FAMILY, model, "half"), None, replace=False)
        got = probs(await engine.predict("half", batch, top_k=5))
        want = torch.softmax(reference(model, engine.preprocess(batch)), -1)
        assert (got - want).abs().max() <= 5e-2
        assert engine.backbone_info()["dtype"] == "bfloat16"

    run(vit_engine(weights_dir, path_policy=policy, dtype="bfloat16"), scenario)


class FlakyStore(MemoryStore):
    """A registry that is down until ``up`` is set (Redis restarting)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False

    def _check(self) -> None:
        if not self.up:
            raise StoreUnavailable("registry unreachable")

    def get(self, name: str) -> StoredTask:
        self._check()
        return super().get(name)

    def versions(self) -> dict[str, int]:
        self._check()
        return super().versions()


def test_registry_down_at_start_answers_503_then_recovers(weights_dir: Path) -> None:
    store = FlakyStore()
    store.put("later", delta_bytes(FAMILY, make_task(FAMILY, seed=95), "later"), {})

    async def scenario(engine: Engine) -> None:
        assert engine.ready
        with pytest.raises(StoreUnavailable):  # 503, not 404: the engine cannot know yet
            await engine.predict("later", images(1), 1)
        store.up = True
        await engine.reconcile()
        assert (await engine.predict("later", images(1), 1)).version == 1

    run(vit_engine(weights_dir, store), scenario)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_delta_that_fails_to_build_leaves_the_old_version_serving(weights_dir: Path, backend: str) -> None:
    """R8: the failure is injected after the task's row is taken (both backends mix tasks)."""
    v1, v2 = make_task(FAMILY, seed=150), make_task(FAMILY, seed=151)
    batch = images(1, seed=6)

    async def scenario(engine: Engine) -> None:
        await engine.add_task(delta_bytes(FAMILY, v1, "steady"), None, replace=False)
        install = engine.backend.install

        def broken(entry: Any) -> None:
            install(entry)  # the row is taken, then it fails
            raise RuntimeError("injected install failure")

        engine.backend.install = broken  # type: ignore[method-assign]
        with pytest.raises(InvalidDelta) as e:
            await engine.add_task(delta_bytes(FAMILY, v2, "steady"), None, replace=True)
        assert e.value.code == "build_failed"
        assert engine.get_task("steady").version == 1  # the store never saw version 2
        r = await engine.predict("steady", batch, top_k=5)
        want = torch.softmax(reference(v1, engine.preprocess(batch)), -1)
        assert r.version == 1 and (probs(r) - want).abs().max() <= 1e-4
        # the failed upload's row went back (torch, and ONNX's mixed graph) and no session was kept for it
        b: Any = engine.backend
        assert (b.tables if backend == "torch" else b.mixed.tables).rows_used == 1
        if backend == "onnx":
            assert ("steady", 2) not in b.sessions

    run(vit_engine(weights_dir, backend=backend), scenario)


def test_a_scheme_with_unfoldable_sites_is_refused_at_start(weights_dir: Path) -> None:
    """Paper-scheme ConvNeXt has an affine on the residual stream that no merged copy could hold."""
    engine = Engine(
        MODELS["convnext"], backbone_file("convnext", weights_dir), MemoryStore(), site_scheme="paper"
    )
    with pytest.raises(BackboneUnusable, match="foldable"):  # a StartupError: no traceback in the log
        asyncio.run(engine.start())
    asyncio.run(engine.stop())


def test_label_limit_is_the_servers(weights_dir: Path) -> None:
    """SSF_MAX_LABELS: a delta within the file format's own cap but above the server's is refused with a
    named code, and nothing is stored."""
    store = MemoryStore()
    data = delta_bytes(FAMILY, make_task(FAMILY, seed=41, num_classes=5), "many")

    async def scenario(engine: Engine) -> None:
        with pytest.raises(InvalidDelta) as e:
            await engine.add_task(data, None, replace=False)
        assert e.value.code == "too_many_labels" and "at most 4" in str(e.value)
        assert engine.list_tasks() == []

    run(vit_engine(weights_dir, store, max_labels=4), scenario)
    assert store.list() == []
