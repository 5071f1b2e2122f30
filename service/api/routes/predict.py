"""Classification: ``POST /tasks/{name}/predict`` with multipart ``image`` files or one raw image body."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.api.auth import Perm, check
from service.api.deps import get_ready_engine
from service.api.errors import ApiError
from service.api.forms import TaskName, files, media_type, multipart_body, only_fields, parse_multipart
from service.api.schemas import Prediction
from service.api.schemas import error_responses as errors
from service.engine.lifecycle import LifecycleAPI
from service.engine.protocol import MAX_TOP_K

router = APIRouter(prefix="/tasks", tags=["predict"])

VERSION_HEADER = "X-SSF-Version"


def explicit_version(request: Request, name: str, version: int | None) -> int | None:
    """The version an admin asked to be answered by (``?version=`` or the ``X-SSF-Version`` header):
    live traffic never reaches a staged version, so asking for one takes the task's admin token."""
    header = request.headers.get(VERSION_HEADER)
    if header is not None:
        if not header.strip().isdigit() or not 1 <= int(header) <= 2**53:
            raise ApiError(422, "invalid_parameter", f"{VERSION_HEADER} must be a version number")
        if version is not None and int(header) != version:
            raise ApiError(422, "invalid_parameter", f"?version= and {VERSION_HEADER} disagree")
        version = int(header)
    if version is not None:
        check(request, Perm.TASK_ADMIN, request.app.state.settings, request.app.state.tenants)
    return version


BINARY = {"type": "string", "format": "binary"}
PREDICT_BODY = multipart_body(
    ["image"],
    {"image": {"type": "array", "minItems": 1, "items": BINARY}},
    **{kind: BINARY for kind in ("image/jpeg", "image/png", "image/webp", "image/bmp")},
)


@router.post(
    "/{name}/predict",
    response_model=Prediction,
    openapi_extra=PREDICT_BODY,
    responses=errors(400, 404, 413, 415, 422, 429, 503),
)
async def predict(
    name: TaskName,
    request: Request,
    top_k: Annotated[
        # documented here; the engine checks the range (check_top_k), so every engine answers alike
        int, Query(description="labels per image", json_schema_extra={"minimum": 1, "maximum": MAX_TOP_K})
    ] = 5,
    version: Annotated[
        int | None,
        Query(
            ge=1,
            le=2**53,
            description="admin only: answer with this version, the current or the staged one "
            f"(also the {VERSION_HEADER} header)",
        ),
    ] = None,
) -> Response:
    """Top-k labels per image, in request order, sorted by softmax probability."""
    # The hot path stays on the event loop: the engine and settings are looked up here rather than as
    # ``def`` dependencies (FastAPI runs those in its thread pool, a thread hop each), and the answer is
    # serialised once by pydantic-core instead of validated again and encoded by FastAPI
    # (``response_model`` still documents it).
    engine = get_ready_engine(request)
    settings = request.app.state.settings
    version = explicit_version(request, name, version)
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await parse_multipart(
            request,
            max_files=settings.max_images_per_request,
            max_fields=16,
            max_part_size=64 * 1024,
        )
        try:
            only_fields(form, {"image"})
            images = await files(form, "image")
        finally:
            await form.close()
        if not images:
            raise ApiError(422, "invalid_parameter", "send one or more file fields named 'image'")
    elif kind.startswith("image/"):
        images = [await request.body()]
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {kind or 'none'!r} is not accepted: send multipart/form-data with 'image' "
            "file fields, or one image with an image/* Content-Type",
        )
    if version is not None:
        if not isinstance(engine, LifecycleAPI):
            raise ApiError(404, "not_found", "this server does not answer with a chosen version")
        result = await engine.predict_version(name, images, top_k, version)
    else:
        result = await engine.predict(name, images, top_k)
    return Response(Prediction.of(result).model_dump_json(), media_type="application/json")
