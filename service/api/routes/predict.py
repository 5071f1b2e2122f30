"""Classification: ``POST /tasks/{name}/predict`` with multipart ``image`` files or one raw image body."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.api.deps import get_ready_engine
from service.api.errors import ApiError
from service.api.forms import TaskName, files, media_type, multipart_body, only_fields, parse_multipart
from service.api.schemas import Prediction
from service.api.schemas import error_responses as errors
from service.engine.protocol import MAX_TOP_K

router = APIRouter(prefix="/tasks", tags=["predict"])

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
) -> Response:
    """Top-k labels per image, in request order, sorted by softmax probability."""
    # The hot path stays on the event loop: the engine and settings are looked up here rather than as
    # ``def`` dependencies (FastAPI runs those in its thread pool, a thread hop each), and the answer is
    # serialised once by pydantic-core instead of validated again and encoded by FastAPI
    # (``response_model`` still documents it).
    engine = get_ready_engine(request)
    settings = request.app.state.settings
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
    result = await engine.predict(name, images, top_k)
    return Response(Prediction.of(result).model_dump_json(), media_type="application/json")
