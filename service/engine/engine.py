"""The serving engine: one backbone, every task resident, dynamic batching over a mixed and a merged path.

``Engine`` implements ``EngineAPI``. Typical use (the HTTP app's lifespan does this)::

    engine = Engine("vit_base_patch16_224", None, open_store("/var/lib/ssf"), config=EngineConfig())
    await engine.start()     # loads, validates every stored task, warms up, then ready=True
    ...
    await engine.stop()      # refuses new requests, drains the queue, releases the threads

The parts, each in its own module: ``backend`` (the contract and the one selector; ``torch_backend``,
``onnx_backend``), ``residency`` (which version serves each task, uploads and version publishing),
``replicas`` (following other replicas through the store's one ``Reconciler``), ``scheduler`` and
``batches`` (dynamic batching and path choice), ``images`` (decoding), ``workers`` (the threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

import ssf
from service.engine.backend import Backend, BatchPath, BatchRun, select_backend
from service.engine.batches import top_scores
from service.engine.eval_jobs import EvalJob, EvalJobs, EvalReport, error_code
from service.engine.evaluate import Evaluator
from service.engine.images import Preprocessor
from service.engine.lifecycle import Gate, Promotion, check_gate
from service.engine.metrics import EngineMetrics
from service.engine.protocol import (
    BackboneUnusable,
    EngineError,
    InvalidDelta,
    LogitsResult,
    PredictionResult,
    Unavailable,
    VersionNotFound,
    check_task_name,
    check_top_k,
)
from service.engine.replicas import ReplicaFollower
from service.engine.residency import Residency, TaskEntry
from service.engine.scheduler import Pending, Scheduler, current_lane
from service.engine.shadow import Shadow
from service.engine.workers import Workers, own_threads
from service.settings import EngineConfig
from service.store.base import StoredTask, StoreError, TaskHistory, TaskNotFound, TaskStore

log = logging.getLogger(__name__)


class Engine:
    """See the module docstring. Every public method is safe to call from the event loop."""

    def __init__(
        self,
        model: str,
        weights: str | Path | None,
        store: TaskStore,
        *,
        config: EngineConfig | None = None,
        site_scheme: str = "foldable",
        pretrained: bool = True,
        owns_store: bool = True,
    ) -> None:
        self.model_name, self.weights, self.store = model, weights, store
        self.config = config if config is not None else EngineConfig()
        self.site_scheme, self.pretrained = site_scheme, pretrained
        self.owns_store = owns_store  # stop() closes it (watch threads, connections)
        self.metrics = EngineMetrics(top_tasks=self.config.metrics_top_tasks)
        self.evaluator = Evaluator(self)
        self.shadow = Shadow(self.config.shadow_fraction, self._staged_entry, self.metrics)
        self.eval_jobs = EvalJobs()
        self.workers = Workers(over_share_nice=self.config.over_share_nice)
        self.ready = False
        self.draining = False
        self._requests = 0  # predict calls between admission and answer
        self._follower: ReplicaFollower | None = None
        self._loop_threads = 0  # the event loop thread's torch threads before start()
        self._switch_interval = 0.0  # the interpreter's switch interval before start()
        self.scheduler: Scheduler  # from start() on

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    # ------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        # Every forward runs on the model thread, with the configured intra-op threads (torch's default: one
        # per core). Every other thread runs torch ops single-threaded (the CPU pool's: ``single_threaded``;
        # the event loop's, whose top-k after each batch would otherwise start an OpenMP team of its own):
        # with more OpenMP threads than cores libgomp stops spinning between parallel regions, and the
        # forwards slow down by a fifth (``workers.single_threaded``).
        self._loop_threads = torch.get_num_threads()  # given back to the event loop's thread by stop()
        # The model thread releases the interpreter lock inside every op and needs it back after; while the
        # event loop holds it (parsing a request), it would wait up to the switch interval each time.
        self._switch_interval = sys.getswitchinterval()  # given back by stop()
        sys.setswitchinterval(self.config.gil_switch_interval_ms / 1000)
        await self.workers.on_model(own_threads, self.config.torch_threads or self._loop_threads)
        own_threads(1)
        await self.workers.on_model(self._load_backbone)
        self._follower = ReplicaFollower(self.store, self.residency, self.config.reconcile_interval_s)
        await self._follower.start()  # every stored task resident (a registry that is down: retried)
        example = torch.zeros(2, *self.preprocess.config["input_size"])
        await self.workers.on_model(self.backend.warmup, example)
        self.scheduler = Scheduler(
            self.config,
            self._run_batch,
            self.workers.model,
            self.metrics,
            merged_cached=self.backend.merged_cached,
            grouped_path=None if self.backend.mixes else self.backend.single_task_path,
            one_task_path=self.backend.single_task_path,
        )
        self.scheduler.start()
        self.freeze_heap()
        self.ready = True
        log.info("engine ready: %s, %d tasks resident", self.model_name, len(self.residency.entries))

    def freeze_heap(self) -> None:
        """Move every object alive now (the backbone's modules, the libraries, the resident tasks) out of
        the garbage collector's reach: a full collection otherwise walks them all with the interpreter held,
        stopping every thread (measured: 225 ms at 450,000 objects). Called once the stored tasks are
        resident; a bulk load afterwards may call it again. Tasks uploaded later are walked: their deltas
        are packed (``ssf.packed``), about 14 objects a task, 1.3 ms a full collection with 1,000 of them.
        What is freed later (an evicted task) is still freed by reference counting; only cycles among
        frozen objects stay."""
        gc.collect()
        gc.freeze()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let queued requests finish (up to ``drain_timeout_s``), release the threads."""
        self.ready = False
        self.draining = True
        deadline = time.monotonic() + drain_timeout_s
        if self._follower is not None:
            await self._follower.stop()
        while self._requests and time.monotonic() < deadline:  # admitted requests still decoding
            await asyncio.sleep(0.01)
        await self.eval_jobs.stop()
        if hasattr(self, "scheduler"):
            await self.scheduler.stop(max(0.0, deadline - time.monotonic()))
        self.workers.shutdown()
        gc.unfreeze()  # what this engine held may be collected again
        if self._switch_interval:
            sys.setswitchinterval(self._switch_interval)
        if self._loop_threads:
            own_threads(self._loop_threads)
        if self.owns_store:
            await asyncio.to_thread(self.store.close)

    def _load_backbone(self) -> None:
        try:
            model = ssf.create_backbone(self.model_name, self.weights, pretrained=self.pretrained)
        except ssf.BackboneError as e:
            raise BackboneUnusable(str(e)) from e
        model.eval()
        self.spec = ssf.BackboneSpec.from_model(model, self.model_name, self.site_scheme)
        unfoldable = [s.path for s in self.spec.sites if not s.foldable]
        if unfoldable:  # the merged path could not serve them, and the mixed path must agree with it
            raise BackboneUnusable(
                f"site scheme {self.site_scheme!r} puts sites that cannot fold on {self.model_name} "
                f"({unfoldable[:3]}); serve it with site_scheme='foldable'"
            )
        self.preprocess = Preprocessor(model, self.config)
        self.backend: Backend = select_backend(self.config, model, list(self.spec.sites), self.metrics)
        self.residency = Residency(
            self.store, self.backend, self.spec, self.config, self.workers, self.metrics
        )

    def _run_batch(self, path: BatchPath, items: list[Pending]) -> BatchRun:
        return self.shadow.run(self.backend, path, items)  # run_batch, plus the picked shadow rows

    def _staged_entry(self, name: str) -> TaskEntry | None:
        """The task's resident staged version, which shadow traffic compares with the current one."""
        staged = getattr(getattr(self, "residency", None), "staged", None)
        entry = staged.get(name) if isinstance(staged, dict) else None
        return entry if isinstance(entry, TaskEntry) else None

    def _with_shadow(self, task: StoredTask) -> StoredTask:
        """The record with this replica's shadow comparison (``info["shadow"]``) while one runs."""
        stats = self.shadow.stats(task.name)
        return task if stats is None else dataclasses.replace(task, info={**task.info, "shadow": stats})

    # ------------------------------------------------------------------------------ the facade
    def backbone_info(self) -> dict[str, Any]:
        self._require_started()
        return {
            "model": self.model_name,
            "fingerprint": self.spec.fingerprint,
            "input_size": list(self.preprocess.config["input_size"]),
            "site_scheme": self.site_scheme,
            "backend": self.config.backend,
            "device": str(self.backend.device),
            "dtype": self.config.dtype,
        }

    def list_tasks(self) -> list[StoredTask]:
        return [self._with_shadow(t) for t in self.store.list()]

    def get_task(self, name: str) -> StoredTask:
        return self._with_shadow(self.store.get(name))

    async def add_task(self, data: bytes, name: str | None, replace: bool) -> StoredTask:
        return await self._add(data, name, replace, stage=False)

    async def _add(self, data: bytes, name: str | None, replace: bool, *, stage: bool) -> StoredTask:
        """An upload: made current, or (``stage``) the task's staged version."""
        self._require_started()
        delta = await self.workers.on_cpu(self.residency.validate, data)
        task = check_task_name(name if name else delta.task)
        info = {
            "num_classes": delta.num_classes,
            "labels": delta.labels,
            "method": delta.method,
            "site_scheme": delta.site_scheme,
            "backbone_fingerprint": delta.backbone_fingerprint,
            "metrics": delta.metrics,
        }
        # Everything that can fail on this replica happens before the store sees the new version, so a
        # delta that cannot be installed (or built into an ONNX session) leaves the old version serving.
        try:
            entry = await self.residency.install(delta)
        except Exception as e:
            log.exception("task %s could not be installed", task)
            raise InvalidDelta(
                f"the delta could not be built on this server: {e}", code="build_failed"
            ) from e
        try:
            stored: StoredTask = await self.workers.on_cpu(
                lambda: (
                    self.store.put(task, data, info, replace=replace, stage=stage)
                    if stage
                    else self.store.put(task, data, info, replace=replace)
                )
            )
        except BaseException:
            await self.residency.discard(entry)
            raise
        if stage:
            self.residency.stage(entry, stored)
        else:
            self.residency.publish(entry, stored)
        return stored

    async def delete_task(self, name: str) -> None:
        await self.workers.on_cpu(self.store.delete, name)
        if hasattr(self, "residency"):
            self.residency.drop(name)
            self.residency.drop_staged(name)
        with contextlib.suppress(KeyError):  # never answered here
            self.metrics.task_images.remove(name)
        self.metrics.forget_task(name)
        self.shadow.forget(name)

    async def predict(
        self, name: str, images: list[bytes], top_k: int = 5, timeout_s: float | None = None
    ) -> PredictionResult:
        self._require_ready()
        check_top_k(top_k)
        self.preprocess.check_count(images)
        entry, logits = await self._observed(name, len(images), images, None, timeout_s)
        return PredictionResult(name, entry.version, top_scores(logits, entry.labels, top_k))

    async def infer(
        self,
        name: str,
        inputs: list[bytes] | np.ndarray,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> LogitsResult:
        self._require_ready()
        source: list[bytes] | torch.Tensor
        if isinstance(inputs, list):
            self.preprocess.check_count(inputs)
            source = inputs
        else:  # preprocessed pixels: the same checks whoever sends them, then the same queue
            source = self.preprocess.check_pixels(inputs)
        n = len(source)
        entry, logits = await self._observed(name, n, source, version, timeout_s)
        return LogitsResult(name, entry.version, entry.labels, logits.float().numpy())

    async def _observed(
        self,
        name: str,
        n: int,
        source: list[bytes] | torch.Tensor,
        version: int | None,
        timeout_s: float | None,
        staged_ok: bool = False,
    ) -> tuple[TaskEntry, torch.Tensor]:
        """``_forward``, counted in the per-task metrics (requests, images, errors, latency)."""
        start = time.perf_counter()
        error: str | None = None
        try:
            return await self._forward(name, n, source, version, timeout_s, staged_ok)
        except (EngineError, StoreError) as e:
            error = error_code(e)
            raise
        finally:
            known = name if name in self.residency.entries else None
            self.metrics.task_request(known, n, time.perf_counter() - start, error)

    async def _forward(
        self,
        name: str,
        n: int,
        source: list[bytes] | torch.Tensor,
        version: int | None,
        timeout_s: float | None,
        staged_ok: bool = False,
    ) -> tuple[TaskEntry, torch.Tensor]:
        """One request through admission, residency, decoding (for encoded images) and the scheduler.
        ``staged_ok``: ``version`` may name the task's staged version (an admin's explicit request)."""
        timeout = timeout_s if timeout_s is not None else self.config.request_timeout_s
        deadline = time.monotonic() + timeout
        scheduler = self.scheduler
        over_share = scheduler.admit(n)  # overload is answered before any decoding work
        self._requests += 1
        queued = False
        try:
            staged = self.residency.staged.get(name) if staged_ok else None
            if version is not None and staged is not None and staged.version == version:
                entry = staged
            else:
                entry = await self.residency.resolve(name)
            if version is not None and entry.version != version:
                raise VersionNotFound(
                    f"task {name!r} serves version {entry.version}, not {version}; "
                    "older versions are not served"
                )
            with self.residency.hold(entry):
                if isinstance(source, torch.Tensor):
                    x = source
                else:
                    tenant = current_lane().tenant
                    x = await self.workers.decode(
                        tenant, self.preprocess.decode_all, source, over_share=over_share
                    )
                queued = True  # from here the scheduler holds the admission, even if submit refuses
                logits = await scheduler.submit(entry, x, deadline, admitted=True)
            self.metrics.task_images.labels(name).inc(n)
        finally:
            if not queued:
                scheduler.withdraw(n)
            self._requests -= 1
        return entry, logits

    # ----------------------------------------------------------------------------- evaluation
    async def evaluate(
        self,
        name: str,
        images: list[bytes],
        labels: list[str],
        version: int | None = None,
        sources: list[str] | None = None,
    ) -> EvalReport:
        """Score the current version (and ``version``) on labelled images, in the same batches."""
        self._require_ready()
        return await self.evaluator.run(name, images, labels, version, sources)

    def check_evaluation(self, name: str, labels: list[str], version: int | None = None) -> None:
        """What can be refused before a job starts: the task, the version, unknown labels."""
        self._require_ready()
        self.evaluator.check_labels(name, labels, version)

    def start_evaluation(
        self,
        name: str,
        images: list[bytes],
        labels: list[str],
        version: int | None = None,
        sources: list[str] | None = None,
    ) -> EvalJob:
        self._require_ready()
        self.evaluator.check(name, images, labels)
        self.evaluator.check_labels(name, labels, version)
        return self.eval_jobs.start(
            name,
            len(images),
            version,
            lambda progress: self.evaluator.run(name, images, labels, version, sources, progress),
        )

    def evaluation_job(self, name: str, job_id: str) -> EvalJob:
        return self.eval_jobs.get(name, job_id)

    # ------------------------------------------------------------------ versions (lifecycle.py)
    async def stage_task(self, data: bytes, name: str | None) -> StoredTask:
        return await self._add(data, name, replace=False, stage=True)

    async def task_history(self, name: str) -> TaskHistory:
        history: TaskHistory = await self.workers.on_cpu(self.store.history, name)
        return history

    async def task_version(self, name: str, version: int) -> StoredTask:
        stored: StoredTask = await self.workers.on_cpu(self.store.get_version, name, version)
        return stored

    async def predict_version(
        self, name: str, images: list[bytes], top_k: int, version: int
    ) -> PredictionResult:
        self._require_ready()
        check_top_k(top_k)
        self.preprocess.check_count(images)
        entry, logits = await self._observed(name, len(images), images, version, None, staged_ok=True)
        return PredictionResult(name, entry.version, top_scores(logits, entry.labels, top_k))

    async def promote(self, name: str, version: int, gate: Gate | None = None) -> Promotion:
        """Make a kept version current: checked against ``gate``, made resident here before the store's
        pointer moves (so this replica switches at once), then published; other replicas follow."""
        self._require_started()
        target = await self.task_version(name, version)  # TaskNotFound, VersionNotKept: 404
        previous = await self.workers.on_cpu(self._current_version, name)  # the store's, not this replica's
        numbers = {}
        if gate is not None and not gate.empty:
            numbers = check_gate(target, gate, self.shadow.stats(name))
        residency = self.residency
        current, staged = residency.entries.get(name), residency.staged.get(name)
        entry = None
        resident = (current is not None and current.version == version) or (
            staged is not None and staged.version == version
        )
        if not resident:
            entry = await residency.prepare(name, version)
            if entry is None:
                raise VersionNotFound(f"task {name!r} version {version} cannot be loaded")
        try:
            stored: StoredTask = await self.workers.on_cpu(self.store.promote, name, version)
        except BaseException:
            if entry is not None:
                await residency.discard(entry)
            raise
        now = residency.entries.get(name)
        if entry is not None:
            residency.publish(entry, stored)
        elif not await residency.adopt_staged(stored) and now is not None and now.version == version:
            now.stored = stored
        return Promotion(stored, previous, numbers)

    def _current_version(self, name: str) -> int | None:
        try:
            return self.store.get(name).version
        except TaskNotFound:
            return None

    async def onnx_model(self, name: str) -> bytes:
        self._require_started()
        entry = await self.residency.resolve(name)
        with self.residency.hold(entry):
            return await self.workers.on_model(self.backend.export_onnx, entry)

    async def reconcile(self) -> bool:
        """Follow the store now (what the background loop does); False when the registry is unreachable."""
        self._require_started()
        assert self._follower is not None
        return await self._follower.reconcile()

    def _require_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the engine is draining" if self.draining else "the engine is still starting")

    def _require_started(self) -> None:
        if not hasattr(self, "residency"):
            raise Unavailable("the engine is still starting")
