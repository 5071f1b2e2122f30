"""``Annotated`` dependency aliases: what a route needs, resolved from ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import check_admin, check_client
from service.api.errors import ApiError
from service.engine.protocol import EngineAPI
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> EngineAPI:
    engine: EngineAPI | None = request.app.state.engine
    if engine is None:
        raise ApiError(503, "unavailable", "the engine is still starting", {"Retry-After": "1"})
    return engine


def get_ready_engine(request: Request) -> EngineAPI:
    """The engine, for routes that need the loaded backbone (predict, uploads, ONNX): 503 before that."""
    engine = get_engine(request)
    if not engine.ready:
        raise ApiError(503, "not_ready", "the backbone is still loading; retry shortly", {"Retry-After": "1"})
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[EngineAPI, Depends(get_engine)]  # the registry views work while loading
ReadyEngineDep = Annotated[EngineAPI, Depends(get_ready_engine)]


# Declares the bearer scheme in the OpenAPI document (so clients and schemathesis know which routes are
# admin); the check itself is ours, for our status codes and error bodies.
bearer = HTTPBearer(auto_error=False, description="the admin token (SSF_ADMIN_TOKEN)")


def require_admin(
    request: Request,
    settings: SettingsDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    check_admin(request, settings)


Admin = Depends(require_admin)


def require_client(
    request: Request,
    settings: SettingsDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    check_client(request, settings)


Client = Depends(require_client)
