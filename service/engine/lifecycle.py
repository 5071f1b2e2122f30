"""The task lifecycle beyond one live version: what the HTTP layer may ask (``LifecycleAPI``), and the
promotion gate.

A task keeps its last ``SSF_KEEP_VERSIONS`` versions in the store (``TaskStore.history``). One is current
(answers live traffic); one may be staged (resident on every replica, compared with the current one by
shadow traffic, answering only an admin's ``?version=`` request). ``promote`` makes any kept version
current atomically; a rollback is a promotion of an older one. A gate refuses the promotion (409, the
numbers in the message) unless the version's stored evaluation (``metrics.eval``, written by
``POST /tasks/{name}/evaluate``) and this replica's shadow comparison reach the asked minimums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from service.engine.protocol import EngineError, PredictionResult
from service.store.base import StoredTask, TaskHistory


class GateFailed(EngineError):  # 409: the version does not reach the gate; the current one keeps serving
    code = "gate_failed"


class GateMetricMissing(GateFailed):  # 409: the gate asks for a number nobody measured yet
    code = "gate_metric_missing"


@dataclass(frozen=True)
class Gate:
    """Minimums a version must reach to be promoted; None: not asked."""

    min_accuracy: float | None = None  # metrics.eval.accuracy
    min_agreement: float | None = None  # shadow top-1 agreement with the current version
    min_images: int | None = None  # images behind each asked number (eval images; shadow images)

    @property
    def empty(self) -> bool:
        return self.min_accuracy is None and self.min_agreement is None and self.min_images is None


def gate_numbers(target: StoredTask, shadow: dict[str, Any] | None) -> dict[str, float | int | None]:
    """The numbers a gate reads for ``target``: its stored evaluation and, when the shadow comparison is
    of this version, the agreement."""
    metrics = target.info.get("metrics") or {}
    evaluation = metrics.get("eval") if isinstance(metrics, dict) else None
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    compared = shadow if shadow is not None and shadow.get("version") == target.version else {}
    return {
        "accuracy": evaluation.get("accuracy"),
        "eval_images": evaluation.get("images"),
        "agreement": compared.get("agreement"),
        "shadow_images": compared.get("images"),
    }


EVALUATE = "evaluate the version first (POST /tasks/{name}/evaluate)"
SHADOW = "stage the version and let shadow traffic compare it"


def check_gate(
    target: StoredTask, gate: Gate, shadow: dict[str, Any] | None
) -> dict[str, float | int | None]:
    """Raise GateFailed (or GateMetricMissing) naming every number against its minimum; else the numbers.
    ``min_images`` applies to each number asked for (to the evaluation when neither is)."""
    numbers = gate_numbers(target, shadow)
    wanted: list[tuple[str, str, float]] = []
    if gate.min_accuracy is not None or gate.min_agreement is None:
        if gate.min_accuracy is not None:
            wanted.append(("accuracy", EVALUATE, gate.min_accuracy))
        if gate.min_images is not None:
            wanted.append(("eval_images", EVALUATE, gate.min_images))
    if gate.min_agreement is not None:
        wanted.append(("agreement", SHADOW, gate.min_agreement))
        if gate.min_images is not None:
            wanted.append(("shadow_images", SHADOW, gate.min_images))
    missing = [(key, how) for key, how, _ in wanted if numbers[key] is None]
    if missing:
        what = "; ".join(f"{key} is missing: {how}" for key, how in missing)
        raise GateMetricMissing(f"version {target.version} cannot pass the gate: {what}")
    failed = [(key, numbers[key], floor) for key, _, floor in wanted if float(numbers[key] or 0) < floor]
    if failed:
        what = ", ".join(f"{key} {value} < {floor}" for key, value, floor in failed)
        raise GateFailed(f"version {target.version} does not pass the gate: {what}; the current one serves")
    return numbers


@dataclass(frozen=True)
class Promotion:
    task: StoredTask  # the promoted version, now current
    previous: int | None  # the version that was current before
    numbers: dict[str, float | int | None]  # what the gate read (all None without a gate)


@runtime_checkable
class LifecycleAPI(Protocol):
    """What the version, staging and promotion routes ask of the engine (the real ``Engine``)."""

    async def stage_task(self, data: bytes, name: str | None) -> StoredTask:
        """Store a new version as the task's staged version and make it resident (no live traffic)."""
        ...

    async def task_history(self, name: str) -> TaskHistory: ...

    async def task_version(self, name: str, version: int) -> StoredTask: ...

    async def promote(self, name: str, version: int, gate: Gate | None = None) -> Promotion: ...

    async def predict_version(
        self, name: str, images: list[bytes], top_k: int, version: int
    ) -> PredictionResult:
        """Predict with one version: the current one or the staged one (an admin's explicit request)."""
        ...
