"""Fixtures for the HTTP layer: the real app around a fake engine, driven through TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.helpers.api import AUTH, make_settings
from tests.helpers.engines import FakeEngine, fake_delta


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def engine(settings: Settings) -> FakeEngine:
    return FakeEngine(config=settings)


@pytest.fixture
def client(settings: Settings, engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(settings, engine=engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def with_task(client: TestClient) -> TestClient:
    r = client.post("/tasks", files={"delta": ("d.safetensors", fake_delta("cats"))}, headers=AUTH)
    assert r.status_code == 201, r.text
    return client
