"""Response bodies of the HTTP API (docs/api.md), kept apart from the logic that fills them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.engine.protocol import PredictionResult, StoredTask


class ErrorDetail(BaseModel):
    code: str = Field(description="stable snake_case kind of error")
    message: str = Field(description="what is wrong and how to fix it")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str


class BackboneInfo(BaseModel):
    model: str
    fingerprint: str
    input_size: list[int]
    site_scheme: str
    backend: str
    device: str
    dtype: str


class ShadowInfo(BaseModel):
    version: int = Field(description="the staged version compared with the current one")
    requests: int = Field(description="live requests also run on the staged version (this replica)")
    images: int
    agreement: float | None = Field(description="share of images with the same top-1 label in both")
    drift: float | None = Field(
        description="mean total variation distance between the two softmax distributions (0..1)"
    )


class TaskInfo(BaseModel):
    name: str
    version: int
    sha256: str
    num_classes: int
    labels: list[str]
    method: str
    site_scheme: str
    backbone_fingerprint: str
    size_bytes: int
    created_at: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    shadow: ShadowInfo | None = Field(
        None, description="shadow traffic on this replica while the task has a staged version"
    )
    staged_version: int | None = Field(
        None, description="the task's staged version (resident, no live traffic), if any"
    )

    @classmethod
    def of(cls, task: StoredTask) -> TaskInfo:
        info = task.info
        labels = [str(label) for label in info.get("labels", [])]
        return cls(
            name=task.name,
            version=task.version,
            sha256=task.sha256,
            num_classes=int(info.get("num_classes", len(labels))),
            labels=labels,
            method=str(info.get("method", "")),
            site_scheme=str(info.get("site_scheme", "")),
            backbone_fingerprint=str(info.get("backbone_fingerprint", "")),
            size_bytes=task.size_bytes,
            created_at=task.created_at,
            metrics=dict(info.get("metrics") or {}),
            shadow=ShadowInfo(**info["shadow"]) if isinstance(info.get("shadow"), dict) else None,
            staged_version=task.staged_version,
        )


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class ScoredLabel(BaseModel):
    label: str
    index: int
    score: float


class Prediction(BaseModel):
    task: str
    version: int
    predictions: list[list[ScoredLabel]] = Field(description="one list per image, in request order")

    @classmethod
    def of(cls, result: PredictionResult) -> Prediction:
        return cls(
            task=result.task,
            version=result.version,
            predictions=[
                [ScoredLabel(label=s.label, index=s.index, score=s.score) for s in image]
                for image in result.predictions
            ],
        )


class ConfusionMatrix(BaseModel):
    labels: list[str] = Field(description="the version's labels, the order of rows and columns")
    counts: list[list[int]] = Field(description="counts[i][j]: images of label i predicted as label j")


class VersionEvaluation(BaseModel):
    version: int
    current: bool = Field(description="whether this version was the current one when it was evaluated")
    images: int
    accuracy: float = Field(description="share of images whose top-1 label is their label")
    per_class_accuracy: dict[str, float | None] = Field(
        description="accuracy over the images of each label; null for a label no image had"
    )
    confusion_matrix: ConfusionMatrix
    mean_confidence: float = Field(description="mean top-1 softmax probability")
    calibration_error: float = Field(
        description="expected calibration error over calibration_bins equal-width confidence bins"
    )
    calibration_bins: int
    evaluated_at: str


class Evaluation(BaseModel):
    task: str
    images: int
    results: list[VersionEvaluation] = Field(description="the current version first, then ?version=")


class EvaluationJob(BaseModel):
    id: str
    task: str
    state: str = Field(description="queued, running, done or failed")
    images: int
    done_images: int = Field(description="images scored so far")
    version: int | None = Field(description="the other version asked for with ?version=, if any")
    created_at: str
    finished_at: str | None = None
    status_url: str
    result: Evaluation | None = Field(None, description="once done")
    error: ErrorDetail | None = Field(None, description="once failed")


class TaskVersions(BaseModel):
    name: str
    current_version: int | None = Field(description="the version answering live traffic; null: none yet")
    staged_version: int | None = Field(description="the staged version, if any")
    keep_versions: int = Field(description="how many versions the task keeps (SSF_KEEP_VERSIONS)")
    versions: list[TaskInfo] = Field(description="every kept version, newest first")


class GateNumbers(BaseModel):
    accuracy: float | None = Field(None, description="metrics.eval.accuracy of the promoted version")
    eval_images: int | None = Field(None, description="images behind that accuracy")
    agreement: float | None = Field(None, description="shadow top-1 agreement with the current version")
    shadow_images: int | None = Field(None, description="images behind that agreement")


class Promotion(BaseModel):
    action: str = Field(description="promote (a newer version than the current one) or rollback")
    previous_version: int | None = Field(description="the version that was current before")
    task: TaskInfo = Field(description="the task with the promoted version current")
    gate: GateNumbers | None = Field(None, description="what the gate read, when one was asked")


class AuditRecord(BaseModel):
    time: str = Field(description="ISO-8601 UTC, milliseconds")
    action: str = Field(description="upload, stage, promote, rollback, delete or evaluate")
    task: str | None
    from_version: int | None = Field(None, description="the current version before the action")
    to_version: int | None = Field(None, description="the version the action made, staged or promoted")
    sha256: str | None = Field(None, description="of the delta the action concerns")
    principal: str = Field(description="operator, admin, client, global_client or anonymous")
    tenant: str | None = None
    token_id: str | None = Field(None, description="the token's id (never the token itself)")
    outcome: str = Field(description="ok, or the error code the action was refused with")
    status: int = Field(description="the HTTP status answered")
    detail: dict[str, Any] | None = Field(None, description="action-specific facts (a gate's numbers)")


class AuditLog(BaseModel):
    records: list[AuditRecord] = Field(description="oldest first, the newest `limit`")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's documented error statuses, each with the error body."""
    return {code: {"model": ErrorBody} for code in codes}
