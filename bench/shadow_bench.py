"""The cost of shadow traffic: live throughput with 0 %, 10 % and 100 % of requests also run on the task's
staged version, side by side in one run.

What runs is the engine's batch path (``service.engine.shadow.Shadow.run`` around ``run_batch``) on a
``TorchBackend`` with pre-decoded tensors, so the numbers isolate the forward cost of the shadow rows:
mixed batches of one-image requests over 8 tasks (each with a staged version resident), and one-task
batches on the merged path, where shadow rows cost one extra mixed forward. The three fractions are timed
in interleaved repetitions (a fresh random order each round), each gets the median. Writes
``bench/results/60-shadow.md``. Under 2 minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from typing import Any

import torch

import ssf
import ssf.models  # noqa: F401  (registers ssf_demo_vit)
from bench.engine_bench import random_entry, setup
from bench.report import machine_line, write_section
from service.engine.backend import BatchPath
from service.engine.metrics import EngineMetrics
from service.engine.residency import TaskEntry
from service.engine.scheduler import Pending
from service.engine.shadow import Shadow

FRACTIONS = (0.0, 0.1, 1.0)
TASKS = 8


def batch(entries: list[TaskEntry], size: tuple[int, ...], n: int, one_task: bool) -> list[Pending]:
    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        entry = entries[0] if one_task else entries[i % len(entries)]
        x = torch.randn(1, *size, generator=g)
        out.append(Pending(entry, x, time.monotonic() + 3600, None))  # type: ignore[arg-type]
    return out


def measure(model_name: str, batch_size: int, reps: int) -> list[dict[str, Any]]:
    backend, _, entries, size = setup(model_name, TASKS)
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, model_name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    staged: dict[str, TaskEntry] = {}
    for i, e in enumerate(entries):
        other = random_entry(spec, head, e.name, 10_000 + i)
        other.stored = dataclasses.replace(e.stored, version=2)
        backend.install(other)
        staged[e.name] = other
    shadows = {f: Shadow(f, staged.get, EngineMetrics(), seed=0) for f in FRACTIONS}
    rows = []
    for path, one_task in (("mixed", False), ("merged", True)):
        items = batch(entries, size, batch_size, one_task)
        p: BatchPath = "mixed" if path == "mixed" else "merged"
        variants = {f: (lambda s=s, p=p, items=items: s.run(backend, p, items)) for f, s in shadows.items()}
        for fn in variants.values():  # warm-up (and the merged copy built)
            fn()
        times: dict[float, list[float]] = {f: [] for f in FRACTIONS}
        rng = random.Random(0)
        order = list(FRACTIONS)
        with torch.inference_mode():
            for _ in range(reps):
                rng.shuffle(order)
                for f in order:
                    start = time.perf_counter()
                    variants[f]()
                    times[f].append(time.perf_counter() - start)
        base, base_min = statistics.median(times[0.0]), min(times[0.0])
        for f in FRACTIONS:
            median = statistics.median(times[f])
            shadowed = shadows[f].stats(entries[0].name)
            rows.append(
                {
                    "model": model_name,
                    "path": path,
                    "fraction": f,
                    "batch": batch_size,
                    "ms": median * 1e3,
                    "images_per_s": batch_size / median,
                    "relative": base / median,
                    "relative_min": base_min / min(times[f]),
                    "shadowed_task0": shadowed["images"] if shadowed else 0,
                }
            )
            print(f"[shadow_bench] {model_name} {path} {f:.0%}: {median * 1e3:.1f} ms", flush=True)
    return rows


def report(rows: list[dict[str, Any]], reps: int) -> str:
    lines = [
        "## Shadow traffic cost (live throughput with 0 %, 10 %, 100 % shadowed)",
        "",
        machine_line(),
        f"Median of {reps} interleaved repetitions per cell; forward only (pre-decoded tensors), fp32; "
        f"batches of {rows[0]['batch']} one-image requests. Mixed: requests of {TASKS} tasks, each with a "
        "staged version resident; a shadowed request adds its image under the staged version's rows in the "
        "same forward. Merged: one task's batch on its merged copy; its shadow rows run as one extra "
        "mixed forward. Throughput counts live (answered) images only.",
        "",
        "| model | path | shadowed | ms per batch | live images/s | vs 0 % | vs 0 %, fastest runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['path']} | {r['fraction']:.0%} | {r['ms']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['relative']:.2f}x | {r['relative_min']:.2f}x |"
        )
    lines += [
        "",
        "Expected: 10 % adds about 10 % more rows to a mixed batch, 100 % doubles them; on the merged path "
        "any shadowed request costs a mixed forward of the shadow rows (at 10 % a few rows, at 100 % a "
        "second forward of the same size on the slower mixed path).",
    ]
    return "\n".join(lines)


def main(quick: bool = False) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    reps = 3 if quick else 7
    rows = measure("test_vit" if quick else "ssf_demo_vit", 16, reps)
    write_section("60-shadow", report(rows, reps))


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
