"""The model thread holds the process's only multi-threaded OpenMP team: the CPU pool and the event loop's
thread run torch ops single-threaded while the engine runs (more OpenMP threads than cores make libgomp
stop spinning between parallel regions, which slowed every forward by a fifth), and stop() gives the event
loop's thread its threads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.engine.engine import Engine
from tests.helpers.images import images
from tests.helpers.real_engine import run, vit_engine


@pytest.mark.parametrize("configured", [0, 1])
def test_only_the_model_thread_runs_torch_ops_on_several_threads(weights_dir: Path, configured: int) -> None:
    before = torch.get_num_threads()

    async def scenario(engine: Engine) -> None:
        assert await engine.workers.on_model(torch.get_num_threads) == (configured or before)
        assert await engine.workers.on_cpu(torch.get_num_threads) == 1
        assert torch.get_num_threads() == 1  # the event loop's thread (top-k after each batch runs here)
        assert engine.preprocess(images(1)).shape[0] == 1

    run(vit_engine(weights_dir, torch_threads=configured), scenario)
    assert torch.get_num_threads() == before
