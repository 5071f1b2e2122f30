"""The one backbone every task shares."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ReadyEngineDep
from service.api.schemas import BackboneInfo, ErrorBody

router = APIRouter(tags=["backbone"])


@router.get("/backbone", response_model=BackboneInfo, responses={503: {"model": ErrorBody}})
async def backbone(engine: ReadyEngineDep) -> BackboneInfo:
    return BackboneInfo(**engine.backbone_info())
