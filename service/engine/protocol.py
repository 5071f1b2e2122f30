"""What the HTTP layer may ask of the engine, and the domain errors it raises.

The api package maps each error to a status code once (one exception table); nothing here knows HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from service.store.base import StoredTask, StoreError, StoreUnavailable, TaskExists, TaskNotFound


class EngineError(Exception):
    """Base of domain errors. ``code`` is the snake_case error code sent to clients."""

    code = "engine_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidDelta(EngineError):  # 422; code comes from ssf.DeltaError.code (fingerprint_mismatch, ...)
    code = "invalid_delta"


class DeltaTooLarge(EngineError):  # 413
    code = "delta_too_large"


class BadImage(EngineError):  # 400; the message says which image (by index) and why
    code = "bad_image"


class ImageTooLarge(EngineError):  # 413 (pixels, bytes, images per request)
    code = "payload_too_large"


class UnsupportedMediaType(EngineError):  # 415
    code = "unsupported_media_type"


class InvalidParameter(EngineError):  # 422
    code = "invalid_parameter"


class Overloaded(EngineError):  # 429 with Retry-After
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(EngineError):  # 503 with Retry-After (draining, not ready, registry down)
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Unavailable):  # 503: the request's deadline passed while it waited; it never ran
    code = "deadline_exceeded"


@dataclass(frozen=True)
class Scored:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class PredictionResult:
    task: str
    version: int
    predictions: list[list[Scored]] = field(default_factory=list)


class EngineAPI(Protocol):
    """The facade the routes call (held on app.state.engine)."""

    ready: bool

    # backbone_info: model, fingerprint, input_size, site_scheme, backend, device, dtype
    def backbone_info(self) -> dict[str, Any]: ...

    def list_tasks(self) -> list[StoredTask]: ...

    def get_task(self, name: str) -> StoredTask: ...

    async def add_task(self, data: bytes, name: str | None, replace: bool) -> StoredTask: ...

    async def delete_task(self, name: str) -> None: ...

    async def predict(self, name: str, images: list[bytes], top_k: int) -> PredictionResult: ...

    async def onnx_model(self, name: str) -> bytes: ...


__all__ = [
    "BadImage",
    "DeadlineExceeded",
    "DeltaTooLarge",
    "EngineAPI",
    "EngineError",
    "ImageTooLarge",
    "InvalidDelta",
    "InvalidParameter",
    "Overloaded",
    "PredictionResult",
    "Scored",
    "StoreError",
    "StoreUnavailable",
    "StoredTask",
    "TaskExists",
    "TaskNotFound",
    "Unavailable",
    "UnsupportedMediaType",
]
