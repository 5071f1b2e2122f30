"""The Open Inference Protocol (KServe v2) REST routes beside the native ones, over the same engine.

Each task is a model of that name whose one version is the task's current version. Inference goes through
``EngineAPI.infer``: the same admission, queue, batching and limits as ``POST /tasks/{name}/predict``, and
the same auth (client tokens where configured). Errors keep their native statuses and take the protocol's
body, ``{"error": "<message>"}`` (``service.api.errors``). Bodies and the binary extension: ``oip.py``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from service.api import oip
from service.api.deps import ReadyEngineDep
from service.api.errors import ApiError
from service.api.forms import TaskName
from service.api.routes.health import check_ready
from service.engine.protocol import EngineAPI, StoredTask, VersionNotFound

PREFIX = "/v2"
router = APIRouter(prefix=PREFIX, tags=["open inference protocol"])
infer_router = APIRouter(prefix=PREFIX, tags=["open inference protocol"])  # may need client tokens

Version = Annotated[int, Path(ge=1, description="the task's version (an integer, as a string in URLs)")]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": oip.ProtocolError} for code in codes}


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": oip.inline_schema(oip.InferenceRequest)}},
    }
}


@router.get("", response_model=oip.ServerMetadata)
async def server_metadata(request: Request) -> oip.ServerMetadata:
    return oip.ServerMetadata(name="ssf-serve", version=request.app.version, extensions=oip.EXTENSIONS)


@router.get("/health/live", response_model=oip.ServerLive)
async def server_live() -> oip.ServerLive:
    return oip.ServerLive(live=True)


@router.get("/health/ready", response_model=oip.ServerReady, responses=errors(503))
async def server_ready(request: Request) -> oip.ServerReady:
    check_ready(request)
    return oip.ServerReady(ready=True)


def _current(engine: EngineAPI, name: str, version: int | None) -> StoredTask:
    task = engine.get_task(name)
    if version is not None and version != task.version:
        raise VersionNotFound(f"task {name!r} serves version {task.version}, not {version}")
    return task


def _metadata(engine: EngineAPI, task: StoredTask) -> oip.ModelMetadata:
    channels, height, width = engine.backbone_info()["input_size"]
    labels = [str(label) for label in task.info.get("labels", [])]
    k = int(task.info.get("num_classes", len(labels)))
    scores = [oip.TensorMetadata(name=name, datatype="FP32", shape=[-1, k]) for name in oip.OUTPUTS]
    return oip.ModelMetadata(
        name=task.name,
        versions=[str(task.version)],
        platform="ssf",
        inputs=[
            oip.TensorMetadata(name=oip.BYTES_INPUT, datatype="BYTES", shape=[-1]),
            oip.TensorMetadata(name=oip.PIXELS_INPUT, datatype="FP32", shape=[-1, channels, height, width]),
        ],
        outputs=scores,
        parameters={"labels": labels, "num_classes": k, "metrics": dict(task.info.get("metrics") or {})},
    )


@router.get("/models/{name}", response_model=oip.ModelMetadata, responses=errors(404, 422, 503))
async def model_metadata(name: TaskName, engine: ReadyEngineDep) -> oip.ModelMetadata:
    return _metadata(engine, _current(engine, name, None))


@router.get(
    "/models/{name}/versions/{version}", response_model=oip.ModelMetadata, responses=errors(404, 422, 503)
)
async def version_metadata(name: TaskName, version: Version, engine: ReadyEngineDep) -> oip.ModelMetadata:
    return _metadata(engine, _current(engine, name, version))


@router.get("/models/{name}/ready", response_model=oip.ModelReady, responses=errors(404, 422, 503))
async def model_ready(name: TaskName, engine: ReadyEngineDep) -> oip.ModelReady:
    return oip.ModelReady(name=_current(engine, name, None).name, ready=True)


@router.get(
    "/models/{name}/versions/{version}/ready", response_model=oip.ModelReady, responses=errors(404, 422, 503)
)
async def version_ready(name: TaskName, version: Version, engine: ReadyEngineDep) -> oip.ModelReady:
    return oip.ModelReady(name=_current(engine, name, version).name, ready=True)


async def _infer(request: Request, engine: EngineAPI, name: str, version: int | None) -> Response:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding[:20]!r} is not accepted")
    body = await request.body()
    parsed, binary = oip.split_body(body, request.headers.get(oip.HEADER_LENGTH))
    inputs = oip.read_input(parsed, binary)
    wanted = oip.requested_outputs(parsed)
    result = await engine.infer(name, inputs, version)
    content, headers, media_type = oip.encode_response(result, parsed, wanted)
    return Response(content, headers=headers, media_type=media_type)


INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": oip.InferenceResponse,
        "content": {"application/octet-stream": {}},
        "description": "JSON, or with binary outputs the JSON header then the tensors",
    },
    **errors(400, 404, 413, 415, 422, 429, 503),
}


@infer_router.post(
    "/models/{name}/infer",
    response_model=oip.InferenceResponse,
    openapi_extra=INFER_BODY,
    responses=INFER_RESPONSES,
)
async def infer(name: TaskName, request: Request, engine: ReadyEngineDep) -> Response:
    """Logits, probabilities or top-k classes of the task's current version."""
    return await _infer(request, engine, name, None)


@infer_router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=oip.InferenceResponse,
    openapi_extra=INFER_BODY,
    responses=INFER_RESPONSES,
)
async def infer_version(
    name: TaskName, version: Version, request: Request, engine: ReadyEngineDep
) -> Response:
    """As ``infer``; 404 unless ``version`` is the version the task serves."""
    return await _infer(request, engine, name, version)
