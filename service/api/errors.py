"""Every error the API can answer, mapped to a status code once, in one table.

The body is always ``{"error": {"code": "<snake_case>", "message": "..."}}``: domain errors from the
engine and store, FastAPI's validation errors, Starlette's 404/405, and anything unexpected (500, logged
with its traceback, never sent to the client: internal names must not leak). Under ``/v2`` (the Open
Inference Protocol) the same errors, with the same statuses, take that protocol's shape,
``{"error": "<message>"}``, which its clients (tritonclient, the KServe SDK) read.
"""

from __future__ import annotations

import logging
import math
import re
from functools import cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.engine.eval_jobs import JobNotFound
from service.engine.lifecycle import GateFailed
from service.engine.protocol import (
    BadImage,
    DeltaTooLarge,
    EngineError,
    ImageTooLarge,
    InvalidDelta,
    InvalidParameter,
    Overloaded,
    StoreError,
    StoreUnavailable,
    TaskExists,
    TaskNotFound,
    Unavailable,
    UnsupportedMediaType,
    VersionNotFound,
)
from service.store.base import InvalidTaskName, VersionNotKept

log = logging.getLogger("service.api")


class ApiError(Exception):
    """An error the HTTP layer itself detects (auth, body limits, request shape)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# The one table: most specific class first (DeadlineExceeded is an Unavailable, TaskExists a StoreError).
STATUS: list[tuple[type[Exception], int]] = [
    (BadImage, 400),
    (TaskNotFound, 404),
    (VersionNotFound, 404),
    (JobNotFound, 404),
    (TaskExists, 409),
    (GateFailed, 409),
    (DeltaTooLarge, 413),
    (ImageTooLarge, 413),
    (UnsupportedMediaType, 415),
    (InvalidTaskName, 422),
    (InvalidDelta, 422),
    (InvalidParameter, 422),
    (Overloaded, 429),
    (Unavailable, 503),
    (StoreUnavailable, 503),
]

STORE_CODES: dict[type[Exception], str] = {
    VersionNotKept: "version_not_found",  # before TaskNotFound: the first match names the code
    TaskNotFound: "task_not_found",
    TaskExists: "task_exists",
    InvalidTaskName: "invalid_task_name",
    StoreUnavailable: "registry_unavailable",
}

# Starlette's own HTTP errors (routing, multipart parsing) get codes too.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
}


OIP_PREFIX = "/v2"  # the Open Inference Protocol's routes (routes/v2.py)


def is_oip(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def error_body(code: str, message: str, oip: bool = False) -> dict[str, Any]:
    return {"error": message} if oip else {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, *, oip: bool = False
) -> JSONResponse:
    return JSONResponse(error_body(code, message, oip), status_code=status, headers=headers)


def _oip(request: Request) -> bool:
    """Answer in the shape of the protocol the request's path speaks."""
    return is_oip(request.url.path)


def status_of(exc: Exception) -> int | None:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, StoreError) and isinstance(exc, ValueError):
        return 422  # the registry refused a value the client chose (e.g. a name)
    return None


def _retry_after(exc: Exception) -> dict[str, str]:
    seconds = getattr(exc, "retry_after_s", 1.0)
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status is None:  # an EngineError or StoreError subclass nobody mapped: a bug on our side
        return await unexpected_error(request, exc)
    if isinstance(exc, EngineError):
        code, message = exc.code, exc.message
    else:
        default = "invalid_parameter" if status == 422 else "registry_error"
        code = next((c for cls, c in STORE_CODES.items() if isinstance(exc, cls)), default)
        message = str(exc) or "the task registry failed"
    headers = _retry_after(exc) if status in (429, 503) else None
    if status == 503 and isinstance(exc, StoreUnavailable):
        message = "the task registry is unreachable; retry later"  # never leak the backend's address
    return error_response(status, code, message, headers, oip=_oip(request))


async def client_disconnected(request: Request, exc: Exception) -> JSONResponse:
    """The client went away while we read its body: nobody is left to answer, and it is not our error
    (was a 500 with a traceback). 499 is nginx's code for it; the access log shows it."""
    log.info("client disconnected during the request body", extra={"path": request.url.path})
    return error_response(499, "client_disconnected", "the client closed the connection", oip=_oip(request))


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers, oip=_oip(request))


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
    return f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid"))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = "; ".join(_describe(e) for e in exc.errors()[:5]) or "invalid request parameters"
    return error_response(422, "invalid_parameter", message, oip=_oip(request))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = HTTP_CODES.get(status, "http_error")
    if status == 404:
        message = f"no route {request.url.path}; see /docs"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        allowed = allowed_methods(request.app, request.url.path)
        if allowed:  # Starlette lists only the first matching route's methods; list every route's
            return error_response(status, code, message, {"Allow": ", ".join(allowed)}, oip=_oip(request))
    else:
        message = str(exc.detail)
    if status >= 500:  # Starlette only raises these for our own bugs
        log.error("http %d on %s: %s", status, request.url.path, exc.detail)
    return error_response(status, code, message, dict(exc.headers or {}), oip=_oip(request))


@cache
def _templates(app: FastAPI) -> list[tuple[re.Pattern[str], list[str]]]:
    out = []
    for template, ops in app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        out.append((re.compile(f"^{pattern}$"), sorted(m.upper() for m in ops)))
    return out


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every documented method of every route template that matches ``path``."""
    return sorted({m for regex, methods in _templates(app) if regex.match(path) for m in methods})


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "internal_error", "an internal error occurred; it has been logged", oip=_oip(request)
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(EngineError, domain_error)
    app.add_exception_handler(StoreError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
