"""Tasks with different numbers of classes share one mixed batch (their logits differ in width) on both
backends: each answer has its own task's classes and scores."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from service.engine.engine import Engine
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.deltas import reference_logits as reference
from tests.helpers.images import images
from tests.helpers.models import FAMILY_VIT as FAMILY
from tests.helpers.real_engine import probs, run, vit_engine

CLASSES = (5, 3, 9, 3)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_tasks_of_different_class_counts_share_a_mixed_batch(weights_dir: Path, backend: str) -> None:
    models = [make_task(FAMILY, seed=70 + i, num_classes=k) for i, k in enumerate(CLASSES)]
    batch = images(2, seed=5)

    async def scenario(engine: Engine) -> None:
        for i, m in enumerate(models):
            await engine.add_task(delta_bytes(FAMILY, m, f"k{i}"), None, replace=False)
        results = await asyncio.gather(
            *(engine.predict(f"k{i}", batch, top_k=k) for i, k in enumerate(CLASSES))
        )
        sample = engine.metrics.registry.get_sample_value
        assert sample("ssf_engine_batches_total", {"path": "mixed"}) >= 1  # they did share a batch
        assert sample("ssf_engine_tasks_per_batch_sum") > sample("ssf_engine_tasks_per_batch_count")
        x = engine.preprocess(batch)
        for m, k, r in zip(models, CLASSES, results, strict=True):
            got = probs(r)
            assert got.shape == (2, k)
            assert (got - torch.softmax(reference(m, x), -1)).abs().max() <= 1e-4

    run(vit_engine(weights_dir, backend=backend, path_policy="mixed", max_queue_delay_ms=200.0), scenario)
