"""Liveness, readiness and metrics: what load balancers and Prometheus poll."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.errors import ApiError
from service.api.schemas import ErrorBody, Status
from service.engine.protocol import EngineAPI

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status)
@router.get("/livez", response_model=Status, include_in_schema=False)  # the Kubernetes-style name
async def healthz() -> Status:
    """200 while the process runs (liveness); says nothing about the engine."""
    return Status(status="ok")


def check_ready(request: Request) -> None:
    """Readiness, the one rule ``/readyz`` and the protocol's ``/v2/health/ready`` share: 503 until the
    backbone is loaded and warmed, and from the start of a drain."""
    state = request.app.state
    if state.draining:
        raise ApiError(503, "draining", "the server is shutting down", {"Retry-After": "5"})
    engine: EngineAPI | None = state.engine
    if state.start_error is not None:
        raise ApiError(503, "start_failed", "the engine failed to start; see the server log")
    if engine is None or not engine.ready:
        raise ApiError(503, "not_ready", "the backbone is still loading", {"Retry-After": "1"})


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> Response:
    """200 once the backbone is loaded and warmed; 503 before that and from the start of a drain."""
    check_ready(request)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text: the HTTP metrics and, once there is an engine, the engine's registry."""
    state = request.app.state
    text = generate_latest(state.http_metrics.registry)
    engine: EngineAPI | None = state.engine
    if engine is not None:
        text += generate_latest(engine.metrics_registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
