"""The audit log of admin actions: one structured record per upload, stage, promote, rollback, delete and
evaluation, kept in the task store (a Redis stream or a JSON-lines file, bounded by
``SSF_AUDIT_MAX_RECORDS``) so every replica reads the same log at ``GET /audit``.

A route wraps its action in ``audited``; the record is written once, when the action ends, with its
outcome: ``ok`` or the error code it was refused with (a 409 gate, a 404 version, ...). ``record`` builds
the record from the request: who (``request.state.principal``: kind, tenant and the token's id, never the
token), what, on which task and versions. A store that cannot take the record (Redis down) costs a
logged warning, never the action's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from service.api.errors import STORE_CODES, ApiError, status_of
from service.engine.protocol import EngineError
from service.store.base import StoreError

log = logging.getLogger("service.audit")

ACTIONS = ("upload", "stage", "promote", "rollback", "delete", "evaluate")


def principal_fields(request: Request) -> dict[str, Any]:
    """Who made the request, from what authorization found (``service.api.deps.authorize``)."""
    principal = getattr(request.state, "principal", None)
    return {
        "principal": str(getattr(principal, "kind", "anonymous")),
        "tenant": getattr(principal, "tenant", None),
        "token_id": getattr(principal, "token_id", None),
    }


def build(
    request: Request,
    action: str,
    task: str | None,
    *,
    outcome: str = "ok",
    status: int = 200,
    from_version: int | None = None,
    to_version: int | None = None,
    sha256: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "action": action,
        "task": task,
        "from_version": from_version,
        "to_version": to_version,
        "sha256": sha256,
        **principal_fields(request),
        "outcome": outcome,
        "status": status,
        "detail": detail,
    }


def _store(request: Request) -> Any:
    engine = getattr(request.app.state, "engine", None)
    store = getattr(engine, "store", None)
    return store if hasattr(store, "append_audit") else None


async def record(request: Request, action: str, task: str | None, **fields: Any) -> None:
    """Append one record (``build``'s fields) to the store's audit log; a failure is logged, not raised."""
    entry = build(request, action, task, **fields)
    store = _store(request)
    log.info("audit", extra={"audit": entry})
    if store is None:
        return
    try:
        await asyncio.to_thread(store.append_audit, entry)
    except Exception as e:  # the action happened; its answer must not depend on the log
        log.warning("audit record for %s %s not stored: %s", action, task, type(e).__name__)


def _refusal(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, ApiError):
        return exc.code, exc.status
    status = status_of(exc) if isinstance(exc, Exception) else None
    if isinstance(exc, EngineError):
        return exc.code, status or 500
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", 499  # the client went away; the action may or may not have happened
    if isinstance(exc, StoreError):
        code = next((c for cls, c in STORE_CODES.items() if isinstance(exc, cls)), "registry_error")
        return code, status or 500
    return "internal_error", 500


@asynccontextmanager
async def audited(
    request: Request, action: str, task: str | None, **fields: Any
) -> AsyncIterator[dict[str, Any]]:
    """Record the action once it ends: the route fills the yielded dict (``action``, ``from_version``,
    ``to_version``, ``sha256``, ``detail``, ``status``, ``task``); an exception records its error code."""
    facts: dict[str, Any] = {"action": action, "task": task, **fields}
    try:
        yield facts
    except BaseException as e:
        code, status = _refusal(e)
        facts.update(outcome=code, status=status)
        await record(request, facts.pop("action"), facts.pop("task"), **facts)
        raise
    facts.setdefault("status", 200)
    await record(request, facts.pop("action"), facts.pop("task"), **facts)
