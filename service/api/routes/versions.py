"""Version history and promotion: ``GET /tasks/{name}/versions`` (every kept version, newest first),
``GET /tasks/{name}/versions/{version}`` (one's TaskInfo) and
``POST /tasks/{name}/versions/{version}/promote`` (admin: make a kept version current, atomically; a
rollback is the promotion of an older one), optionally gated on the version's stored evaluation and this
replica's shadow agreement (409 with the numbers when it falls short: the current version keeps
serving). Promotions are written to the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from service.api.audit import audited
from service.api.deps import Admin, EngineDep, ReadyEngineDep, get_settings
from service.api.errors import ApiError
from service.api.forms import TaskName
from service.api.routes.tasks import stored_current_version
from service.api.schemas import GateNumbers, Promotion, TaskInfo, TaskVersions
from service.api.schemas import error_responses as errors
from service.engine.lifecycle import Gate, LifecycleAPI
from service.engine.protocol import EngineAPI

router = APIRouter(prefix="/tasks", tags=["versions"])

Version = Annotated[int, Path(ge=1, le=2**53, description="a version number of the task")]


def lifecycle(engine: EngineAPI) -> LifecycleAPI:
    if not isinstance(engine, LifecycleAPI):
        raise ApiError(404, "not_found", "this server does not keep version history")
    return engine


@router.get("/{name}/versions", response_model=TaskVersions, responses=errors(404, 422, 503))
async def list_versions(name: TaskName, request: Request, engine: EngineDep) -> TaskVersions:
    """Every kept version of the task, newest first, with its current and staged version."""
    history = await lifecycle(engine).task_history(name)
    return TaskVersions(
        name=name,
        current_version=history.head.current,
        staged_version=history.head.staged,
        keep_versions=get_settings(request).keep_versions,
        versions=[TaskInfo.of(v) for v in history.versions],
    )


@router.get("/{name}/versions/{version}", response_model=TaskInfo, responses=errors(404, 422, 503))
async def get_version(name: TaskName, version: Version, engine: EngineDep) -> TaskInfo:
    """One kept version's TaskInfo (404 ``version_not_found`` when the task does not keep it)."""
    return TaskInfo.of(await lifecycle(engine).task_version(name, version))


@router.post(
    "/{name}/versions/{version}/promote",
    response_model=Promotion,
    dependencies=[Admin],
    responses=errors(401, 403, 404, 409, 422, 503),
)
async def promote(
    name: TaskName,
    version: Version,
    request: Request,
    engine: ReadyEngineDep,
    min_accuracy: Annotated[
        float | None, Query(ge=0, le=1, description="gate: the version's metrics.eval.accuracy at least this")
    ] = None,
    min_agreement: Annotated[
        float | None, Query(ge=0, le=1, description="gate: shadow top-1 agreement at least this")
    ] = None,
    min_images: Annotated[
        int | None, Query(ge=1, le=10**9, description="gate: images behind each number asked for")
    ] = None,
) -> Promotion:
    """Make a kept version current on every replica (a rollback when it is older than the current one)."""
    gate = Gate(min_accuracy, min_agreement, min_images)
    api = lifecycle(engine)
    async with audited(request, "promote", name, to_version=version) as facts:
        facts.update(_before(engine, name))
        if facts["from_version"] is not None and version < facts["from_version"]:
            facts["action"] = "rollback"
        result = await api.promote(name, version, None if gate.empty else gate)
        facts.update(sha256=result.task.sha256, from_version=result.previous)
        if not gate.empty:
            facts["detail"] = {"gate": result.numbers}
        action = "rollback" if result.previous is not None and version < result.previous else "promote"
        facts["action"] = action
    return Promotion(
        action=action,
        previous_version=result.previous,
        task=TaskInfo.of(result.task),
        gate=None if gate.empty else GateNumbers.model_validate(result.numbers),
    )


def _before(engine: EngineAPI, name: str) -> dict[str, Any]:
    return {"from_version": stored_current_version(engine, name)}
