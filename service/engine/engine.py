"""The serving engine: one backbone, every task resident, dynamic batching over a mixed and a merged path.

``Engine`` implements ``EngineAPI``. Typical use (the HTTP app's lifespan does this)::

    engine = Engine("vit_base_patch16_224", None, open_store("/var/lib/ssf"), backend="torch")
    await engine.start()     # loads, validates every stored task, warms up, then ready=True
    ...
    await engine.stop()      # refuses new requests, drains the queue, releases the threads

One thread owns the model (every forward, table write and merge runs there); a small pool decodes images
and validates deltas; the event loop only schedules.

Residency is keyed by (task, version): a request holds the version it resolved until it is answered, and
a replaced version's table row and merged copy are freed only when no request holds it. Changes made by
other replicas arrive as store hints (``watch``) and, since hints may be lost, by reconciling against
``store.versions()`` every ``reconcile_interval_s``; a task that is not resident costs one store lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import ssf
from service.engine.batches import run_batch, top_scores
from service.engine.images import ImageLimits, Preprocessor
from service.engine.metrics import EngineMetrics
from service.engine.protocol import (
    DeltaTooLarge,
    InvalidDelta,
    InvalidParameter,
    PredictionResult,
    Unavailable,
)
from service.engine.resident import TaskEntry
from service.engine.scheduler import Path as BatchPath
from service.engine.scheduler import Pending, Scheduler, SchedulerConfig
from service.engine.torch_backend import DTYPES, TorchBackend, resolve_device
from service.store.base import StoredTask, StoreError, TaskNotFound, TaskStore
from ssf.delta import TASK_NAME_RE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_delta_bytes: int = 64 * 1024 * 1024
    images: ImageLimits = field(default_factory=ImageLimits)
    max_top_k: int = 1000
    max_labels: int = 100_000


class Engine:
    """See the module docstring. Every public method is safe to call from the event loop."""

    def __init__(
        self,
        model: str,
        weights: str | Path | None,
        store: TaskStore,
        *,
        backend: Literal["torch", "onnx"] = "torch",
        device: str = "auto",
        dtype: str = "float32",
        limits: EngineLimits | None = None,
        scheduler: SchedulerConfig | None = None,
        max_cache_bytes: int = 1 << 30,
        site_scheme: str = "foldable",
        reconcile_interval_s: float = 2.0,
        pretrained: bool = True,
        owns_store: bool = True,
    ) -> None:
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', not {backend!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        if backend == "onnx" and (dtype != "float32" or device == "cuda"):
            raise ValueError("the onnx backend runs float32 on the CPU")
        self.model_name, self.weights, self.store = model, weights, store
        self.backend_name, self.dtype_name, self.site_scheme = backend, dtype, site_scheme
        self.device = resolve_device("cpu" if backend == "onnx" else device)
        self.limits = limits or EngineLimits()
        self.scheduler_config = scheduler or SchedulerConfig()
        if self.limits.images.max_images > self.scheduler_config.max_queue_images:
            raise ValueError("max_queue_images must hold at least one request of max_images images")
        self.max_cache_bytes = max_cache_bytes
        self.reconcile_interval_s = reconcile_interval_s
        self.pretrained = pretrained
        self.owns_store = owns_store  # stop() closes it (watch threads, connections)
        self.metrics = EngineMetrics()
        self.ready = False
        self.draining = False
        self._requests = 0  # predict calls between admission and answer
        self._resident: dict[str, TaskEntry] = {}
        self._retired: list[TaskEntry] = []
        self._bad: set[tuple[str, int]] = set()
        self._name_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # (lock, holders): dropped at 0
        self._background: set[asyncio.Task[None]] = set()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="ssf-model")
        self._cpu_pool = ThreadPoolExecutor(2, thread_name_prefix="ssf-cpu")
        self._onnx: Any = None  # OnnxBackend, built on first use (always at start for backend='onnx')

    # ------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._on_model(self._load_backbone)
        if self.backend_name == "onnx":
            await self._on_model(self._onnx_backend)
        try:
            await self.reconcile()
        except (
            StoreError
        ) as e:  # the registry is down: start anyway; unknown tasks answer 503 until it is back
            log.warning(
                "could not load tasks at start (%s); will retry every %ss", e, self.reconcile_interval_s
            )
        example = torch.zeros(2, *self.preprocess.config["input_size"])
        await self._on_model(self._warmup, example)
        self.scheduler = Scheduler(
            self.scheduler_config,
            self._run_batch,
            self._model_thread,
            self.metrics,
            merged_cached=self.backend.merged_cached,
            grouped_only=self.backend_name == "onnx",
        )
        self.scheduler.start()
        self._spawn(self._reconcile_forever())
        self.store.watch(self._on_store_change)
        self.ready = True
        log.info("engine ready: %s, %d tasks resident", self.model_name, len(self._resident))

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let queued requests finish (up to ``drain_timeout_s``), release the threads."""
        self.ready = False
        self.draining = True
        deadline = time.monotonic() + drain_timeout_s
        while self._requests and time.monotonic() < deadline:  # admitted requests still decoding
            await asyncio.sleep(0.01)
        if hasattr(self, "scheduler"):
            await self.scheduler.stop(max(0.0, deadline - time.monotonic()))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)
        self._background.clear()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._cpu_pool.shutdown(wait=False)  # a late decode finishes, then meets a closed scheduler
        if self.owns_store:
            await asyncio.to_thread(self.store.close)

    def _load_backbone(self) -> None:
        model = ssf.create_backbone(self.model_name, self.weights, pretrained=self.pretrained)
        model.eval()
        self.spec = ssf.BackboneSpec.from_model(model, self.model_name, self.site_scheme)
        unfoldable = [s.path for s in self.spec.sites if not s.foldable]
        if unfoldable:  # the merged path could not serve them, and the mixed path must agree with it
            raise ssf.SiteError(
                f"site scheme {self.site_scheme!r} puts sites that cannot fold on {self.model_name} "
                f"({unfoldable[:3]}); serve it with site_scheme='foldable'"
            )
        self.preprocess = Preprocessor(model, self.limits.images)
        self.backend = TorchBackend(
            model,
            list(self.spec.sites),
            self.device,
            DTYPES[self.dtype_name],
            self.max_cache_bytes,
            self.metrics,
        )

    def _onnx_backend(self) -> Any:
        if self._onnx is None:
            from service.engine.onnx_backend import OnnxBackend

            self._onnx = OnnxBackend(self.backend, self.max_cache_bytes, self.metrics)
        return self._onnx

    def _warmup(self, example: torch.Tensor) -> None:
        self.backend.warmup(example)
        if self._onnx is not None:
            self._onnx.warmup(example)

    async def _on_model(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def _on_cpu(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._cpu_pool, fn, *args)

    # ------------------------------------------------------------------------------ the facade
    def backbone_info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "fingerprint": self.spec.fingerprint,
            "input_size": list(self.preprocess.config["input_size"]),
            "site_scheme": self.site_scheme,
            "backend": self.backend_name,
            "device": str(self.device),
            "dtype": self.dtype_name,
        }

    def list_tasks(self) -> list[StoredTask]:
        return self.store.list()

    def get_task(self, name: str) -> StoredTask:
        return self.store.get(name)

    async def add_task(self, data: bytes, name: str | None, replace: bool) -> StoredTask:
        self._require_started()
        if len(data) > self.limits.max_delta_bytes:
            raise DeltaTooLarge(f"delta is {len(data)} bytes; the limit is {self.limits.max_delta_bytes}")
        delta = await self._on_cpu(self._validate, data)
        task = name if name else delta.task
        if not TASK_NAME_RE.fullmatch(task):
            raise InvalidParameter(f"task name {task[:80]!r} must match {TASK_NAME_RE.pattern}")
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
        # stored is set once the store has it
        entry = TaskEntry(stored=None, delta=delta)  # type: ignore[arg-type]
        try:
            await self._on_model(self._install_on_model, entry)
        except Exception as e:
            await self._on_model(self._release_on_model, [entry])
            log.exception("task %s could not be installed", task)
            raise InvalidDelta(
                f"the delta could not be built on this server: {e}", code="build_failed"
            ) from e
        try:
            stored: StoredTask = await self._on_cpu(lambda: self.store.put(task, data, info, replace=replace))
        except BaseException:
            await self._on_model(self._release_on_model, [entry])
            raise
        entry.stored = stored
        self._publish(entry)
        return stored

    async def delete_task(self, name: str) -> None:
        await self._on_cpu(self.store.delete, name)
        entry = self._resident.pop(name, None)
        if entry is not None:
            self._retire(entry)

    async def predict(
        self, name: str, images: list[bytes], top_k: int = 5, timeout_s: float | None = None
    ) -> PredictionResult:
        if not self.ready:
            raise Unavailable("the engine is draining" if self.draining else "the engine is still starting")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidParameter(f"top_k must be an integer from 1 to {self.limits.max_top_k}")
        timeout = timeout_s if timeout_s is not None else self.scheduler_config.request_timeout_ms / 1000
        deadline = time.monotonic() + timeout
        self.preprocess.check_count(images)
        self.scheduler.admit(len(images))  # overload is answered before any decoding work
        entry = await self._resolve(name)
        while entry.retired:  # replaced while it was being loaded: serve the version that won
            entry = await self._resolve(name)
        entry.inflight += 1
        self._requests += 1
        try:
            x = await self._on_cpu(self.preprocess, images)
            logits = await self.scheduler.submit(entry, x, deadline)
        finally:
            self._requests -= 1
            entry.inflight -= 1
            if entry.retired:
                self._collect()
        return PredictionResult(name, entry.version, top_scores(logits, entry.labels, top_k))

    async def onnx_model(self, name: str) -> bytes:
        self._require_started()
        entry = await self._resolve(name)
        onnx = await self._on_model(self._onnx_backend)
        return await self._on_model(onnx.merged_bytes, entry)

    # ---------------------------------------------------------------------------------- batches
    def _run_batch(self, path: BatchPath, items: list[Pending]) -> tuple[list[torch.Tensor], float]:
        return run_batch(self.backend, self._onnx, path, items)

    # ------------------------------------------------------------------------------- residency
    def _validate(self, data: bytes) -> ssf.Delta:
        try:
            delta = ssf.load_delta(data, self.spec, max_bytes=self.limits.max_delta_bytes)
        except ssf.DeltaError as e:
            if e.code == "delta_too_large":
                raise DeltaTooLarge(e.message) from e
            raise InvalidDelta(e.message, code=e.code) from e
        if delta.num_classes > self.limits.max_labels:
            raise InvalidDelta(
                f"{delta.num_classes} labels; this server allows at most {self.limits.max_labels}",
                code="too_many_labels",
            )
        return delta

    async def _install(self, stored: StoredTask, delta: ssf.Delta) -> TaskEntry:
        entry = TaskEntry(stored=stored, delta=delta)
        await self._on_model(self._install_on_model, entry)
        return self._publish(entry)

    def _publish(self, entry: TaskEntry) -> TaskEntry:
        """Make an installed entry the task's current version, unless a newer one got there first."""
        stored = entry.stored
        if self._onnx is not None and entry.prebuilt is not None:
            self._onnx.adopt(entry)
        current = self._resident.get(stored.name)
        if current is not None and current.version >= stored.version:
            self._retire(entry)  # a newer version won the race; this one never served
            return current
        self._resident[stored.name] = entry
        if current is not None:
            self._retire(current)
        self.metrics.tasks_resident.set(len(self._resident))
        return entry

    def _install_on_model(self, entry: TaskEntry) -> None:
        self.backend.install(entry)
        if self.backend_name == "onnx":
            self._onnx.prepare(entry)  # the session is built now: a graph that fails fails the upload

    def _retire(self, entry: TaskEntry) -> None:
        entry.retired = True
        self._retired.append(entry)
        self.metrics.tasks_resident.set(len(self._resident))
        self._collect()

    def _collect(self) -> None:
        """Free the rows and cached copies of retired versions no request holds any more."""
        done = [e for e in self._retired if e.inflight == 0]
        if not done:
            return
        self._retired = [e for e in self._retired if e.inflight > 0]
        try:
            self._model_thread.submit(self._release_on_model, done)
        except RuntimeError:  # stopped: the memory goes with the engine
            pass

    def _release_on_model(self, entries: list[TaskEntry]) -> None:
        for entry in entries:
            self.backend.release(entry)
            if self._onnx is not None:
                self._onnx.release(entry)

    def _require_started(self) -> None:
        if not hasattr(self, "spec"):
            raise Unavailable("the engine is still starting")

    async def _resolve(self, name: str) -> TaskEntry:
        entry = self._resident.get(name)
        if entry is not None:
            return entry
        if not TASK_NAME_RE.fullmatch(name):
            raise TaskNotFound(name)  # no store round trip for a name no task can have
        lock, holders = self._name_locks.get(name, (asyncio.Lock(), 0))
        self._name_locks[name] = (lock, holders + 1)
        try:
            async with lock:  # concurrent first requests load the task once
                entry = self._resident.get(name)
                if entry is None:
                    stored = await self._on_cpu(self.store.get, name)  # TaskNotFound -> 404
                    entry = await self._load_stored(stored)
                    if entry is None:
                        raise TaskNotFound(name)
                return entry
        finally:  # never keep a lock per name ever asked for (unknown names would grow it forever)
            lock, holders = self._name_locks[name]
            if holders == 1:
                del self._name_locks[name]
            else:
                self._name_locks[name] = (lock, holders - 1)

    async def _load_stored(self, stored: StoredTask) -> TaskEntry | None:
        """Validate a stored version and make it resident; a bad one is logged and skipped (None)."""
        if (stored.name, stored.version) in self._bad:
            return None
        try:
            data = await self._on_cpu(self.store.read, stored.name, stored.version)
            delta = await self._on_cpu(self._validate, data)
        except (InvalidDelta, DeltaTooLarge) as e:
            self._bad.add((stored.name, stored.version))
            log.error("stored task %s v%d is unusable, skipped: %s", stored.name, stored.version, e.message)
            return None
        except TaskNotFound:
            return None
        return await self._install(stored, delta)

    async def reconcile(self) -> None:
        """Make residency match the store: load new versions, drop deleted tasks (other replicas' changes)."""
        versions: dict[str, int] = await self._on_cpu(self.store.versions)
        for name, version in versions.items():
            current = self._resident.get(name)
            if current is not None and current.version >= version:
                continue
            await self.refresh(name)
        for name in [n for n in self._resident if n not in versions]:
            self._retire(self._resident.pop(name))
            self.metrics.reconciles.labels("deleted").inc()

    async def refresh(self, name: str) -> None:
        """Check one task's current version (one store round trip) and follow it."""
        try:
            stored: StoredTask = await self._on_cpu(self.store.get, name)
        except TaskNotFound:
            entry = self._resident.pop(name, None)
            if entry is not None:
                self._retire(entry)
                self.metrics.reconciles.labels("deleted").inc()
            return
        current = self._resident.get(name)
        stale = current is None or current.version < stored.version
        if stale and await self._load_stored(stored) is not None:
            self.metrics.reconciles.labels("loaded").inc()

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval_s)
            try:
                await self.reconcile()
            except StoreError as e:  # the registry is down: keep serving what is resident, retry later
                log.warning("reconcile failed: %s", e)
            except Exception:
                log.exception("reconcile failed")

    def _on_store_change(self, name: str) -> None:
        """A hint from the store (maybe from another thread): refresh that one task soon."""
        if self.draining:
            return
        try:  # "" means the store may have missed changes (a reconnect): reconcile everything
            self._loop.call_soon_threadsafe(self._spawn, self._hint(name) if name else self._hint_all())
        except RuntimeError:  # the loop is closed: the engine is gone
            pass

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hint_all(self) -> None:
        try:
            await self.reconcile()
        except Exception as e:
            log.warning("reconcile after a change notice failed: %s", e)

    async def _hint(self, name: str) -> None:
        try:
            await self.refresh(name)
        except Exception as e:
            log.warning("refreshing %s after a change notice failed: %s", name, e)
