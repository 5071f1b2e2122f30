"""A tiny backbone with random weights made here and a tiny image folder, shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.images import make_folder
from tests.helpers.models import backbone_file


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("backbone"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
