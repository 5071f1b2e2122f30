"""Container tests build images and run docker-compose.yml for real (podman, or a Docker engine where one
answers). They take minutes and need root, podman and mmdebstrap (or a registry), so they are not part of
`make test`: `make compose-e2e` runs them (SSF_COMPOSE_E2E=1), as part of the long tier."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compose: builds images and runs docker-compose.yml (make compose-e2e)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SSF_COMPOSE_E2E") == "1":
        return
    skip = pytest.mark.skip(reason="container e2e: run with `make compose-e2e` (long tier)")
    for item in items:
        if "compose" in item.keywords:
            item.add_marker(skip)
