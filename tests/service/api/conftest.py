"""Fixtures for the HTTP layer: the real app around a fake engine, driven through TestClient."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.settings import Settings
from tests.helpers.engines import FakeEngine, fake_delta

TOKEN = "test-admin-token-7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "model": "test_vit",
        "admin_token": TOKEN,
        "max_body_bytes": 64 * 1024,
        "max_delta_bytes": 32 * 1024,
        "max_images_per_request": 4,
        "drain_delay_s": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


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


def assert_error(response: object, status: int, code: str | None = None) -> dict[str, str]:
    """The documented error shape (docs/api.md), the status, and (when given) the code."""
    r = response
    assert r.status_code == status, (r.status_code, r.text)  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    err: dict[str, str] = body["error"]
    return err
