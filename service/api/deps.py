"""``Annotated`` dependency aliases: what a route needs, resolved from ``app.state``; and ``authorize``,
the one dependency every route runs first (``service.api.auth``'s table decides who may call it)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import Perm, check, permission
from service.api.errors import ApiError
from service.engine.protocol import EngineAPI, Overloaded, StoredTask
from service.engine.scheduler import LANE, Lane
from service.settings import Settings
from service.tenants.model import Principal
from service.tenants.service import QuotaExceeded, StorageQuota, Tenants, retry_after
from service.tenants.upload import delta_task_name

audit_log = logging.getLogger("service.audit")

PRIORITY_HEADER = "x-ssf-priority"


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_tenants(request: Request) -> Tenants:
    tenants: Tenants = request.app.state.tenants
    return tenants


def get_engine(request: Request) -> EngineAPI:
    engine: EngineAPI | None = request.app.state.engine
    if engine is None:
        raise ApiError(503, "unavailable", "the engine is still starting", {"Retry-After": "1"})
    return engine


def get_ready_engine(request: Request) -> EngineAPI:
    """The engine, for routes that need the loaded backbone (predict, uploads, ONNX): 503 before that.
    An upload gets it behind ``UploadGuard`` (the name's tenant and the storage quotas)."""
    engine = get_engine(request)
    if not engine.ready:
        raise ApiError(503, "not_ready", "the backbone is still loading; retry shortly", {"Retry-After": "1"})
    principal: Principal | None = getattr(request.state, "principal", None)
    if getattr(request.state, "perm", None) == Perm.UPLOAD and principal is not None:
        return UploadGuard(engine, principal, get_tenants(request))  # type: ignore[return-value]
    return engine


class UploadGuard:
    """The engine as an upload sees it: before the store is written, the task name (the form's, else the
    delta's own) must belong to a tenant admin's tenant, and the owner's max_tasks and max_bytes must hold.
    Concurrent uploads of one tenant on different replicas may overshoot a storage quota by one upload."""

    def __init__(self, engine: EngineAPI, principal: Principal, tenants: Tenants) -> None:
        self._engine, self._principal, self._tenants = engine, principal, tenants

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def add_task(self, data: bytes, name: str | None, replace: bool) -> StoredTask:
        task = name or delta_task_name(data)
        if task is None:  # the engine names the problem (an unreadable delta)
            return await self._engine.add_task(data, name, replace)
        self.check(task, len(data))
        return await self._engine.add_task(data, task, replace)

    async def stage_task(self, data: bytes, name: str | None) -> StoredTask:
        """A staged upload (``POST /tasks?stage=true``): the same name and quota checks."""
        stage = self._engine.stage_task  # type: ignore[attr-defined]  # a LifecycleAPI engine
        task = name or delta_task_name(data)
        if task is None:
            result: StoredTask = await stage(data, name)
            return result
        self.check(task, len(data))
        staged: StoredTask = await stage(data, task)
        return staged

    def check(self, task: str, size: int) -> None:
        p, owner = self._principal, self._tenants.owner(task)
        if not p.is_operator and (owner is None or owner != p.tenant):
            raise ApiError(
                403, "forbidden", f"tenant {p.tenant!r} may only upload tasks named '{p.tenant}.<task>'"
            )
        current = {t.name: t.size_bytes for t in self._engine.list_tasks()}
        try:
            self._tenants.check_storage(task, size, current)
        except StorageQuota as e:
            raise ApiError(403, "quota_exceeded", f"{e.message}: the {e.quota} quota") from None


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[EngineAPI, Depends(get_engine)]  # the registry views work while loading
ReadyEngineDep = Annotated[EngineAPI, Depends(get_ready_engine)]
TenantsDep = Annotated[Tenants, Depends(get_tenants)]


def _lane(request: Request, principal: Principal, tenants: Tenants) -> Lane:
    value = request.headers.get(PRIORITY_HEADER, "interactive").strip().lower()
    if value not in ("interactive", "batch"):
        raise ApiError(422, "invalid_parameter", "X-SSF-Priority must be 'interactive' or 'batch'")
    tenant = principal.tenant or "-"
    return Lane(tenant=tenant, weight=tenants.weight(principal.tenant), batch=value == "batch")


async def authorize(request: Request) -> AsyncIterator[None]:
    """Every route: the permission from the table, the principal, the tenant's rate quotas, its lane in
    the scheduler (fair share), then after the route its images quota, metrics and an audit line."""
    route = request.scope.get("route")
    template = getattr(route, "path", request.url.path)
    perm = permission(request.method, template)
    tenants = get_tenants(request)
    metrics = request.app.state.tenant_metrics
    principal = check(request, perm, get_settings(request), tenants)
    request.state.principal, request.state.perm = principal, perm
    tenant = principal.tenant
    if perm == Perm.PUBLIC:
        yield
        return
    lane = _lane(request, principal, tenants)
    LANE.set(lane)
    if tenant is not None:
        try:
            await tenants.admit(tenant, predict=perm == Perm.PREDICT)
            engine = request.app.state.engine
            scheduler = getattr(engine, "scheduler", None) if perm == Perm.PREDICT else None
            if scheduler is not None:
                scheduler.precheck()  # a full share answers before the body is read
        except QuotaExceeded as e:
            metrics.refused(tenant, e.quota)
            raise ApiError(
                429, "quota_exceeded", str(e), {"Retry-After": retry_after(e.retry_after_s)}
            ) from None
        except Overloaded:
            metrics.refused(tenant, "queue_share")
            raise
    status = "error"
    try:
        yield
        status = "ok"
    except Overloaded:
        if tenant is not None:
            metrics.refused(tenant, "queue_share")
        raise
    finally:
        if tenant is not None and lane.images:
            metrics.images(tenant, lane.images)
            await tenants.charge_images(tenant, lane.images)
        if tenant is not None:
            metrics.request(tenant, status)
        if perm != Perm.PREDICT:
            audit(request, principal, perm, status)


def audit(request: Request, principal: Principal, perm: Perm, outcome: str) -> None:
    """One line per admin action: who (kind, tenant, token id: never the token), what, on which task."""
    audit_log.info(
        "audit",
        extra={
            "audit": {
                "method": request.method,
                "path": request.url.path,
                "permission": perm.value,
                "task": request.path_params.get("name"),
                "principal": principal.kind,
                "tenant": principal.tenant,
                "token_id": principal.token_id,
                "outcome": outcome,
            }
        },
    )


Authorize = Depends(authorize)

# Declares the bearer scheme in the OpenAPI document (so clients and schemathesis know which routes are
# admin); the check itself is ``authorize``'s, from the route table, for our status codes and error bodies.
bearer = HTTPBearer(auto_error=False, description="a bearer token: SSF_ADMIN_TOKEN or a stored token")


async def declare_bearer(_: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Only the OpenAPI declaration: ``authorize`` has checked the request already. ``async``: FastAPI runs
    a plain ``def`` dependency in its thread pool, a thread hop on every request for nothing."""


Admin = Depends(declare_bearer)
Client = Depends(declare_bearer)
