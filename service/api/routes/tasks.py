"""The task registry: list, upload or stage (admin), describe, delete (admin), and the merged ONNX graph
(admin). Uploads, stages and deletes are written to the audit log (``service.api.audit``), refused or not."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from service.api.audit import audited
from service.api.deps import Admin, EngineDep, ReadyEngineDep
from service.api.errors import ApiError
from service.api.forms import (
    TASK_NAME_RE,
    TaskName,
    files,
    media_type,
    multipart_body,
    only_fields,
    parse_multipart,
)
from service.api.schemas import TaskInfo, TaskList
from service.api.schemas import error_responses as errors
from service.engine.lifecycle import LifecycleAPI
from service.engine.protocol import EngineAPI, EngineError, StoreError
from service.tenants.upload import delta_task_name

router = APIRouter(prefix="/tasks", tags=["tasks"])


UPLOAD_BODY = multipart_body(
    ["delta"],
    {
        "delta": {"type": "string", "format": "binary", "description": "ssf-delta file"},
        "name": {
            "type": "string",
            "pattern": TASK_NAME_RE.pattern,
            "description": "overrides the task name in the file",
        },
    },
)


@router.get("", response_model=TaskList)
async def list_tasks(engine: EngineDep) -> TaskList:
    return TaskList(tasks=[TaskInfo.of(t) for t in engine.list_tasks()])


@router.post(
    "",
    status_code=201,
    response_model=TaskInfo,
    dependencies=[Admin],
    openapi_extra=UPLOAD_BODY,
    responses=errors(400, 401, 403, 409, 413, 415, 422, 503),
)
async def upload_task(
    request: Request,
    engine: ReadyEngineDep,
    replace: Annotated[bool, Query(description="replace an existing task with a new version")] = False,
    stage: Annotated[
        bool,
        Query(description="store the new version as the task's staged version: resident, no live traffic"),
    ] = False,
) -> JSONResponse:
    """Upload a delta (multipart field ``delta``); ``name`` overrides the task name inside the file.
    With ``stage=true`` the version is staged instead of made current (with or without a current one)."""
    async with audited(request, "stage" if stage else "upload", None) as facts:
        return await _upload(request, engine, replace, stage, facts)


async def _upload(
    request: Request, engine: EngineAPI, replace: bool, stage: bool, facts: dict[str, Any]
) -> JSONResponse:
    if stage and not isinstance(engine, LifecycleAPI):
        raise ApiError(404, "not_found", "this server does not stage versions")
    if media_type(request) != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data with a file field named 'delta'"
        )
    form = await parse_multipart(request, max_files=1, max_fields=4, max_part_size=1024)
    try:
        only_fields(form, {"delta", "name"})
        deltas = await files(form, "delta")
        if len(deltas) != 1:
            raise ApiError(422, "invalid_parameter", "send exactly one file field named 'delta'")
        name = form.get("name")
        if name is not None and not isinstance(name, str):
            raise ApiError(422, "invalid_parameter", "field 'name' must be text, not a file")
    finally:
        await form.close()
    data = deltas[0]
    facts.update(sha256=hashlib.sha256(data).hexdigest(), task=name or None)
    if not facts["task"]:
        facts["task"] = delta_task_name(data)
    if facts["task"] and TASK_NAME_RE.fullmatch(facts["task"]):
        facts["from_version"] = stored_current_version(engine, facts["task"])
    # an empty name means "use the name in the file", as when it is left out; the engine checks either
    if stage:
        stored = await engine.stage_task(data, name or None)  # type: ignore[attr-defined]
    else:
        stored = await engine.add_task(data, name or None, replace)
    facts.update(task=stored.name, to_version=stored.version, status=201)
    info = TaskInfo.of(stored)
    return JSONResponse(
        info.model_dump(mode="json"), status_code=201, headers={"Location": f"/tasks/{stored.name}"}
    )


@router.get("/{name}", response_model=TaskInfo, responses=errors(404, 422))
async def get_task(name: TaskName, engine: EngineDep) -> TaskInfo:
    return TaskInfo.of(engine.get_task(name))


@router.delete("/{name}", status_code=204, dependencies=[Admin], responses=errors(401, 403, 404, 422, 503))
async def delete_task(name: TaskName, request: Request, engine: ReadyEngineDep) -> Response:
    """Delete the task: every kept version, its staged version and its history."""
    async with audited(request, "delete", name) as facts:
        facts["from_version"] = stored_current_version(engine, name)
        await engine.delete_task(name)
        facts["status"] = 204
    return Response(status_code=204)


def stored_current_version(engine: EngineAPI, name: str) -> int | None:
    """The task's current version for the audit record, read from the engine's store (not through the
    facade, whose calls are the action's own); None when it has none or it cannot be read."""
    store = getattr(engine, "store", None)
    try:
        return int(store.get(name).version) if store is not None else None
    except (StoreError, EngineError, ValueError):
        return None


@router.get(
    "/{name}/model.onnx",
    dependencies=[Admin],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **errors(401, 403, 404, 422, 503)},
)
async def onnx_model(name: TaskName, engine: ReadyEngineDep) -> Response:
    """The merged ONNX graph of the task's current version (input ``image``, output ``logits``)."""
    data = await engine.onnx_model(name)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}.onnx"'},
    )
