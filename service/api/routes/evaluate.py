"""Evaluation (admin): ``POST /tasks/{name}/evaluate`` with labelled images, and the status of a job.

Labelled images come as repeated ``image`` file fields with one ``label`` text field per image, in the
same order, or as one ``archive`` file field: a zip in the ImageFolder layout (``<class>/<image>``),
unpacked in memory by ``service.api.archive``. Up to ``SSF_EVAL_SYNC_MAX_IMAGES`` images are scored
while the request waits (200); more run as a job in this process (202 with a status URL).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData

from service.api.archive import ArchiveLimits, LabelledImages, unpack
from service.api.audit import audited
from service.api.deps import Admin, EngineDep, ReadyEngineDep, SettingsDep
from service.api.errors import ApiError
from service.api.forms import TaskName, files, media_type, multipart_body, only_fields, parse_multipart
from service.api.schemas import (
    ConfusionMatrix,
    ErrorDetail,
    Evaluation,
    EvaluationJob,
    VersionEvaluation,
)
from service.api.schemas import error_responses as errors
from service.engine.eval_jobs import EvalJob, EvalReport, EvaluationAPI, VersionEval
from service.engine.protocol import EngineAPI
from service.settings import Settings

router = APIRouter(prefix="/tasks", tags=["evaluate"])

BINARY = {"type": "string", "format": "binary"}
EVALUATE_BODY = multipart_body(
    [],
    {
        "image": {"type": "array", "items": BINARY, "description": "labelled images, in order"},
        "label": {
            "type": "array",
            "items": {"type": "string", "maxLength": 1024},
            "description": "one label per image, in the same order",
        },
        "archive": {**BINARY, "description": "a zip in the ImageFolder layout: <class>/<image>"},
    },
)


def _evaluator(engine: EngineAPI) -> EvaluationAPI:
    if not isinstance(engine, EvaluationAPI):
        raise ApiError(404, "not_found", "this server does not evaluate tasks")
    return engine


async def _labelled(request: Request, settings: Settings) -> LabelledImages:
    """The labelled images of the request: image/label pairs or one archive."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with 'image' files and 'label' fields, or one 'archive' zip",
        )
    limit = settings.eval_max_images
    form: FormData = await parse_multipart(request, max_files=limit, max_fields=limit + 8, max_part_size=1024)
    try:
        only_fields(form, {"image", "label", "archive"})
        archives = await files(form, "archive")
        images = await files(form, "image")
        labels = form.getlist("label")
    finally:
        await form.close()
    if archives:
        if len(archives) > 1 or images or labels:
            raise ApiError(
                422, "invalid_parameter", "send either one 'archive' or 'image' and 'label' fields, not both"
            )
        archive_limits = ArchiveLimits(
            max_files=limit,
            max_file_bytes=settings.max_body_bytes,
            max_unpacked_bytes=settings.eval_max_unpacked_bytes,
            max_ratio=settings.eval_max_compression_ratio,
        )
        return unpack(archives[0], archive_limits)
    if any(not isinstance(label, str) for label in labels):
        raise ApiError(422, "invalid_parameter", "field 'label' must be text, not a file")
    texts = [str(label) for label in labels]
    return LabelledImages(images, texts, [f"image {i}" for i in range(len(images))])


def _version_eval(result: VersionEval) -> VersionEvaluation:
    return VersionEvaluation(
        version=result.version,
        current=result.current,
        images=result.images,
        accuracy=result.accuracy,
        per_class_accuracy=result.per_class_accuracy,
        confusion_matrix=ConfusionMatrix(labels=result.labels, counts=result.confusion),
        mean_confidence=result.mean_confidence,
        calibration_error=result.calibration_error,
        calibration_bins=result.calibration_bins,
        evaluated_at=result.evaluated_at,
    )


def _evaluation(report: EvalReport) -> Evaluation:
    return Evaluation(
        task=report.task, images=report.images, results=[_version_eval(r) for r in report.results]
    )


def _status_url(job: EvalJob) -> str:
    return f"/tasks/{job.task}/evaluations/{job.id}"


def _job(job: EvalJob) -> EvaluationJob:
    return EvaluationJob(
        id=job.id,
        task=job.task,
        state=job.state,
        images=job.images,
        done_images=job.done_images,
        version=job.version,
        created_at=job.created_at,
        finished_at=job.finished_at,
        status_url=_status_url(job),
        result=_evaluation(job.report) if job.report is not None else None,
        error=ErrorDetail(code=job.error[0], message=job.error[1]) if job.error is not None else None,
    )


@router.post(
    "/{name}/evaluate",
    dependencies=[Admin],
    openapi_extra=EVALUATE_BODY,
    response_model=Evaluation,
    responses={
        202: {"model": EvaluationJob, "description": "a long evaluation started as a job"},
        **errors(400, 401, 403, 404, 413, 415, 422, 429, 503),
    },
)
async def evaluate(
    name: TaskName,
    request: Request,
    engine: ReadyEngineDep,
    settings: SettingsDep,
    version: Annotated[
        int | None, Query(ge=1, description="also score this kept version, in the same batches")
    ] = None,
) -> JSONResponse:
    """Score the current version (and ``version``) on labelled images; results join each version's
    ``metrics.eval``. More than ``SSF_EVAL_SYNC_MAX_IMAGES`` images: 202 and a job's status URL."""
    async with audited(request, "evaluate", name, to_version=version) as facts:  # the audit log
        evaluator = _evaluator(engine)
        facts["from_version"] = engine.get_task(name).version  # 404 before the body is read
        data = await _labelled(request, settings)
        facts["detail"] = {"images": len(data.images)}
        if len(data.images) > settings.eval_sync_max_images:
            job = evaluator.start_evaluation(name, data.images, data.labels, version, data.names)
            body = _job(job).model_dump(mode="json")
            facts.update(status=202, detail={"images": len(data.images), "job": job.id})
            return JSONResponse(body, status_code=202, headers={"Location": _status_url(job)})
        report = await evaluator.evaluate(name, data.images, data.labels, version, data.names)
        facts["detail"] = {
            "images": len(data.images),
            "accuracy": {str(r.version): r.accuracy for r in report.results},
        }
        return JSONResponse(_evaluation(report).model_dump(mode="json"))


@router.get(
    "/{name}/evaluations/{job_id}",
    dependencies=[Admin],
    response_model=EvaluationJob,
    responses=errors(401, 403, 404, 422),
)
async def evaluation_job(
    name: TaskName,
    job_id: Annotated[str, Path(pattern="^[0-9a-f]{16}$", description="the job id from the 202 answer")],
    engine: EngineDep,
) -> EvaluationJob:
    """The state of an evaluation job of this server (and its result once done)."""
    return _job(_evaluator(engine).evaluation_job(name, job_id))
