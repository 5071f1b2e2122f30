"""Prometheus metrics of one engine, in a registry of its own (tests and benchmarks make many).

The HTTP layer serves ``engine.metrics.registry`` at ``GET /metrics`` (``generate_latest(registry)``).

Per-task series (``ssf_task_*``) have bounded cardinality: only the busiest ``top_tasks`` tasks by recent
traffic get a series of their own, every other task is counted under ``task="other"`` (``TaskLabels``).
When a task leaves the top, its series are removed (a counter reset for that label, which ``rate()``
handles), so at most ``top_tasks + 1`` series exist per metric. The shadow and evaluation gauges keep
the ``top_tasks`` most recently updated tasks.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


OTHER = "other"


class TaskLabels:
    """Which tasks get a label of their own: the ``top`` busiest by traffic, decayed by half every
    ``window_s`` seconds (so a task that stops receiving traffic falls out). ``on_leave(name)`` is called
    for each task that loses its label, to remove its series. Thread-safe (the model thread counts too)."""

    def __init__(self, top: int, on_leave: Callable[[str], None], window_s: float = 30.0) -> None:
        self.top, self.on_leave, self.window_s = top, on_leave, window_s
        self.traffic: dict[str, float] = {}
        self.labelled: set[str] = set()
        self._lock = threading.Lock()
        self._next = time.monotonic() + window_s

    def label(self, name: str, weight: float = 1.0) -> str:
        """Count ``weight`` of traffic for ``name`` (an existing task) and return its label."""
        with self._lock:
            self.traffic[name] = self.traffic.get(name, 0.0) + weight
            if time.monotonic() >= self._next:
                self._rerank()
            elif name not in self.labelled and len(self.labelled) < self.top:
                self.labelled.add(name)  # room left: no need to wait for the next ranking
            return name if name in self.labelled else OTHER

    def peek(self, name: str) -> str:
        with self._lock:
            return name if name in self.labelled else OTHER

    def forget(self, name: str) -> None:
        """The task is gone: drop its traffic and its series."""
        with self._lock:
            self.traffic.pop(name, None)
            was = name in self.labelled
            self.labelled.discard(name)
        if was:
            self.on_leave(name)

    def _rerank(self) -> None:
        ranked = sorted(self.traffic.items(), key=lambda kv: -kv[1])[: self.top]
        keep = {name for name, _ in ranked}
        left = self.labelled - keep
        self.labelled = keep
        self.traffic = {n: w / 2 for n, w in self.traffic.items() if w / 2 >= 0.5 or n in keep}
        self._next = time.monotonic() + self.window_s
        for name in left:
            self.on_leave(name)


class EngineMetrics:
    """Every counter the scheduler and caches update; names carry their units."""

    def __init__(self, registry: CollectorRegistry | None = None, top_tasks: int = 20) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batches = Counter("ssf_engine_batches", "Batches executed, by path", ["path"], registry=r)
        self.images = Counter("ssf_engine_images", "Images classified, by path", ["path"], registry=r)
        self.cache_hits = Counter(
            "ssf_engine_cache_hits", "Merged-copy / session cache hits", ["cache"], registry=r
        )
        self.cache_misses = Counter(
            "ssf_engine_cache_misses", "Merged-copy / session cache misses", ["cache"], registry=r
        )
        self.cache_evictions = Counter(
            "ssf_engine_cache_evictions", "Entries evicted from a cache", ["cache"], registry=r
        )
        self.cache_bytes = Gauge("ssf_engine_cache_bytes", "Bytes held by a cache", ["cache"], registry=r)
        self.merge_seconds = Histogram(
            "ssf_engine_merge_seconds",
            "Time to build one merged copy",
            ["kind"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "ssf_engine_batch_seconds",
            "Forward time of one batch",
            ["path"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ssf_engine_batch_size", "Images per executed batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.tasks_per_batch = Histogram(
            "ssf_engine_tasks_per_batch",
            "Distinct tasks per executed batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "ssf_engine_queue_wait_seconds",
            "Time a request waited before its batch ran",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.tenant_queue_wait_seconds = Histogram(
            "ssf_tenant_queue_wait_seconds",
            "Time a request waited before its batch ran, by tenant ('-': requests of no tenant; tenants "
            "are created by an operator, so the series are bounded by configuration)",
            ["tenant"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("ssf_engine_queue_depth", "Images waiting to be scheduled", registry=r)
        self.tasks_resident = Gauge("ssf_engine_tasks_resident", "Task versions resident", registry=r)
        self.rejected = Counter(
            "ssf_engine_rejected", "Requests refused or dropped, by reason", ["reason"], registry=r
        )
        # one series per task (Triton keeps per-model counters too); removed when the task is deleted here
        self.task_images = Counter("ssf_engine_task_images", "Images answered, by task", ["task"], registry=r)
        self.reconciles = Counter(
            "ssf_engine_reconcile_changes", "Task changes picked up from the store", ["kind"], registry=r
        )

        self._task_metrics(r, top_tasks)

    def _task_metrics(self, r: CollectorRegistry, top_tasks: int) -> None:
        self.top_tasks = top_tasks
        self.task_labels = TaskLabels(top_tasks, self._remove_task_series)
        self.task_requests = Counter(
            "ssf_task_requests",
            "Predict requests by task (busiest tasks, the rest 'other')",
            ["task"],
            registry=r,
        )
        self.task_images_top = Counter(
            "ssf_task_images",
            "Images in predict requests by task (busiest tasks, the rest 'other')",
            ["task"],
            registry=r,
        )
        self.task_errors = Counter(
            "ssf_task_errors", "Failed predict requests by task and error code", ["task", "code"], registry=r
        )
        self.task_seconds = Histogram(
            "ssf_task_request_seconds",
            "Predict latency in the engine (admission to answer) by task",
            ["task"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.shadow_images = Counter(
            "ssf_task_shadow_images", "Images also run on the task's staged version", ["task"], registry=r
        )
        self.shadow_agreement = Gauge(
            "ssf_task_shadow_agreement",
            "Top-1 agreement of staged and current version (0..1)",
            ["task"],
            registry=r,
        )
        self.shadow_drift = Gauge(
            "ssf_task_shadow_drift",
            "Mean total variation distance of staged and current softmax (0..1)",
            ["task"],
            registry=r,
        )
        self.eval_accuracy_gauge = Gauge(
            "ssf_task_eval_accuracy",
            "Accuracy of the latest evaluation by task and version",
            ["task", "version"],
            registry=r,
        )
        self._gauged: OrderedDict[tuple[str, ...], bool] = OrderedDict()
        self._error_codes: dict[str, set[str]] = {}
        self._gauge_lock = threading.Lock()

    def task_request(self, name: str | None, images: int, seconds: float, error: str | None) -> None:
        """One predict request; ``name`` None when it did not resolve to a resident task (unknown names
        and requests refused before the lookup are counted as 'other' and never ranked)."""
        label = self.task_labels.label(name) if name is not None else OTHER
        self.task_requests.labels(label).inc()
        self.task_images_top.labels(label).inc(images)
        self.task_seconds.labels(label).observe(seconds)
        if error is not None:
            self.task_errors.labels(label, error).inc()
            if label != OTHER:
                self._error_codes.setdefault(label, set()).add(error)

    def _remove_task_series(self, name: str) -> None:
        for metric in (self.task_requests, self.task_images_top, self.task_seconds):
            try:
                metric.remove(name)
            except KeyError:
                pass
        for code in self._error_codes.pop(name, set()):
            try:
                self.task_errors.remove(name, code)
            except KeyError:
                pass

    def _gauge(self, key: tuple[str, ...], set_value: Callable[[], None]) -> None:
        """Keep gauge series for the ``top_tasks`` most recently updated keys of each kind
        (``key``: the kind, then the series' labels, the task first)."""
        with self._gauge_lock:
            self._gauged.pop(key, None)
            self._gauged[key] = True
            set_value()
            same_kind = [k for k in self._gauged if k[0] == key[0]]
            while len(same_kind) > self.top_tasks:
                gone = same_kind.pop(0)
                del self._gauged[gone]
                self._drop_gauge(gone)

    def _drop_gauge(self, key: tuple[str, ...]) -> None:
        kind, *labels = key
        metrics = [self.eval_accuracy_gauge] if kind == "eval" else [self.shadow_agreement, self.shadow_drift]
        for metric in metrics:
            try:
                metric.remove(*labels)
            except KeyError:
                pass

    def eval_accuracy(self, name: str, version: int, accuracy: float) -> None:
        self._gauge(
            ("eval", name, str(version)),
            lambda: self.eval_accuracy_gauge.labels(name, str(version)).set(accuracy),
        )

    def shadow(self, name: str, images: int, agreement: float, drift: float) -> None:
        def set_values() -> None:
            self.shadow_agreement.labels(name).set(agreement)
            self.shadow_drift.labels(name).set(drift)

        # weight 0: the live request itself counts the traffic; this only takes a free place if there is one
        self.shadow_images.labels(self.task_labels.label(name, 0.0)).inc(images)
        self._gauge(("shadow", name), set_values)

    def forget_task(self, name: str) -> None:
        """The task was deleted: its per-task series go."""
        self.task_labels.forget(name)
        with self._gauge_lock:
            for key in [k for k in self._gauged if k[1] == name]:
                del self._gauged[key]
                self._drop_gauge(key)
