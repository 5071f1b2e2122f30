"""B2/B11 on this machine: many tasks under open-loop load, on the ViT and on the real ImageNet backbone.

One engine per backbone holds every task of the run resident (10,000 on ``ssf_demo_vit``); a cell's traffic
spreads over its first n tasks with a popularity law, so the single-task and the 10,000-task cells run on
the same engine, interleaved (every repeat of every cell in a shuffled order, so a disturbance of the shared
cores lands on different cells). Each request is one pre-decoded 1-image tensor handed to the engine's
scheduler (``engine.scheduler.submit``), so the numbers isolate serving (decoding and HTTP are measured in
``e2e_bench``). Arrivals are open loop (``bench.loadgen``: latency from the scheduled arrival; every run
offers exactly its rate). For each cell, the throughput at the backbone's p99 target comes from the
server's saturated throughput, confirmed by a run at 97% of it (``loadgen.capacity_at_target``); each repeat
of a cell is paired with a saturation run of the single task just before it. Policies:

- ``hybrid``: the engine's ``auto`` path choice (a task's merged copy when it fills a batch or is all that
  waits, else mixed);
- ``merged``: ``path_policy='merged'`` (one task per batch, merged copies in the byte-bounded LRU);
- ``mixed``: ``path_policy='mixed'`` (every batch through the gather sites);
- ``naive``: ``bench.naive_server`` - an LRU of K full per-task models, a copy built from the delta on a
  miss, batches of one task only.

Per run the engine's own counters give the cause of a gap: images per batch, the share of images on the
mixed path, model-thread seconds per image by path, and the event loop's CPU per request (the generator
and the scheduler share that thread; the generator alone is calibrated against a no-op target).

Writes ``bench/results/40-many-tasks.md`` and ``40-many-tasks.png``.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ssf
from bench import loadgen
from bench.report import RESULTS, machine_line, write_section
from service.engine.workers import own_threads

MODEL = "ssf_demo_vit"  # e2e_bench's backbone too
P99_TARGET_S = 0.25
MAX_BATCH = 32
MAX_DELAY_MS = 5.0
NAIVE_K = 16  # full copies the naive server (and the engine's merged-copy LRU) may hold
POLICIES = ("hybrid", "merged", "mixed", "naive")
POPULARITY = ("uniform", "zipf1.0", "zipf1.5", "distinct")
# (lowest rate bisected when latency binds, first overload rate), times the bare backbone's capacity at max
# batch: the engine's policies run near it; the naive server, swapping whole copies, at a small fraction
HIGH = (0.5, 1.5)  # the bare probe reads 5-25% below the engine's own saturation on these hosts
LOW = (0.01, 0.4)


@dataclass(frozen=True)
class Cell:
    tasks: int
    popularity: str  # "single" for one task
    policy: str
    repeats: int = 1
    bracket: tuple[float, float] = HIGH


@dataclass(frozen=True)
class Setup:
    model: str
    input_px: int | None  # None: the backbone's own input size
    max_batch: int
    p99_s: float
    resident: int  # tasks made resident in the engine
    window_s: float  # one run's arrival window
    steps: int  # bisection steps below the saturated rate when its confirming run misses the p99 target
    cells: tuple[Cell, ...]
    note: str = ""


def full_setups() -> list[Setup]:
    vit = (
        Cell(1, "single", "hybrid", 3),
        *(Cell(n, p, "hybrid", 2) for n in (10, 100) for p in POPULARITY),
        Cell(1000, "zipf1.0", "hybrid", 4),
        Cell(10_000, "zipf1.0", "hybrid", 3),
        Cell(1000, "zipf1.0", "mixed"),
        Cell(1000, "zipf1.0", "naive", bracket=LOW),
    )
    lite = (
        Cell(1, "single", "hybrid", 2),
        Cell(10, "uniform", "hybrid", 2),
        Cell(100, "uniform", "hybrid", 2),
        Cell(1000, "zipf1.0", "hybrid", 2),
    )
    return [
        Setup(MODEL, None, MAX_BATCH, P99_TARGET_S, 10_000, 1.5, 3, vit),
        Setup(
            "tf_efficientnet_lite0",
            128,
            16,
            1.0,
            1000,
            1.5,
            3,
            lite,
            note="input 128 px (CPU budget; 224 is its own size), max batch 16, 1,000 tasks resident "
            "(its rows are 336 KB a task: 10,000 would hold about 7 GB with the CPU copies on this "
            "shared 23 GB host)",
        ),
    ]


def quick_setups() -> list[Setup]:
    cells = (
        Cell(1, "single", "hybrid", 2),
        Cell(20, "zipf1.0", "hybrid"),
        Cell(20, "distinct", "mixed"),
        Cell(20, "zipf1.0", "naive", bracket=LOW),
    )
    return [Setup("test_vit", None, 16, P99_TARGET_S, 20, 0.4, 2, cells)]


# ------------------------------------------------------------------------------------------ tasks
def make_spec(model_name: str) -> tuple[torch.nn.Module, ssf.BackboneSpec, dict[str, torch.Tensor]]:
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, model_name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    return model, spec, head


def make_delta(spec: ssf.BackboneSpec, head: dict[str, torch.Tensor], name: str, seed: int) -> ssf.Delta:
    """Random scale ~ 1 + 0.2 N(0, 1), shift ~ 0.2 N(0, 1) at every site, a random head (one draw each)."""
    g = torch.Generator().manual_seed(seed)
    sites_ = [s for s in spec.sites if s.foldable]
    width = sum(s.channels for s in sites_)
    noise = 0.2 * torch.randn(2, width, generator=g)
    noise[0] += 1
    sites, at = {}, 0
    for s in sites_:
        sites[s.path] = (noise[0, at : at + s.channels], noise[1, at : at + s.channels])
        at += s.channels
    heads = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in head.items()}
    labels = [f"{name}-{i}" for i in range(10)]
    return ssf.Delta(name, spec.model, spec.fingerprint, "foldable", "ssf", labels, sites, heads)


def task_name(i: int) -> str:
    return f"task{i:05d}"


def picker(popularity: str, n: int, seed: int) -> Callable[[int], int]:
    """Request index -> task index."""
    if n == 1:
        return lambda i: 0
    if popularity == "distinct":  # round robin: every window of <= n requests is all distinct
        return lambda i: i % n
    rng = random.Random(seed)
    if popularity == "uniform":
        return lambda i: rng.randrange(n)
    s = float(popularity.removeprefix("zipf"))
    cum, total = [], 0.0
    for k in range(n):
        total += 1 / (k + 1) ** s
        cum.append(total)
    return lambda i: min(bisect.bisect_left(cum, rng.random() * total), n - 1)


def save_weights(model: torch.nn.Module, directory: Path) -> Path:
    """The backbone's random weights as a safetensors file, so the engine's backbone is the same one."""
    import safetensors.torch

    path = directory / "backbone.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def capacity(model: torch.nn.Module, x1: torch.Tensor, batch: int, reps: int) -> float:
    """Images/s of the bare backbone at ``batch`` (best of reps): the scale of the rate search."""
    x = x1.expand(batch, *x1.shape[1:]).contiguous()
    best = math.inf
    with torch.inference_mode():
        model(x)
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return batch / best


# -------------------------------------------------------------------------------------- servers
async def drain(engine: Any) -> None:
    """Until the engine's scheduler has nothing queued or running (bounded: 30 s)."""
    sched = engine.scheduler
    for _ in range(3000):
        if not sched.queue and not sched.busy:
            return
        await asyncio.sleep(0.01)


class EngineTarget:
    def __init__(self, engine: Any, x: torch.Tensor) -> None:
        self.engine, self.x = engine, x
        self.entries = [engine.residency.entries[task_name(i)] for i in range(len(engine.residency.entries))]

    def send(self, i: int) -> Any:
        return self.engine.scheduler.submit(self.entries[i], self.x, time.monotonic() + 30)

    def set_policy(self, policy: str) -> None:
        sched = self.engine.scheduler
        sched.config = sched.config.model_copy(update={"path_policy": {"hybrid": "auto"}.get(policy, policy)})
        cache = self.engine.backend.cache
        for key in list(cache.keys()):  # every cell starts from a cold cache and fresh cost estimates
            cache.discard(key)
        sched.costs.__init__()  # type: ignore[misc]

    def counters(self) -> dict[str, float]:
        get = self.engine.metrics.registry.get_sample_value
        out: dict[str, float] = {}
        for path in ("merged", "mixed"):
            out[f"{path}_batches"] = get("ssf_engine_batches_total", {"path": path}) or 0.0
            out[f"{path}_images"] = get("ssf_engine_images_total", {"path": path}) or 0.0
            out[f"{path}_s"] = get("ssf_engine_batch_seconds_sum", {"path": path}) or 0.0
        return out

    async def drain(self) -> None:
        await drain(self.engine)


class NaiveTarget:
    def __init__(self, server: Any, names: list[str], x: torch.Tensor) -> None:
        self.server, self.names, self.x = server, names, x

    def send(self, i: int) -> Any:
        return self.server.submit(self.names[i], self.x)

    def counters(self) -> dict[str, float]:
        s = self.server
        return {"loads": s.loads, "build_s": s.build_s, "forward_s": s.forward_s, "batches": s.batches}

    async def drain(self) -> None:
        for _ in range(3000):
            if not self.server.queue:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)


async def build_engine(setup: Setup, weights: Path, copy_bytes: int, deltas: list[ssf.Delta]) -> Any:
    """An engine with every delta resident. Uploading 10,000 deltas through ``add_task`` (serialise,
    validate, store) would take minutes of the budget, so the rows go in directly: one call on the model
    thread installs them all (``backend.install``, what an upload does after validating and packing),
    then each version is published. The in-memory store stays empty; nothing reads it during the runs."""
    from service.engine.engine import Engine
    from service.engine.residency import TaskEntry
    from service.settings import EngineConfig
    from service.store.base import StoredTask
    from tests.helpers.stores import MemoryStore

    engine = Engine(
        setup.model,
        weights,
        MemoryStore(),
        pretrained=False,
        config=EngineConfig(
            device="cpu",
            torch_threads=threads(),
            max_batch_size=setup.max_batch,
            max_queue_delay_ms=MAX_DELAY_MS,
            max_queue_size=16384,
            max_cache_bytes=NAIVE_K * copy_bytes + 1,
            reconcile_interval_s=3600,
        ),
    )
    await engine.start()
    gc.collect()
    rss0, start = rss_bytes(), time.perf_counter()
    spec = engine.residency.spec  # packed as an upload's validation packs them
    entries = [TaskEntry(stored=None, delta=ssf.packed(d, spec)) for d in deltas]  # type: ignore[arg-type]
    backend = engine.backend

    def install_all() -> None:
        for e in entries:
            backend.install(e)

    await engine.workers.on_model(install_all)
    for d, e in zip(deltas, entries, strict=True):
        engine.residency.publish(e, StoredTask(d.task, 1, "", 0, "", {"num_classes": d.num_classes}))
    engine.freeze_heap()  # as after a start that loads the stored tasks
    engine.install_stats = {  # type: ignore[attr-defined]
        "n": len(deltas),
        "seconds": time.perf_counter() - start,
        "rss_bytes": rss_bytes() - rss0,
    }
    return engine


# ---------------------------------------------------------------------------------------- the grid
class GcPauses:
    """Full (generation 2) garbage collections and how long each held the interpreter (every request in
    flight waits through one). The engine freezes the heap once the tasks are resident, so a collection
    walks only what was made after that."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._start)

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def runner(
    target: Any, order: list[int], setup: Setup, seed: int, pauses: GcPauses
) -> Callable[[float], Any]:
    """One open-loop run at a rate: the target's counters, the process's CPU and the full garbage
    collections around it, then a drain. Whether the server sustains the rate is the saturation run's
    question (``loadgen.capacity_at_target``); this run answers only whether its latency meets the target."""
    seq = [seed]

    async def run(rate: float) -> dict[str, Any]:
        seq[0] += 1
        before, cpu0, gc0 = target.counters(), time.process_time(), len(pauses.pauses)
        r = await loadgen.open_loop(
            lambda i: target.send(order[i % len(order)]), rate, setup.window_s, seq[0], setup.p99_s
        )
        r["process_cpu_s"] = time.process_time() - cpu0
        r["gc_pauses"] = pauses.pauses[gc0:]
        after = target.counters()
        r["counters"] = {k: after[k] - before[k] for k in after}
        await target.drain()
        return r

    return run


def saturator(
    target: Any, order: list[int], setup: Setup, seed: int
) -> Callable[[float], Awaitable[dict[str, Any]]]:
    """One overload run at a rate (``loadgen.saturated``; the first quarter of the window not counted),
    then a drain."""

    async def saturate(rate: float) -> dict[str, Any]:
        r = await loadgen.saturated(
            lambda i: target.send(order[i % len(order)]), rate, setup.window_s, seed, setup.window_s / 4
        )
        await target.drain()
        return r

    return saturate


def threads() -> int:
    """Intra-op threads of every forward measured here (``BENCH_THREADS``, default 2: 1 while the shared cores
    are busy, for debugging)."""
    return max(1, int(os.environ.get("BENCH_THREADS", "2")))


def on_own_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` with ``threads()`` intra-op threads on a thread that exits afterwards, so the OpenMP team it
    starts goes with it. The event loop's thread must run no parallel torch op before an engine starts:
    its team would stay beside the model thread's, and with more OpenMP threads than cores libgomp stops
    spinning between parallel regions (every forward a fifth slower, the mixed path's more ops more so)."""
    with ThreadPoolExecutor(1, initializer=own_threads, initargs=(threads(),)) as pool:
        return pool.submit(fn).result()


async def measure_setup(setup: Setup, seed: int = 0) -> dict[str, Any]:
    from bench.naive_server import NaiveServer
    from service.engine.merged import MergedBuilder, meta_skeleton

    def prepare() -> tuple[Any, ...]:
        model, spec, head = make_spec(setup.model)
        size = ssf.sites.input_size(model)
        if setup.input_px is not None:
            size = (size[0], setup.input_px, setup.input_px)
        x = torch.randn(1, *size)
        deltas = [make_delta(spec, head, task_name(i), i) for i in range(setup.resident)]
        builder = MergedBuilder(meta_skeleton(model), dict(model.state_dict()), list(spec.sites))
        _, copy_bytes, _ = builder.build(deltas[0].sites, deltas[0].head)
        return model, spec, x, deltas, copy_bytes, capacity(model, x, setup.max_batch, 5)

    model, spec, x, deltas, copy_bytes, cap = on_own_thread(prepare)
    print(f"[many_tasks] {setup.model}: capacity at batch {setup.max_batch}: {cap:.0f} img/s", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="ssf-bench-")
    engine = await build_engine(setup, save_weights(model, Path(tmp.name)), copy_bytes, deltas)
    print(f"[many_tasks] {setup.model}: {engine.install_stats}", flush=True)
    eng = EngineTarget(engine, x)

    async def noop(i: int) -> None:  # the generator alone, for the loop-CPU calibration
        await asyncio.sleep(0)

    calib = await loadgen.open_loop(noop, cap, 1.0, 7, setup.p99_s)
    gen_us = 1e6 * calib["loop_cpu_s"] / max(calib["sent"], 1)

    pauses = GcPauses()
    plan = [(rep, cell) for cell in setup.cells for rep in range(cell.repeats)]
    random.Random(seed).shuffle(plan)
    plan.sort(key=lambda rc: rc[0])  # every cell's first run before any cell's second
    runs: dict[Cell, list[dict[str, Any]]] = {c: [] for c in setup.cells}
    single = next(c for c in setup.cells if c.tasks == 1)
    for rep, cell in plan:
        gc.collect()
        lo, hi = cell.bracket
        ref = None
        if cell is not single:  # the single task right before, for a ratio the host's drift cancels from
            eng.set_policy(single.policy)
            ref = await loadgen.overload(saturator(eng, [0], setup, 100 * rep + 1), single.bracket[1] * cap)
        server = None
        if cell.policy == "naive":
            server = NaiveServer(
                model,
                list(spec.sites),
                {d.task: d for d in deltas[: cell.tasks]},
                NAIVE_K,
                setup.max_batch,
                MAX_DELAY_MS,
                threads(),
            )
            server.start()
            target: Any = NaiveTarget(server, [task_name(i) for i in range(cell.tasks)], x)
        else:
            eng.set_policy(cell.policy)
            target = eng
        pick = picker(cell.popularity, cell.tasks, seed=1000 * rep + cell.tasks)
        order = [pick(i) for i in range(int(cap * 1.2 * setup.window_s) + 64)]
        run = runner(target, order, setup, 100 * rep, pauses)
        await loadgen.open_loop(  # warm-up (merged copies, caches, cost estimates): not reported
            lambda i, t=target, o=order: t.send(o[i % len(o)]), cap * 0.3, 0.5, 99, setup.p99_s
        )
        await target.drain()
        sat, best, tried = await loadgen.capacity_at_target(
            run, saturator(target, order, setup, 100 * rep), hi * cap, setup.p99_s, setup.steps, lo * cap
        )
        if server is not None:
            await server.stop()
        runs[cell].append({"best": best, "tried": tried, "sat": sat, "ref": ref or sat})
        b = best or {}
        print(
            f"[many_tasks] {setup.model} n={cell.tasks} {cell.popularity} {cell.policy} #{rep}: "
            f"{b.get('throughput', 0):.0f} img/s p99 {1e3 * b.get('p99', math.inf):.0f} ms "
            f"(saturated {sat['throughput']:.0f} img/s at {sat['rate']:.0f} offered, the single task "
            f"{(ref or sat)['throughput']:.0f} just before; tried "
            + ", ".join(f"{r['rate']:.0f}:{1e3 * r['p99']:.0f}" for r in tried)
            + ")",
            flush=True,
        )
    pauses.close()
    await engine.stop()
    stats = engine.install_stats
    del engine, eng
    gc.collect()
    tmp.cleanup()
    return {
        "setup": setup,
        "cap": cap,
        "copy_bytes": copy_bytes,
        "runs": runs,
        "install": stats,
        "gen_us": gen_us,
        "row_bytes": 8 * sum(s.channels for s in spec.sites if s.foldable),
    }


# -------------------------------------------------------------------------------------- summaries
def tput(run: dict[str, Any]) -> float:
    return run["best"]["throughput"] if run["best"] else 0.0


def summary(cell: Cell, runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The median repeat (its run at the highest passing rate), the spread of repeats, and each repeat's
    paired ratio: its rate at the target over the single task's saturated throughput measured just before
    it (times ``loadgen.CONFIRM``, the fraction a passing confirmation runs at), so a host that slows down
    between repeats moves both sides of the ratio alike. The single-task cell's own repeats are paired with
    themselves: how far below ``CONFIRM`` of saturation the single task meets its target."""
    values = [tput(r) for r in runs]
    med = statistics.median(values)
    mid = min(runs, key=lambda r: abs(tput(r) - med))
    s: dict[str, Any] = {"cell": cell, "tput": med, "values": values, "best": mid["best"]}
    s["spread"] = (max(values) - min(values)) / med if med > 0 and len(values) > 1 else None
    s["paired"] = [tput(r) / max(loadgen.CONFIRM * r["ref"]["throughput"], 1e-9) for r in runs]
    s["paired_med"] = statistics.median(s["paired"])
    s["paired_spread"] = (
        (max(s["paired"]) - min(s["paired"])) / s["paired_med"]
        if s["paired_med"] > 0 and len(runs) > 1
        else None
    )
    every = [r for run in runs for r in run["tried"]]
    s["gc"] = [p for r in every for p in r.get("gc_pauses", [])]
    hit = [r for r in every if r.get("gc_pauses")]
    s["gc_runs"], s["gc_failed"] = len(hit), sum(1 for r in hit if not loadgen.meets(r, target))
    s["sat"] = statistics.median(r["sat"]["throughput"] for r in runs)
    b = mid["best"]
    if b is None:
        return s
    c = b["counters"]
    s["loop_us"] = 1e6 * b["loop_cpu_s"] / max(b["sent"], 1)
    if cell.policy == "naive":
        s["per_image_ms"] = 1e3 * c["forward_s"] / max(b["sent"], 1)
        s["batch"] = b["sent"] / max(c["batches"], 1)
        s["loads"] = c["loads"]
        return s
    images = c["merged_images"] + c["mixed_images"]
    s["batch"] = images / max(c["merged_batches"] + c["mixed_batches"], 1)
    s["mixed_share"] = c["mixed_images"] / max(images, 1)
    s["per_image_ms"] = 1e3 * (c["merged_s"] + c["mixed_s"]) / max(images, 1)
    for path in ("merged", "mixed"):
        if c[f"{path}_images"]:
            s[f"{path}_ms"] = 1e3 * c[f"{path}_s"] / c[f"{path}_images"]
    return s


def fmt_ms(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v * 1e3:.0f}"


def cell_label(c: Cell) -> str:
    return f"{c.tasks:,} {c.popularity}" + ("" if c.policy == "hybrid" else f" ({c.policy})")


def explain(s: dict[str, Any], single: dict[str, Any], ratio: float, goal: float) -> str:
    """The measured cause of a missed ratio, from the engine's own counters in the two cells' runs."""
    if not s.get("best") or "per_image_ms" not in s or "per_image_ms" not in single:
        return f"{cell_label(s['cell'])}: no rate met the target, so no run to take apart."
    cost = single["per_image_ms"] / s["per_image_ms"]  # the throughput ratio the model thread explains
    parts = [
        f"{cell_label(s['cell'])} reached {ratio:.2f} (goal {goal:.2f}): its model thread spent "
        f"{s['per_image_ms']:.2f} ms per image against {single['per_image_ms']:.2f} ms in the single-task "
        f"cell ({cost:.2f} of its speed), at {s['batch']:.1f} images per batch (single {single['batch']:.1f})"
    ]
    if "mixed_share" in s:
        parts.append(
            f"with {100 * s['mixed_share']:.0f}% of images on the mixed path"
            + (f" ({s['mixed_ms']:.2f} ms/image there" if "mixed_ms" in s else "")
            + (f", {s['merged_ms']:.2f} on merged copies)" if "merged_ms" in s else ")" * ("mixed_ms" in s))
        )
    parts.append(
        f"the event loop (generator + scheduler) took {s['loop_us']:.0f} us per request "
        f"(single {single['loop_us']:.0f})"
    )
    if s.get("gc_failed"):
        parts.append(
            f"{s['gc_failed']} of its runs that failed held a full garbage collection "
            f"(longest {1e3 * max(s['gc']):.0f} ms, the interpreter stopped)"
        )
    if cost <= ratio + 0.03:
        why = (
            "so the model time per image accounts for the gap: "
            + (
                "most batches mix tasks and pay the mixed path's per-site gather and multiply-add"
                if s.get("mixed_share", 0) > 0.5
                else "the batches it formed were smaller"
            )
            + (
                ", and smaller batches than the single task's"
                if s["batch"] < 0.9 * single["batch"] and s.get("mixed_share", 0) > 0.5
                else ""
            )
        )
    else:
        why = (
            f"so the model thread explains {cost:.2f} and the rest ({cost - ratio:.2f}) is outside the "
            "forward: batch formation and scheduling on the event loop, and the run-to-run spread of the "
            "search"
        )
    return "; ".join(parts) + "; " + why + "."


def setup_report(res: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, str, bool]]]:
    setup: Setup = res["setup"]
    sums = [summary(c, res["runs"][c], setup.p99_s) for c in setup.cells]
    single = next(s for s in sums if s["cell"].tasks == 1)
    goals: list[tuple[str, str, str, bool]] = []

    def vs_single(s: dict[str, Any]) -> float:
        """The cell's median paired ratio over the single task's own (1 when it met the target at
        ``CONFIRM`` of its saturated throughput)."""
        return float(s["paired_med"] / max(single["paired_med"], 1e-9))

    misses: list[str] = []

    def goal(s: dict[str, Any], target: float) -> None:
        ratio = vs_single(s)
        ok = ratio >= target
        goals.append(
            (
                f"{setup.model}: hybrid, {cell_label(s['cell'])} vs single task",
                f">= {target:.2f}",
                f"{ratio:.2f} (paired; medians {s['tput']:.0f} vs {single['tput']:.0f} img/s)",
                ok,
            )
        )
        if not ok:
            spread = max(single["paired_spread"] or 0.0, s["paired_spread"] or 0.0)
            noise = (
                f" The gap ({target - ratio:.2f}) is inside the spread of repeats here "
                f"({100 * spread:.0f}%): this run cannot tell a miss from noise."
                if spread and ratio * (1 + spread) >= target
                else ""
            )
            misses.append(explain(s, single, ratio, target) + noise)

    hybrid = [s for s in sums if s["cell"].policy == "hybrid" and s["cell"].tasks > 1]
    for s in hybrid:
        n = s["cell"].tasks
        if n in (10, 100):
            goal(s, 0.90)
        elif n == 1000 and s["cell"].popularity == "zipf1.0":
            goal(s, 0.95)
        elif n == 10_000:
            goal(s, 0.90)
    key = next((s for s in hybrid if s["cell"].popularity == "zipf1.0" and s["cell"].tasks >= 1000), None)
    naive = next((s for s in sums if s["cell"].policy == "naive"), None)
    if key is not None and naive is not None and naive["cell"].tasks == key["cell"].tasks:
        x = key["paired_med"] / max(naive["paired_med"], 1e-9)
        goals.append(
            (
                f"{setup.model}: hybrid vs naive server, {cell_label(naive['cell'])}",
                ">= 5x",
                f"{x:.1f}x (paired; medians {key['tput']:.0f} vs {naive['tput']:.0f} img/s)",
                x >= 5,
            )
        )
        if x < 5:
            misses.append(
                f"hybrid vs naive {x:.1f}x (goal 5x): the naive server built {naive.get('loads', 0):.0f} "
                "copies in its median run; a copy of this backbone is built from the resident base in "
                "tens of ms here, so swapping is cheap on a CPU and it loses only what one-task batches "
                "lose."
            )
    ins = res["install"]
    px = f"{setup.input_px} px" if setup.input_px else "its own input size"
    lines = [
        f"### `{setup.model}` ({px}, max batch {setup.max_batch}, p99 target {setup.p99_s * 1e3:.0f} ms)",
        "",
        f"{setup.note + '. ' if setup.note else ''}Bare-backbone capacity at batch {setup.max_batch}: "
        f"{res['cap']:.0f} img/s (the search's scale). {ins['n']:,} tasks resident, installed in "
        f"{ins['seconds']:.1f} s ({1e3 * ins['seconds'] / max(ins['n'], 1):.2f} ms each: rows on the model "
        f"thread in one call, then published), RSS +{ins['rss_bytes'] / 1e6:.0f} MB "
        f"({ins['rss_bytes'] / max(ins['n'], 1) / 1e3:.0f} KB a task; its scale + shift rows are "
        f"{res['row_bytes'] / 1e3:.0f} KB). Runs of {setup.window_s:g} s (saturation counted over the last "
        f"{0.75 * setup.window_s:g} s). The generator alone costs {res['gen_us']:.0f} us of event-loop CPU "
        "per request.",
        "",
        "| tasks | popularity | policy | runs | img/s at target (median) | spread of repeats | vs single "
        "(paired) | its spread | saturated img/s | p50 ms | p95 ms | p99 ms | images / batch | "
        "on mixed path | model ms / image | loop CPU us / req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sums:
        c, b = s["cell"], s["best"] or {"p50": math.inf, "p95": math.inf, "p99": math.inf}
        spread = (
            "-"
            if s["spread"] is None
            else f"{100 * s['spread']:.1f}% ({', '.join(f'{v:.0f}' for v in s['values'])})"
        )
        lines.append(
            f"| {c.tasks:,} | {c.popularity} | {c.policy} | {len(s['values'])} | {s['tput']:.0f} | "
            f"{spread} | "
            f"{vs_single(s):.2f} | "
            + ("-" if s["paired_spread"] is None else f"{100 * s['paired_spread']:.1f}%")
            + f" | {s['sat']:.0f} | {fmt_ms(b['p50'])} | "
            f"{fmt_ms(b['p95'])} | "
            f"{fmt_ms(b['p99'])} | {s.get('batch', 0):.1f} | "
            + (f"{100 * s['mixed_share']:.0f}%" if "mixed_share" in s else f"{s.get('loads', 0):.0f} loads")
            + f" | {s.get('per_image_ms', math.nan):.2f} | {s.get('loop_us', math.nan):.0f} |"
        )
    pauses = [p for x in sums for p in x["gc"]]
    if pauses:
        hit, failed = sum(x["gc_runs"] for x in sums), sum(x["gc_failed"] for x in sums)
        lines += [
            "",
            f"Full garbage collections during the runs: {len(pauses)}, median "
            f"{1e3 * statistics.median(pauses):.0f} ms, longest {1e3 * max(pauses):.0f} ms (each holds the "
            f"interpreter); {failed} of the {hit} runs that held one missed the target (the engine freezes "
            "the heap once the tasks are resident, `Engine.freeze_heap`: what the collector still walks was "
            "made during the runs).",
        ]
    if misses:
        lines += ["", "Measured causes of the misses:", ""] + [f"- {m}" for m in misses]
    return lines, goals


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        setup: Setup = res["setup"]
        sums = [summary(c, res["runs"][c], setup.p99_s) for c in setup.cells]
        single = next(s for s in sums if s["cell"].tasks == 1)["paired_med"]
        for pop, marker in zip(POPULARITY, "os^x", strict=True):
            rs = sorted(
                (s for s in sums if s["cell"].popularity == pop and s["cell"].policy == "hybrid"),
                key=lambda s: s["cell"].tasks,
            )
            if rs:
                ax.plot(
                    [1] + [s["cell"].tasks for s in rs],
                    [1.0] + [s["paired_med"] / single for s in rs],
                    marker + "-",
                    label=pop,
                )
        ax.axhline(0.95, color="gray", ls="--", lw=0.8)
        ax.axhline(0.90, color="gray", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tasks in the traffic")
        ax.set_ylabel("hybrid throughput / single task")
        ax.set_title(f"{setup.model} (p99 <= {setup.p99_s * 1e3:.0f} ms)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: list[dict[str, Any]], seconds: float) -> str:
    body: list[str] = []
    goals: list[tuple[str, str, str, bool]] = []
    for res in results:
        lines, g = setup_report(res)
        body += [""] + lines
        goals += g
    met = sum(ok for *_, ok in goals)
    lines = [
        "## Many tasks under open-loop load (B2, B11 on CPU)",
        "",
        machine_line(),
        "One engine per backbone (random weights, fp32) with every task resident; a cell's traffic goes to "
        "its first n tasks (uniform, Zipf s = 1.0 / 1.5 by task rank, or round-robin 'distinct'), each "
        "request one pre-decoded image handed to the engine's scheduler (max delay "
        f"{MAX_DELAY_MS:g} ms). Open-loop arrivals from `bench/loadgen.py` (exactly rate x window "
        "requests, uniformly placed, latency from the scheduled arrival). The throughput at the p99 target "
        "comes from the server's saturated throughput (`loadgen.capacity_at_target`): arrivals above what "
        f"it sustains (from {HIGH[1]:g}x the bare capacity, re-run at 1.4x what was answered while the offer "
        f"was not {loadgen.OVERLOAD[0]:g}-{loadgen.OVERLOAD[1]:g}x of it), counting the answers "
        "completed after the first quarter of the window (the queue filling, batches growing to their "
        f"largest); then a run at {100 * loadgen.CONFIRM:.0f}% of that rate must meet the p99 target with "
        "nothing lost (when it misses, the rate steps down, then is bisected). A rate above the saturated "
        "throughput cannot be sustained and one below it is, so the result lies within "
        f"{100 * (1 - loadgen.CONFIRM):.0f}% of the highest sustainable rate, read "
        "from one continuous count rather than from a bisection's pass/fail runs at the edge (whose "
        "outcome, with dynamic batching keeping the model busy at every rate near the limit, the host's "
        "noise decided: repeats of one cell spread up to 33% that way). Every repeat of every cell runs "
        "in one shuffled, interleaved order on the same engine, and each repeat of a cell other than the "
        "single task is paired with a saturation run of the single task just before it: its ratio to the "
        f"single task is its rate at the target over {100 * loadgen.CONFIRM:.0f}% of that reference (then "
        "over the single task's own median of the same, 1.00 when the single task meets its target at "
        f"{100 * loadgen.CONFIRM:.0f}% of its saturation), "
        "and a goal reads the median of those per-repeat ratios, so the host's drift between repeats "
        "(the same cell's saturated throughput moved 35% within a minute on this shared host) cancels. "
        "The table gives the median repeat, the spread (max - min) / median of the repeats' rates and of "
        "their paired ratios. The merged-copy LRU (engine) and the naive server hold "
        f"{NAIVE_K} full copies. Columns after p99 come from the engine's counters during the median "
        "repeat's run at the target. "
        f"Wall time {seconds / 60:.1f} min.",
        "",
        "### Goals",
        "",
        "| goal | target | result | met |",
        "|---|---|---|---|",
        *(f"| {g} | {t} | {r} | {'yes' if ok else 'no'} |" for g, t, r, ok in goals),
        "",
        f"{met} of {len(goals)} met.",
        *body,
        "",
        "![hybrid throughput vs tasks](bench/results/40-many-tasks.png)",
    ]
    return "\n".join(lines)


async def run_grid(quick: bool) -> list[dict[str, Any]]:
    setups = quick_setups() if quick else full_setups()
    only = os.environ.get("BENCH_MODELS")  # e.g. "ssf_demo_vit" while debugging one backbone
    return [await measure_setup(s) for s in setups if not only or s.model in only.split(",")]


def run_loop(coro: Any) -> Any:
    """On uvloop, the loop uvicorn serves on (uvicorn[standard]); plain asyncio where it is missing."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(quick: bool = False) -> None:
    start = time.perf_counter()
    results = run_loop(run_grid(quick))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS / "40-many-tasks.png")
    print(write_section("40-many-tasks", report(results, time.perf_counter() - start)))
    print(f"[many_tasks] {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
