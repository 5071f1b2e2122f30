"""A fake engine that implements the EngineAPI protocol, for the route and status-code matrix.

Its "delta" is JSON ({"task": ..., "labels": [...]}); any image not starting with a PNG or JPEG magic is
undecodable. ``fail_with`` makes the next facade call raise a chosen domain error. It applies the request
rules every engine shares (``check_top_k``, ``check_task_name``, ``check_delta_size`` with its ``config``),
so the HTTP layer's answers do not depend on which engine is behind it;
``tests/service/engine/test_protocol.py`` keeps its members in step with the real ``Engine``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from service.engine.protocol import (
    BadImage,
    InvalidDelta,
    InvalidParameter,
    LogitsResult,
    PredictionResult,
    Scored,
    StoredTask,
    TaskExists,
    TaskNotFound,
    VersionNotFound,
    check_delta_size,
    check_task_name,
    check_top_k,
)
from service.settings import EngineConfig

PNG, JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
FINGERPRINT = "sha256:" + "ab" * 32


def fake_delta(task: str = "cats", labels: list[str] | None = None) -> bytes:
    return json.dumps({"task": task, "labels": labels or ["cat", "dog", "bird"]}).encode()


class FakeEngine:
    def __init__(self, ready: bool = True, config: EngineConfig | None = None) -> None:
        self.ready = ready
        self.config = config if config is not None else EngineConfig()
        self.started = self.stopped = False
        self.tasks: dict[str, StoredTask] = {}
        self.fail_with: Exception | None = None
        self.calls: list[tuple[str, Any]] = []
        self.registry = CollectorRegistry()
        self.predictions = Counter("fake_engine_predictions", "predict calls", registry=self.registry)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.registry

    async def start(self) -> None:
        self.started = True
        self.ready = True

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        self.stopped = True
        self.ready = False

    def _maybe_fail(self, call: str, arg: Any) -> None:
        self.calls.append((call, arg))
        if self.fail_with is not None:
            err, self.fail_with = self.fail_with, None
            raise err

    def backbone_info(self) -> dict[str, Any]:
        self._maybe_fail("backbone_info", None)
        return {
            "model": "test_vit",
            "fingerprint": FINGERPRINT,
            "input_size": [3, 32, 32],
            "site_scheme": "foldable",
            "backend": "torch",
            "device": "cpu",
            "dtype": "float32",
        }

    def list_tasks(self) -> list[StoredTask]:
        self._maybe_fail("list_tasks", None)
        return [self.tasks[n] for n in sorted(self.tasks)]

    def get_task(self, name: str) -> StoredTask:
        self._maybe_fail("get_task", name)
        if name not in self.tasks:
            raise TaskNotFound(name)
        return self.tasks[name]

    async def add_task(self, data: bytes, name: str | None, replace: bool) -> StoredTask:
        self._maybe_fail("add_task", (name, replace))
        check_delta_size(len(data), self.config.max_delta_bytes)
        try:
            parsed = json.loads(data)
        except ValueError:
            raise InvalidDelta("not an ssf-delta file", code="malformed_delta") from None
        task = check_task_name(name or parsed["task"])
        current = self.tasks.get(task)
        if current is not None and not replace:
            raise TaskExists(task)
        labels = parsed["labels"]
        stored = StoredTask(
            name=task,
            version=1 if current is None else current.version + 1,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            created_at="2026-01-01T00:00:00+00:00",
            info={
                "num_classes": len(labels),
                "labels": labels,
                "method": "ssf",
                "site_scheme": "foldable",
                "backbone_fingerprint": FINGERPRINT,
                "metrics": {"val_acc": 0.5},
            },
        )
        self.tasks[task] = stored
        return stored

    async def delete_task(self, name: str) -> None:
        self._maybe_fail("delete_task", name)
        if self.tasks.pop(name, None) is None:
            raise TaskNotFound(name)

    async def predict(
        self, name: str, images: list[bytes], top_k: int = 5, timeout_s: float | None = None
    ) -> PredictionResult:
        self._maybe_fail("predict", (name, len(images), top_k))
        check_top_k(top_k)
        task = self.tasks.get(name)
        if task is None:
            raise TaskNotFound(name)
        for i, image in enumerate(images):
            if not image.startswith((PNG, JPEG)):
                raise BadImage(f"image {i}: not a decodable JPEG, PNG, WebP or BMP")
        self.predictions.inc()
        labels = task.info["labels"]
        k = min(top_k, len(labels))
        scores = [1.0 / (2 ** (j + 1)) for j in range(k)]
        return PredictionResult(
            name,
            task.version,
            [[Scored(labels[j], j, scores[j]) for j in range(k)] for _ in images],
        )

    async def infer(
        self,
        name: str,
        inputs: list[bytes] | np.ndarray,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> LogitsResult:
        """Logits whose softmax ranks class j above class j+1 (what ``predict`` answers), per input."""
        self._maybe_fail("infer", (name, len(inputs), version))
        task = self.tasks.get(name)
        if task is None:
            raise TaskNotFound(name)
        if version is not None and version != task.version:
            raise VersionNotFound(f"task {name!r} serves version {task.version}, not {version}")
        if isinstance(inputs, np.ndarray):
            if inputs.dtype != np.float32 or inputs.ndim != 4 or inputs.shape[1:] != (3, 32, 32):
                raise InvalidParameter("pixels must be float32 [N, 3, 32, 32]", code="invalid_tensor")
        else:
            for i, image in enumerate(inputs):
                if not image.startswith((PNG, JPEG)):
                    raise BadImage(f"image {i}: not a decodable JPEG, PNG, WebP or BMP")
        self.predictions.inc()
        labels = task.info["labels"]
        row = [-float(j) for j in range(len(labels))]
        return LogitsResult(name, task.version, labels, np.array([row] * len(inputs), dtype=np.float32))

    async def onnx_model(self, name: str) -> bytes:
        self._maybe_fail("onnx_model", name)
        if name not in self.tasks:
            raise TaskNotFound(name)
        return b"ONNX:" + name.encode()
