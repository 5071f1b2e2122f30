"""What the HTTP layer may ask of the engine (``EngineAPI``), the domain errors it raises, and the request
rules every engine applies the same way (``check_top_k``, ``check_delta_size``).

The api package maps each error to a status code once (one exception table); nothing here knows HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from prometheus_client import CollectorRegistry

from service.store.base import (
    TASK_NAME,
    StoredTask,
    StoreError,
    StoreUnavailable,
    TaskExists,
    TaskNotFound,
)


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


class VersionNotFound(EngineError):  # 404: the task exists, but this version is not the one it serves
    code = "version_not_found"


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


class StartupError(Exception):
    """The engine cannot start with what it was given; the message says what to fix (logged without a
    traceback: it is the operator's input, not a bug)."""


class BackboneUnusable(StartupError):
    """The backbone cannot be loaded or served: unknown model, weights that do not fit, unfoldable sites."""


class DeviceUnavailable(StartupError):
    """The device asked for is not there (``--device cuda`` without CUDA)."""


class StoreUnusable(StartupError):
    """The task registry cannot be opened (a malformed URL, a path that is not a directory)."""


MAX_TOP_K = 1000  # the most labels per image a prediction may ask for


def check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidParameter(f"top_k must be an integer from 1 to {MAX_TOP_K}")


def check_task_name(name: str) -> str:
    """A name a client chose (a URL path, an upload's ``name`` or the name inside the delta) against the
    registry's pattern; ``fullmatch``, since ``$`` alone would let "name\\n" through."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        shown = str(name) if len(str(name)) <= 80 else str(name)[:80] + "..."
        raise InvalidParameter(
            f"task name {shown!r} must match {TASK_NAME.pattern}", code="invalid_task_name"
        )
    return name


def check_delta_size(size: int, limit: int) -> None:
    if size > limit:
        raise DeltaTooLarge(f"delta is {size} bytes; the limit is {limit}")


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


@dataclass(frozen=True)
class LogitsResult:
    """Raw head outputs, for clients that want more than top-k (the Open Inference Protocol routes)."""

    task: str
    version: int
    labels: list[str]
    logits: np.ndarray  # (N, num_classes) float32, one row per input in request order


@runtime_checkable
class EngineAPI(Protocol):
    """The facade the HTTP app drives (held on ``app.state.engine``): the real ``Engine`` and the test
    engine both implement every member, and a test keeps them in step."""

    ready: bool  # the backbone is loaded and warmed, and the engine is not draining

    async def start(self) -> None:
        """Load and warm up; raise a ``StartupError`` for bad input (weights, device, store)."""
        ...

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, finish what was admitted (up to ``drain_timeout_s``), release everything."""
        ...

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The engine's Prometheus metrics, served at ``GET /metrics``."""
        ...

    # backbone_info: model, fingerprint, input_size, site_scheme, backend, device, dtype
    def backbone_info(self) -> dict[str, Any]: ...

    def list_tasks(self) -> list[StoredTask]: ...

    def get_task(self, name: str) -> StoredTask: ...

    async def add_task(self, data: bytes, name: str | None, replace: bool) -> StoredTask: ...

    async def delete_task(self, name: str) -> None: ...

    async def predict(
        self, name: str, images: list[bytes], top_k: int = 5, timeout_s: float | None = None
    ) -> PredictionResult: ...

    async def infer(
        self,
        name: str,
        inputs: list[bytes] | np.ndarray,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> LogitsResult:
        """Logits for encoded images (like ``predict``) or for preprocessed pixels: a float32 array of
        shape (N, 3, H, W), normalized as the backbone expects. With ``version``, only that version may
        answer (``VersionNotFound`` otherwise)."""
        ...

    async def onnx_model(self, name: str) -> bytes: ...


__all__ = [
    "MAX_TOP_K",
    "BackboneUnusable",
    "BadImage",
    "DeadlineExceeded",
    "DeltaTooLarge",
    "DeviceUnavailable",
    "EngineAPI",
    "EngineError",
    "ImageTooLarge",
    "InvalidDelta",
    "InvalidParameter",
    "LogitsResult",
    "Overloaded",
    "PredictionResult",
    "Scored",
    "StartupError",
    "StoreError",
    "StoreUnavailable",
    "StoreUnusable",
    "StoredTask",
    "TaskExists",
    "TaskNotFound",
    "Unavailable",
    "UnsupportedMediaType",
    "VersionNotFound",
    "check_delta_size",
    "check_task_name",
    "check_top_k",
]
