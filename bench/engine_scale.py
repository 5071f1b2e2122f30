"""B-scale on this machine: what a resident task costs in memory (10,000 tasks, every row on the device),
whether a large table slows the mixed path, and what a cold task's first prediction costs when the resident
set is bounded (``SSF_MAX_RESIDENT_TASKS``). Called by bench/engine_bench.py, which writes the section."""

from __future__ import annotations

import asyncio
import io
import random
import statistics
import tempfile
import time
from typing import Any

import torch

import ssf
from service.engine.metrics import EngineMetrics
from service.engine.torch_backend import TorchBackend


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def resident_memory(model_name: str, tasks: int, reps: int) -> dict[str, Any]:
    """Install ``tasks`` random tasks (row + head each) and time an all-distinct mixed batch of 16 whose
    tasks are spread over the whole table against one whose tasks sit in its first rows."""
    from bench.engine_bench import paired, random_entry

    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, model_name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    backend = TorchBackend(
        model, list(spec.sites), torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics()
    )
    template = random_entry(spec, head, "t", 0)
    before_tables, before_rss = backend.tables.nbytes(), rss_bytes()  # (RSS includes the entries below)
    # the same tensors for every task: the install copies them into each task's row anyway
    entries = [random_entry(spec, head, f"t{i}", 0, template=template) for i in range(tasks)]
    start = time.perf_counter()
    for e in entries:
        backend.install(e)
    install_s = time.perf_counter() - start
    rss = rss_bytes() - before_rss
    head_bytes = sum(t.nbytes for t in entries[0].head.values())
    row_bytes = backend.tables.nbytes() / backend.tables.capacity
    size = tuple(int(d) for d in ssf.sites.input_size(model))
    x = torch.randn(16, *size)
    rng = random.Random(0)
    near = [(entries[i], 1) for i in range(16)]
    far = [(entries[i], 1) for i in rng.sample(range(tasks), 16)]
    t = paired(
        {"near": lambda: backend.run_mixed(x, near), "far": lambda: backend.run_mixed(x, far)},
        reps,
        base="near",
    )
    return {
        "model": model_name,
        "tasks": tasks,
        "row_bytes": row_bytes,
        "head_bytes": head_bytes,
        "table_mb": (backend.tables.nbytes() - before_tables) / 1e6,
        "rss_per_task": rss / tasks,
        "install_us": 1e6 * install_s / tasks,
        "far": t["far"],
        "capacity": backend.tables.capacity,
    }


def cold_start(model_name: str, stored: int, resident: int, probes: int) -> dict[str, Any]:
    """Engine on a local store with ``stored`` tasks and at most ``resident`` of them resident: the latency
    of a cold task's first prediction (store read, validation, row install, forward) against the same
    task's next (warm) prediction, one 224 px JPEG each, one request at a time."""
    from PIL import Image

    from bench.engine_bench import random_entry
    from service.engine.engine import Engine
    from service.settings import EngineConfig
    from service.store import open_store

    buf = io.BytesIO()
    Image.fromarray((torch.rand(224, 224, 3) * 255).byte().numpy()).save(buf, format="JPEG")
    image = buf.getvalue()

    async def scenario(engine: Engine) -> dict[str, Any]:
        spec = engine.spec  # the engine's own random weights: its fingerprint
        prefix = spec.head_prefix + "."
        base = engine.backend.base  # type: ignore[attr-defined]
        head = {
            k: torch.zeros(10, *v.shape[1:]) for k, v in base.items() if k.startswith(prefix)
        }  # 10 classes
        for i in range(stored):
            data = ssf.delta_to_bytes(random_entry(spec, head, f"c{i}", i).delta)
            await engine.add_task(data, None, replace=False)
        cold, warm = [], []
        # the last ``resident`` uploads are resident: the first ones are cold
        for i in range(probes):
            name = f"c{i}"
            assert name not in engine.residency.entries
            start = time.perf_counter()
            await engine.predict(name, [image], top_k=1)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            await engine.predict(name, [image], top_k=1)
            warm.append(time.perf_counter() - start)
        return {
            "cold_ms": 1e3 * statistics.median(cold),
            "warm_ms": 1e3 * statistics.median(warm),
            "resident_after": len(engine.residency.entries),
        }

    async def main() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            config = EngineConfig(
                max_resident_tasks=resident, reconcile_interval_s=3600, max_queue_delay_ms=0
            )
            engine = Engine(model_name, None, open_store(tmp), config=config, pretrained=False)
            await engine.start()
            try:
                return await scenario(engine)
            finally:
                await engine.stop()

    result = asyncio.run(main())
    return {"model": model_name, "stored": stored, "resident": resident, "probes": probes, **result}
