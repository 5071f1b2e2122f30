"""What an evaluation returns, and the in-process registry of evaluations that run as background jobs.

Torch-free, so the HTTP layer can import it without loading torch. A job's state lives in the process
that runs it (bounded: the most recent ``max_jobs``); its result is also stored with each evaluated version
(``metrics.eval``), so nothing is lost with the process except the job's status record.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from service.engine.protocol import EngineError, Overloaded
from service.store.base import StoreError, StoreUnavailable, TaskNotFound

log = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)

JobState = Literal["queued", "running", "done", "failed"]


@dataclass(frozen=True)
class VersionEval:
    """One version's scores on the labelled images; ``confusion[i][j]``: images of label i predicted j."""

    version: int
    current: bool
    images: int
    accuracy: float
    per_class_accuracy: dict[str, float | None]  # None: no image of that label was sent
    labels: list[str]
    confusion: list[list[int]]
    mean_confidence: float
    calibration_error: float
    calibration_bins: int
    evaluated_at: str

    def stored(self) -> dict[str, Any]:
        """What goes into the version's ``metrics.eval``."""
        return {
            "images": self.images,
            "accuracy": self.accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion_matrix": {"labels": self.labels, "counts": self.confusion},
            "mean_confidence": self.mean_confidence,
            "calibration_error": self.calibration_error,
            "calibration_bins": self.calibration_bins,
            "evaluated_at": self.evaluated_at,
        }


@dataclass(frozen=True)
class EvalReport:
    task: str
    images: int
    results: list[VersionEval]  # the current version first


@dataclass
class EvalJob:
    id: str
    task: str
    images: int
    version: int | None
    state: JobState = "queued"
    done_images: int = 0
    created_at: str = field(default_factory=lambda: now_iso())
    finished_at: str | None = None
    report: EvalReport | None = None
    error: tuple[str, str] | None = None  # (code, message)


def error_code(e: EngineError | StoreError) -> str:
    """The error code clients see for a domain or registry error (as the HTTP error table names them)."""
    if isinstance(e, EngineError):
        return e.code
    if isinstance(e, TaskNotFound):
        return "task_not_found"
    return "registry_unavailable" if isinstance(e, StoreUnavailable) else "registry_error"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@runtime_checkable
class EvaluationAPI(Protocol):
    """What the evaluation routes ask of the engine (the real ``Engine`` implements it)."""

    async def evaluate(
        self,
        name: str,
        images: list[bytes],
        labels: list[str],
        version: int | None = None,
        sources: list[str] | None = None,
    ) -> EvalReport: ...

    def check_evaluation(self, name: str, labels: list[str], version: int | None = None) -> None: ...

    def start_evaluation(
        self,
        name: str,
        images: list[bytes],
        labels: list[str],
        version: int | None = None,
        sources: list[str] | None = None,
    ) -> EvalJob: ...

    def evaluation_job(self, name: str, job_id: str) -> EvalJob: ...


class JobNotFound(EngineError):  # 404
    code = "job_not_found"


Progress = Callable[[int], None]


class EvalJobs:
    """Background evaluations of this process, the most recent ``max_jobs`` kept."""

    def __init__(self, max_jobs: int = 100, max_running: int = 2) -> None:
        self.max_jobs, self.max_running = max_jobs, max_running
        self.jobs: OrderedDict[str, EvalJob] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self,
        task: str,
        images: int,
        version: int | None,
        run: Callable[[Progress], Awaitable[EvalReport]],
    ) -> EvalJob:
        running = sum(1 for j in self.jobs.values() if j.state in ("queued", "running"))
        if running >= self.max_running:  # each job holds its images in memory until it ends
            raise Overloaded(f"{running} evaluation jobs are running here; retry when one ends", 5.0)
        job = EvalJob(id=secrets.token_hex(8), task=task, images=images, version=version)
        self.jobs[job.id] = job
        while len(self.jobs) > self.max_jobs:
            self.jobs.popitem(last=False)
        runner = asyncio.get_running_loop().create_task(self._run(job, run), name=f"ssf-eval-{job.id}")
        self._tasks.add(runner)
        runner.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: EvalJob, run: Callable[[Progress], Awaitable[EvalReport]]) -> None:
        job.state = "running"

        def progress(done: int) -> None:
            job.done_images = done

        try:
            job.report = await run(progress)
            job.state = "done"
        except (EngineError, StoreError) as e:
            job.error = (error_code(e), getattr(e, "message", None) or str(e))
            job.state = "failed"
        except Exception as e:  # a bug: logged with its traceback; the client sees that it failed
            log.exception("evaluation job %s failed", job.id)
            job.error = ("internal_error", f"the evaluation failed: {type(e).__name__}")
            job.state = "failed"
        job.finished_at = now_iso()

    def get(self, task: str, job_id: str) -> EvalJob:
        job = self.jobs.get(job_id)
        if job is None or job.task != task:
            raise JobNotFound(
                f"no evaluation job {job_id[:40]!r} for task {task!r} on this server "
                f"(jobs live in the process that runs them; the {self.max_jobs} most recent are kept)"
            )
        return job

    async def stop(self) -> None:
        for runner in list(self._tasks):
            runner.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
