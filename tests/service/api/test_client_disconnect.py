"""A client that disconnects while its image body is being read is not a server error: the app answers
499 (nobody reads it) instead of raising into uvicorn as a 500 with a traceback (seen under R1 overload,
where one client-side transport error closed the load generator's other 35 connections mid-body)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.api.app import create_app
from tests.service.api.conftest import make_settings
from tests.service.api.fake_engine import FakeEngine


def test_disconnect_mid_body_is_499_not_500(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(make_settings(), engine=FakeEngine())
    sent: list[dict] = []
    messages = [
        {"type": "http.request", "body": b"\x89PNG\r\n", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/tasks/cats/predict",
        "raw_path": b"/tasks/cats/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"image/png"), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]
