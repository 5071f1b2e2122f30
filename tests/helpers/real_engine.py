"""The real Engine on test_vit for the engine tests: built from the models kit on an in-memory store,
started and stopped around one scenario, and its scores read back as a tensor."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from service.engine.engine import Engine
from service.engine.protocol import PredictionResult
from service.settings import EngineConfig
from tests.helpers.models import FAMILY_VIT, MODELS, backbone_file
from tests.helpers.stores import MemoryStore


def vit_engine(weights_dir: Path, store: MemoryStore | None = None, **config: Any) -> Engine:
    """An engine on ``models.backbone_file("vit", weights_dir)``; ``config`` overrides EngineConfig."""
    # reconcile_interval_s: tests call reconcile() themselves
    settings = {"max_queue_delay_ms": 30.0, "reconcile_interval_s": 3600, **config}
    return Engine(
        MODELS[FAMILY_VIT],
        backbone_file(FAMILY_VIT, weights_dir),
        store if store is not None else MemoryStore(),
        config=EngineConfig(**settings),
    )


def run(engine: Engine, scenario: Callable[[Engine], Awaitable[None]]) -> None:
    async def main() -> None:
        await engine.start()
        try:
            await scenario(engine)
        finally:
            await engine.stop()

    asyncio.run(main())


def probs(result: PredictionResult) -> torch.Tensor:
    """Scores of every class, in class order, one row per image."""
    return torch.tensor([[s.score for s in sorted(row, key=lambda s: s.index)] for row in result.predictions])
