"""Fixtures of the engine tests: backbone weights on disk, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backbones")


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # 2 shared cores: more threads only add contention
