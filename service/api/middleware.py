"""Pure ASGI middleware: body limits and a body deadline enforced while the body streams in (uvicorn has
neither), per-route latency metrics plus one structured access-log line per request, and
``Connection: close`` on every response while the server drains.

Pure ASGI rather than ``BaseHTTPMiddleware`` so the body is never buffered before it is counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ApiError, error_body, is_oip

access_log = logging.getLogger("service.api.access")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def too_large(limit: int, what: str = "request body") -> ApiError:
    return ApiError(413, "payload_too_large", f"{what} exceeds the limit of {limit} bytes")


async def _send_error(scope: Scope, send: Send, err: ApiError) -> None:
    body = json.dumps(error_body(err.code, err.message, is_oip(scope.get("path", "")))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    headers.append((b"connection", b"close"))  # the rest of the body is never read
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse a body over ``limit_for(scope)`` bytes: at once from Content-Length, else as soon as the
    streamed bytes pass it; and refuse a body that has not fully arrived within ``timeout_s`` (408)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int], timeout_s: float) -> None:
        self.app, self.limit_for, self.timeout_s = app, limit_for, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared == -1:
            await _send_error(scope, send, ApiError(400, "bad_request", "Content-Length is not a number"))
            return
        if declared is not None and declared > limit:
            await _send_error(scope, send, too_large(limit))
            return
        received = 0
        deadline = time.monotonic() + self.timeout_s
        failure: ApiError | None = None
        started = False

        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, failure, body_done
            if failure is not None:
                raise failure
            if body_done:  # later receives wait for a disconnect: no deadline on those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                failure = ApiError(
                    408, "request_timeout", f"the request body did not arrive within {self.timeout_s:g} s"
                )
                raise failure from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    failure = too_large(limit)
                    raise failure
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ApiError as err:  # raised by limited_receive somewhere no handler caught it
            if err is not failure or started:
                raise
            await _send_error(scope, send, err)


def _content_length(scope: Scope) -> int | None:
    """The declared length; None when absent, -1 when unparseable."""
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


class HttpMetrics:
    """Per-route request metrics in a registry of the app's own (tests make many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "ssf_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "ssf_http_responses",
            "HTTP responses by route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Observe latency by route *template* (bounded label values) and log one JSON line per request."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.latency.labels(method, route).observe(elapsed)
            self.metrics.responses.labels(method, route, str(status)).inc()
            access_log.info(
                "request",
                extra={
                    "http": {
                        "method": method,
                        "path": scope.get("path", ""),
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    }
                },
            )


class CloseWhenDraining:
    """While the server drains (SIGTERM: readiness 503 for the drain delay, then the listener closes), every
    response says ``Connection: close``. A client then opens a new connection for its next request, which
    the closed listener refuses before anything is admitted, instead of reusing a keep-alive connection
    that uvicorn's shutdown may close just as that request arrives (the client would see the connection
    drop with no answer and could not tell whether the request ran)."""

    def __init__(self, app: ASGIApp, draining: Callable[[], bool]) -> None:
        self.app, self.draining = app, draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining():
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)
