"""S4: size, count and time limits are enforced while the body streams, before any parsing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from service.api.app import create_app
from tests.helpers.api import AUTH, assert_error, make_settings
from tests.helpers.engines import FakeEngine, fake_delta
from tests.helpers.images import png

RAW_PNG = {"Content-Type": "image/png"}


def chunks(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\x00" * min(size, total - sent)
        sent += size


def test_body_over_limit_by_content_length_is_413_at_once(with_task: TestClient) -> None:
    start = time.perf_counter()
    r = with_task.post("/tasks/cats/predict", content=b"\x89PNG" + b"0" * 70_000, headers=RAW_PNG)
    assert_error(r, 413, "payload_too_large")
    assert time.perf_counter() - start < 0.5


def test_chunked_body_over_limit_is_413(with_task: TestClient, engine: FakeEngine) -> None:
    r = with_task.post("/tasks/cats/predict", content=chunks(10 * 1024 * 1024), headers=RAW_PNG)
    assert_error(r, 413, "payload_too_large")
    assert not [c for c in engine.calls if c[0] == "predict"]


def test_chunked_multipart_over_limit_is_413(with_task: TestClient) -> None:
    boundary = b"b0undary"
    head = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'

    def body() -> Iterator[bytes]:
        yield head
        yield from chunks(200 * 1024)

    r = with_task.post(
        "/tasks/cats/predict",
        content=body(),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    )
    assert_error(r, 413, "payload_too_large")


def test_body_under_limit_passes(with_task: TestClient) -> None:
    r = with_task.post("/tasks/cats/predict", content=png() + b"\x00" * 60_000, headers=RAW_PNG)
    assert r.status_code == 200


def test_upload_limit_is_the_delta_limit(client: TestClient) -> None:
    # max_delta_bytes is 32 KiB in these settings: a 40 KiB upload passes the body limit (delta + 64 KiB
    # envelope) and is refused by the delta limit; a 200 KiB upload is refused while streaming.
    r = client.post("/tasks", files={"delta": ("d", b"x" * 40_000)}, headers=AUTH)
    assert_error(r, 413, "delta_too_large")
    r = client.post("/tasks", files={"delta": ("d", b"x" * 200_000)}, headers=AUTH)
    assert_error(r, 413, "payload_too_large")
    r = client.post(
        "/tasks", content=chunks(200_000), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=x"}
    )
    assert_error(r, 413, "payload_too_large")


def test_predict_body_limit_applies_to_uploads_of_other_paths(client: TestClient) -> None:
    # a body larger than max_body_bytes is refused on /tasks/{name} routes even though /tasks allows more
    r = client.post("/tasks/cats/predict", content=b"x" * 80_000, headers=RAW_PNG)
    assert_error(r, 413)


def test_many_fields_or_files_refused_fast(with_task: TestClient) -> None:
    start = time.perf_counter()
    fields = {f"f{i}": "v" for i in range(200)}  # more than the 16 fields a predict may have
    r = with_task.post("/tasks/cats/predict", data=fields, files={"image": ("a.png", png())})
    assert_error(r, 400, "bad_multipart")
    files = [("image", ("a.png", b"\x89PNG"))] * 1_000
    r = with_task.post("/tasks/cats/predict", files=files)
    assert r.status_code == 413  # 1,000 files are ~100 KB of envelope: body limit or file count
    assert time.perf_counter() - start < 1.0


def test_bad_content_length_is_400(with_task: TestClient) -> None:
    r = with_task.post("/tasks/cats/predict", content=png(), headers={**RAW_PNG, "Content-Length": "abc"})
    assert r.status_code == 400


def predict_scope(*headers: tuple[bytes, bytes]) -> dict:
    """``POST /tasks/cats/predict`` with an image body as an ASGI scope, to drive the app without a server."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/tasks/cats/predict",
        "raw_path": b"/tasks/cats/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"image/png"), (b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


def test_slow_body_times_out_with_408() -> None:
    """A client that stops sending its body mid-way (slowloris on the body) is answered 408."""
    app = create_app(make_settings(request_timeout_s=0.3), engine=FakeEngine())
    sent: list[Message] = []
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"\x89PNG", "more_body": True}
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = predict_scope()
    start = time.perf_counter()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    assert time.perf_counter() - start < 2
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    assert b"request_timeout" in sent[1]["body"]


def test_disconnect_mid_body_is_499_not_500(caplog: pytest.LogCaptureFixture) -> None:
    """A client gone while its body is read is not a server error: 499 and an info log, not a 500 with a
    traceback (seen under R1 overload when the load generator's pool closed 35 connections mid-body)."""
    app = create_app(make_settings(), engine=FakeEngine())
    sent: list[Message] = []
    messages: list[Message] = [
        {"type": "http.request", "body": b"\x89PNG\r\n", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO):
        asyncio.run(app(predict_scope((b"content-length", b"1000")), receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_upload_form_field_name_over_part_limit(client: TestClient) -> None:
    r = client.post("/tasks", files={"delta": ("d", fake_delta())}, data={"name": "a" * 5000}, headers=AUTH)
    assert_error(r, 400, "bad_multipart")


def test_no_deadline_once_the_body_is_complete() -> None:
    """Waiting for a disconnect after the body arrived must not turn into a 408."""
    from service.api.middleware import BodyLimitMiddleware

    seen: list[Message] = []

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        seen.append(await receive())
        seen.append(await receive())  # the disconnect, after longer than the deadline

    async def receive() -> Message:
        if not seen:
            return {"type": "http.request", "body": b"abc", "more_body": False}
        await asyncio.sleep(0.3)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing should be sent: {message}")

    mw = BodyLimitMiddleware(app, limit_for=lambda scope: 100, timeout_s=0.1)
    asyncio.run(mw({"type": "http", "headers": []}, receive, send))
    assert [m["type"] for m in seen] == ["http.request", "http.disconnect"]
