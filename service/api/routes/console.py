"""The web console: three static files (no build step, nothing fetched from elsewhere) over the public API.

The page calls the same routes any client does (``GET /tasks``, ``POST /tasks/{name}/predict``, and with a
pasted admin token ``POST /tasks`` and ``DELETE /tasks/{name}``), so it needs no privileges of its own.
Left out of the OpenAPI schema: these are pages, not API operations.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
# the page loads only its own files; inline scripts, other origins and framing are refused
POLICY = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(prefix="/console", include_in_schema=False)


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=media_type, headers=POLICY)


@router.get("")
async def console() -> FileResponse:
    return _file("console.html", "text/html; charset=utf-8")


@router.get("/console.js")
async def script() -> FileResponse:
    return _file("console.js", "text/javascript; charset=utf-8")


@router.get("/console.css")
async def style() -> FileResponse:
    return _file("console.css", "text/css; charset=utf-8")
