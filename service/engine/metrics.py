"""Prometheus metrics of one engine, in a registry of its own (tests and benchmarks make many).

The HTTP layer serves ``engine.metrics.registry`` at ``GET /metrics`` (``generate_latest(registry)``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineMetrics:
    """Every counter the scheduler and caches update; names carry their units."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
