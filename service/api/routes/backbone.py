"""The one backbone every task shares."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import EngineDep
from service.api.errors import ApiError
from service.api.schemas import BackboneInfo, ErrorBody

router = APIRouter(tags=["backbone"])


@router.get("/backbone", response_model=BackboneInfo, responses={503: {"model": ErrorBody}})
async def backbone(engine: EngineDep) -> BackboneInfo:
    if not engine.ready:
        raise ApiError(503, "not_ready", "the backbone is still loading", {"Retry-After": "1"})
    return BackboneInfo(**engine.backbone_info())
