"""Multipart parsing with explicit limits, so a request with thousands of parts is refused cheaply.

Routes parse their own bodies (instead of FastAPI ``File()`` parameters) for two reasons: auth runs before
a single body byte is read, and parser errors become our error codes instead of FastAPI's generic 400.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.api.errors import ApiError
from service.engine.protocol import check_task_name as check_name
from service.store.base import TASK_NAME

# The registry's pattern (the same as ssf.delta.TASK_NAME_RE; a test keeps them equal), taken from the
# store so that importing the HTTP layer does not import torch.
TASK_NAME_RE = TASK_NAME


async def check_task_name(
    name: Annotated[
        str,
        # documented for clients (and schemathesis); checked below so the error is ours: invalid_task_name
        Path(json_schema_extra={"pattern": TASK_NAME_RE.pattern, "maxLength": 63}),
    ],
) -> str:
    # async although it awaits nothing: FastAPI runs a plain ``def`` dependency in its thread pool, a
    # thread hop (and GIL handoff) per request on the predict path
    return check_name(name)  # 422 invalid_task_name


def multipart_body(
    required: list[str], properties: dict[str, Any], **other: dict[str, Any]
) -> dict[str, Any]:
    """``openapi_extra`` declaring a route's multipart/form-data body (routes parse their own bodies), plus
    any other content types it accepts (``other``: media type -> schema)."""
    form = {"type": "object", "required": required, "additionalProperties": False, "properties": properties}
    content = {"multipart/form-data": {"schema": form}, **{kind: {"schema": s} for kind, s in other.items()}}
    return {"requestBody": {"required": True, "content": content}}


TaskName = Annotated[str, Depends(check_task_name)]  # a route's {name}, checked before the route runs


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def parse_multipart(
    request: Request, *, max_files: int, max_fields: int, max_part_size: int
) -> FormData:
    """Parse a multipart/form-data body; a malformed body is a 400, too many files a 413."""
    parser = MultiPartParser(
        request.headers,
        request.stream(),
        max_files=max_files,
        max_fields=max_fields,
        max_part_size=max_part_size,
    )
    try:
        return await parser.parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise ApiError(
                413, "too_many_images", f"at most {max_files} files are accepted per request"
            ) from None
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.message}") from None


async def files(form: FormData, field: str) -> list[bytes]:
    """The contents of every file part named ``field``, in request order."""
    out: list[bytes] = []
    for value in form.getlist(field):
        if not isinstance(value, UploadFile):
            raise ApiError(422, "invalid_parameter", f"field {field!r} must be a file part (with a filename)")
        out.append(await value.read())
    return out


def only_fields(form: FormData, allowed: set[str]) -> None:
    """Refuse fields the route does not know (the OpenAPI schema says additionalProperties: false)."""
    unknown = sorted({key for key in form if key not in allowed})
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:3])
        raise ApiError(
            422, "invalid_parameter", f"unexpected form field(s) {shown}; allowed: {sorted(allowed)}"
        )
