"""The audit log (operator): ``GET /audit?task=&limit=``, the newest records of admin actions, read from
the task store, so every replica answers with the same log."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query

from service.api.deps import Admin, EngineDep
from service.api.errors import ApiError
from service.api.forms import TASK_NAME_RE
from service.api.schemas import AuditLog, AuditRecord
from service.api.schemas import error_responses as errors

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=AuditLog, dependencies=[Admin], responses=errors(401, 403, 422, 503))
async def read_audit(
    engine: EngineDep,
    task: Annotated[
        str | None, Query(max_length=63, pattern=TASK_NAME_RE.pattern, description="only this task's records")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="the newest this many records")] = 100,
) -> AuditLog:
    """Admin actions (upload, stage, promote, rollback, delete, evaluate), oldest first."""
    store: Any = getattr(engine, "store", None)
    if store is None or not hasattr(store, "read_audit"):
        raise ApiError(404, "not_found", "this server keeps no audit log")
    records = await asyncio.to_thread(store.read_audit, task, limit)
    return AuditLog(records=[AuditRecord(**r) for r in records])
