"""B2/B11 on this machine: many tasks under open-loop Poisson load, four serving policies.

The in-process engine (its real scheduler, dynamic batching and paths) is driven with pre-decoded tensors:
each request is one 1-image tensor handed to ``engine.scheduler.submit`` for the task's resident entry, so
the numbers isolate serving (decoding is measured in ``e2e_bench``). Arrivals are Poisson at a fixed rate
(open loop: a request's latency counts from its scheduled arrival, never from when a busy client got round
to sending it). For each (tasks, popularity, policy) the rate is bisected for the highest throughput whose
p99 stays under the target. Policies:

- ``hybrid``: the engine's ``auto`` path choice (merged copy when one task fills a batch, else mixed);
- ``merged``: ``path_policy='merged'`` (one task per batch, merged copies in the byte-bounded LRU);
- ``mixed``: ``path_policy='mixed'`` (every batch through the gather sites);
- ``naive``: ``bench.naive_server`` - an LRU of K full per-task models, a copy built from the delta on a
  miss, batches of one task only.

Writes ``bench/results/40-many-tasks.md`` and ``40-many-tasks.png``.
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

import ssf
from bench.report import RESULTS, machine_line, write_section

MODEL = "ssf_demo_vit"
P99_TARGET_S = 0.25
MAX_BATCH = 32
MAX_DELAY_MS = 5.0
NAIVE_K = 16  # full copies the naive server (and the engine's merged-copy LRU) may hold
POLICIES = ("hybrid", "merged", "mixed", "naive")
POPULARITY = ("uniform", "zipf1.0", "zipf1.5", "distinct")


# ------------------------------------------------------------------------------------------ tasks
def make_spec(model_name: str) -> tuple[torch.nn.Module, ssf.BackboneSpec, dict[str, torch.Tensor]]:
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, model_name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    return model, spec, head


def make_delta(spec: ssf.BackboneSpec, head: dict[str, torch.Tensor], name: str, seed: int) -> ssf.Delta:
    g = torch.Generator().manual_seed(seed)
    sites = {
        s.path: (1 + 0.2 * torch.randn(s.channels, generator=g), 0.2 * torch.randn(s.channels, generator=g))
        for s in spec.sites
        if s.foldable
    }
    heads = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in head.items()}
    labels = [f"{name}-{i}" for i in range(10)]
    return ssf.Delta(name, spec.model, spec.fingerprint, "foldable", "ssf", labels, sites, heads)


def task_name(i: int) -> str:
    return f"task{i:05d}"


# --------------------------------------------------------------------------------------- traffic
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
    weights = [1 / (k + 1) ** s for k in range(n)]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    import bisect

    return lambda i: min(bisect.bisect_left(cum, rng.random() * total), n - 1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


async def open_loop(
    send: Callable[[int], Awaitable[Any]],
    rate: float,
    duration_s: float,
    seed: int = 0,
    max_requests: int = 20_000,
    slo_s: float = P99_TARGET_S,
    grace_s: float = 5.0,
) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``duration_s`` (bounded in count and time); latency from the
    scheduled arrival. Requests still unanswered ``grace_s`` after the last arrival count as failed."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while len(arrivals) < max_requests:
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        arrivals.append(t)
    lat: list[float | None] = [None] * len(arrivals)
    errors = 0
    first_error: list[str] = []
    t0 = loop.time() + 0.02

    async def one(i: int) -> None:
        nonlocal errors
        try:
            await send(i)
            lat[i] = loop.time() - (t0 + arrivals[i])
        except Exception as e:
            errors += 1
            if not first_error:
                first_error.append(repr(e)[:200])

    tasks = []
    for i, at in enumerate(arrivals):
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    done = [x for x in lat if x is not None]
    # answered requests per second of the arrival window (a run that keeps up serves its offered load;
    # dividing by the drain time too would count the last requests' latency against throughput)
    span = max(duration_s, 1e-9)
    lost = len(arrivals) - len(done)
    tail = done + [math.inf] * lost  # unanswered requests are the slowest
    return {
        "rate": rate,
        "sent": len(arrivals),
        "done": len(done),
        "errors": errors,
        "first_error": first_error[0] if first_error else "",
        "throughput": len(done) / span,
        "goodput": sum(1 for x in done if x <= slo_s) / max(duration_s, 1e-9),
        "p50": percentile(tail, 50),
        "p95": percentile(tail, 95),
        "p99": percentile(tail, 99),
    }


def passes(r: dict[str, Any], target: float = P99_TARGET_S) -> bool:
    return r["p99"] <= target and r["done"] == r["sent"]


async def best_rate(
    run: Callable[[float], Awaitable[dict[str, Any]]], hi: float, steps: int, floor_steps: int = 3
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Bisect the offered rate in (0, hi] for the highest one whose p99 meets the target.

    A rate that misses the target by less than 3x is run once more and counts as met if the repeat meets it
    (one hiccup on shared cores should not decide a row; every policy gets the same second chance). When no
    rate met the target, the rate keeps halving (``floor_steps`` more runs) to find one that does."""
    lo_ok: dict[str, Any] | None = None
    lo, top = 0.0, hi
    rate = hi * 0.6
    tried: list[dict[str, Any]] = []

    async def attempt(rate: float) -> bool:
        r = await run(rate)
        tried.append(r)
        if not passes(r) and r["done"] == r["sent"] and r["p99"] < 3 * P99_TARGET_S:
            r = await run(rate)
            tried.append(r)
        nonlocal lo_ok
        if passes(r):
            lo_ok = r
            return True
        return False

    for _ in range(steps):
        if await attempt(rate):
            lo = rate
        else:
            top = rate
        rate = (lo + top) / 2
    rate = top / 2
    for _ in range(floor_steps if lo_ok is None else 0):
        if await attempt(rate):
            break
        rate /= 2
    return lo_ok, tried


# -------------------------------------------------------------------------------------- servers
class Target:
    """One policy, started with n tasks resident; ``send(task_index)`` serves one pre-decoded image."""

    async def send(self, i: int) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class EngineTarget(Target):
    def __init__(self, engine: Any, names: list[str], x: torch.Tensor) -> None:
        self.engine, self.x = engine, x
        self.entries = [engine.residency.entries[n] for n in names]

    async def send(self, i: int) -> Any:
        return await self.engine.scheduler.submit(self.entries[i], self.x, time.monotonic() + 30)

    def set_policy(self, policy: str) -> None:
        from dataclasses import replace

        sched = self.engine.scheduler
        sched.config = replace(sched.config, path_policy={"hybrid": "auto"}.get(policy, policy))
        self.engine.backend.cache.max_bytes = self.engine.config.max_cache_bytes
        for key in list(self.engine.backend.cache.keys()):  # every policy starts from a cold cache
            self.engine.backend.cache.discard(key)
        sched.costs.__init__()  # type: ignore[misc]


class NaiveTarget(Target):
    def __init__(self, server: Any, names: list[str], x: torch.Tensor) -> None:
        self.server, self.names, self.x = server, names, x

    async def send(self, i: int) -> Any:
        return await self.server.submit(self.names[i], self.x)

    async def close(self) -> None:
        await self.server.stop()


def save_weights(model: torch.nn.Module, directory: Any) -> Any:
    """The backbone's random weights as a safetensors file, so the engine's backbone is the same one."""
    import safetensors.torch

    path = directory / "backbone.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


async def build_engine(
    n: int, deltas: list[ssf.Delta], copy_bytes: int, weights: Any
) -> tuple[Any, list[float]]:
    """An engine on an in-memory store; the n tasks are uploaded through ``add_task`` (timed)."""
    from service.engine.engine import Engine
    from service.settings import EngineConfig
    from tests.helpers.stores import MemoryStore

    engine = Engine(
        MODEL,
        weights,
        MemoryStore(),
        pretrained=False,
        config=EngineConfig(
            device="cpu",
            max_batch_size=MAX_BATCH,
            max_queue_delay_ms=MAX_DELAY_MS,
            max_queue_size=8192,
            max_cache_bytes=NAIVE_K * copy_bytes + 1,
            reconcile_interval_s=3600,
        ),
    )
    await engine.start()
    adds = []
    for d in deltas[:n]:
        data = ssf.delta_to_bytes(d)
        start = time.perf_counter()
        await engine.add_task(data, d.task, False)
        adds.append(time.perf_counter() - start)
    return engine, adds


def capacity(model: torch.nn.Module, x1: torch.Tensor, reps: int) -> float:
    """Images/s of the bare backbone at MAX_BATCH (best of reps): the scale of the rate search."""
    x = x1.expand(MAX_BATCH, *x1.shape[1:]).contiguous()
    best = math.inf
    with torch.inference_mode():
        model(x)
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return MAX_BATCH / best


async def run_grid(quick: bool) -> dict[str, Any]:
    import os

    from bench.naive_server import NaiveServer
    from service.engine.merged import MergedBuilder, meta_skeleton

    counts = (1, 1000) if quick else (1, 10, 100, 1000)
    if os.environ.get("BENCH_SMOKE"):  # a seconds-long run of the whole code path, for debugging
        counts = (1, 20)
    pops = ("zipf1.0", "distinct") if quick else POPULARITY
    duration = 0.7 if quick else 1.0
    steps = 3
    model, spec, head = make_spec(MODEL)
    x = torch.randn(1, *ssf.sites.input_size(model))
    deltas = [make_delta(spec, head, task_name(i), i) for i in range(max(counts))]
    _, copy_bytes, _ = MergedBuilder(meta_skeleton(model), dict(model.state_dict()), list(spec.sites)).build(
        deltas[0].sites, deltas[0].head
    )
    import tempfile
    from pathlib import Path

    tmp = tempfile.TemporaryDirectory(prefix="ssf-bench-")
    weights = save_weights(model, Path(tmp.name))
    cap = capacity(model, x, 3 if quick else 7)
    print(f"[many_tasks] bare capacity at batch {MAX_BATCH}: {cap:.0f} img/s", flush=True)
    rows: list[dict[str, Any]] = []
    adds_all: list[float] = []
    for n in counts:
        engine, adds = await build_engine(n, deltas, copy_bytes, weights)
        adds_all += adds
        names = [task_name(i) for i in range(n)]
        eng = EngineTarget(engine, names, x)
        for pop in pops if n > 1 else ("single",):
            order = list(POLICIES)
            random.Random(f"{n}-{pop}").shuffle(order)  # no policy always runs first after a change
            for policy in order:
                gc.collect()
                if policy == "naive":
                    server = NaiveServer(
                        model,
                        list(spec.sites),
                        {d.task: d for d in deltas[:n]},
                        NAIVE_K,
                        MAX_BATCH,
                        MAX_DELAY_MS,
                    )
                    server.start()
                    target: Target = NaiveTarget(server, names, x)
                else:
                    eng.set_policy(policy)
                    target = eng
                pick = picker(pop, n, seed=n)
                seq = [0]

                async def run(
                    rate: float, target: Target = target, pick: Any = pick, seq: list[int] = seq
                ) -> dict[str, Any]:
                    seq[0] += 1
                    order = [pick(i) for i in range(int(rate * duration * 2) + 100)]
                    return await open_loop(
                        lambda i: target.send(order[i % len(order)]), rate, duration, seq[0]
                    )

                counted = {k: engine.metrics.batches.labels(k)._value.get() for k in ("merged", "mixed")}
                warm = [pick(i) for i in range(int(cap) + 10)]
                await open_loop(  # warm-up (merged copies, caches), not reported
                    lambda i, t=target, w=warm: t.send(w[i % len(w)]), cap * 0.3, 0.5, 99
                )
                key_cfg = n == max(counts) and pop == "zipf1.0" or n == 1
                best, tried = await best_rate(run, cap * 1.15, steps + (2 if key_cfg else 0))
                row = {"tasks": n, "popularity": pop, "policy": policy, "best": best, "tried": tried}
                if policy == "naive":
                    row["loads"] = server.loads
                    row["build_s"], row["forward_s"] = server.build_s, server.forward_s
                    row["naive_batches"] = server.batches
                    await target.close()
                else:
                    for k in ("merged", "mixed"):
                        row[f"{k}_batches"] = engine.metrics.batches.labels(k)._value.get() - counted[k]
                    row["per_image_s"] = dict(engine.scheduler.costs.per_image_s)
                rows.append(row)
                b = best or {}
                print(
                    f"[many_tasks] n={n} {pop} {policy}: best {b.get('throughput', 0):.0f} img/s "
                    f"p99 {1e3 * b.get('p99', math.inf):.0f} ms (tried "
                    + ", ".join(f"{r['rate']:.0f}:{1e3 * r['p99']:.0f}ms" for r in tried)
                    + ")",
                    flush=True,
                )
        await engine.stop()
        del engine, eng
        gc.collect()
    tmp.cleanup()
    return {"rows": rows, "cap": cap, "adds": adds_all, "copy_bytes": copy_bytes, "quick": quick}


# -------------------------------------------------------------------------------------- report
def tput(row: dict[str, Any]) -> float:
    return row["best"]["throughput"] if row["best"] else 0.0


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pops = [p for p in POPULARITY if any(r["popularity"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(pops), figsize=(4.2 * len(pops), 3.6), squeeze=False, sharey=True)
    single = {r["policy"]: tput(r) for r in rows if r["tasks"] == 1}
    for ax, pop in zip(axes[0], pops, strict=True):
        for policy, marker in zip(POLICIES, "os^x", strict=True):
            rs = sorted(
                (r for r in rows if r["policy"] == policy and r["popularity"] == pop),
                key=lambda r: r["tasks"],
            )
            xs = [1] + [r["tasks"] for r in rs]
            ys = [single.get(policy, 0.0)] + [tput(r) for r in rs]
            ax.plot(xs, ys, marker + "-", label=policy)
        ax.set_xscale("log")
        ax.set_xlabel("tasks")
        ax.set_title(pop)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"img/s at p99 <= {P99_TARGET_S * 1e3:.0f} ms")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt_ms(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v * 1e3:.0f}"


def report(res: dict[str, Any]) -> str:
    pop_order = {p: i for i, p in enumerate(("single", *POPULARITY))}
    rows = sorted(
        res["rows"], key=lambda r: (r["tasks"], pop_order[r["popularity"]], POLICIES.index(r["policy"]))
    )
    # the single-task reference: the best of the four policies serving one task (they all serve the same
    # task; taking the best keeps one unlucky search from flattering the many-task ratio)
    single = max((r for r in rows if r["tasks"] == 1), key=tput)
    n_max = max(r["tasks"] for r in rows)
    key = {r["policy"]: r for r in rows if r["tasks"] == n_max and r["popularity"] == "zipf1.0"}
    ratio_single = tput(key["hybrid"]) / max(tput(single), 1e-9)
    ratio_naive = tput(key["hybrid"]) / max(tput(key["naive"]), 1e-9)
    adds = sorted(res["adds"])
    lines = [
        "## Many tasks under open-loop load (B2, B11 on CPU)",
        "",
        machine_line(),
        f"Backbone `{MODEL}` (random weights, fp32), in-process engine fed pre-decoded 1-image tensors "
        f"through its scheduler (max batch {MAX_BATCH}, max delay {MAX_DELAY_MS:g} ms); Poisson arrivals "
        f"at fixed rates, latency from the scheduled arrival (open loop); each rate runs "
        f"{0.7 if res['quick'] else 1.0:g} s after a 0.5 s warm-up; the rate is bisected (3 steps, 5 for the "
        f"single-task and {max(r['tasks'] for r in res['rows'])}-task Zipf 1.0 rows) for the "
        f"highest throughput with p99 <= {P99_TARGET_S * 1e3:.0f} ms and nothing dropped (a rate that "
        "misses by less than 3x is repeated once and counts if the repeat meets the target, the same for "
        "every policy; where no rate met it the rate keeps halving). Bare-backbone "
        f"capacity at batch {MAX_BATCH}: {res['cap']:.0f} img/s (the search's scale). Merged-copy LRU of "
        f"the engine and the naive server: {NAIVE_K} full copies ({res['copy_bytes'] / 1e6:.1f} MB each).",
        "",
        "### Goals",
        "",
        "| goal | target | result | met |",
        "|---|---|---|---|",
        f"| hybrid, {n_max} tasks Zipf 1.0 vs single task (throughput at the p99 target; single = best "
        "policy at 1 task) | >= 0.95 | "
        f"{ratio_single:.2f} ({tput(key['hybrid']):.0f} vs {tput(single):.0f} img/s) | "
        f"{'yes' if ratio_single >= 0.95 else 'no'} |",
        f"| hybrid vs naive server, {n_max} tasks Zipf 1.0, same p99 target | >= 5x | {ratio_naive:.1f}x "
        f"({tput(key['hybrid']):.0f} vs {tput(key['naive']):.0f} img/s) | "
        f"{'yes' if ratio_naive >= 5 else 'no'} |",
        "",
        f"### Throughput at p99 <= {P99_TARGET_S * 1e3:.0f} ms, and the latency at that rate",
        "",
        "| tasks | popularity | policy | offered rate/s | img/s at target | vs single task | p50 ms | p95 ms "
        "| p99 ms | goodput/s | batches merged / mixed (all runs) | naive loads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["best"] or {"p50": math.inf, "p95": math.inf, "p99": math.inf, "goodput": 0.0}
        lines.append(
            f"| {r['tasks']} | {r['popularity']} | {r['policy']} | "
            f"{r['best']['rate'] if r['best'] else 0:.0f} | {tput(r):.0f} | "
            f"{tput(r) / max(tput(single), 1e-9):.2f} | {fmt_ms(b['p50'])} | {fmt_ms(b['p95'])} | "
            f"{fmt_ms(b['p99'])} | {b['goodput']:.0f} | "
            + (
                f"{r['merged_batches']:.0f} / {r['mixed_batches']:.0f} | - |"
                if r["policy"] != "naive"
                else f"- | {r['loads']} |"
            )
        )
    lines += [
        "",
        "Batch counts and naive loads cover all runs of that row (warm-up and search). "
        f"Upload (`add_task`: validate, install rows, store) of {len(adds)} deltas: median "
        f"{1e3 * adds[len(adds) // 2]:.1f} ms, p99 {1e3 * percentile(adds, 99):.1f} ms.",
        "",
        "![throughput at the p99 target vs tasks](bench/results/40-many-tasks.png)",
    ]
    return "\n".join(lines[:12] + explain(rows, key, ratio_single, ratio_naive, n_max) + lines[12:])


def explain(
    rows: list[dict[str, Any]],
    key: dict[str, dict[str, Any]],
    ratio_single: float,
    ratio_naive: float,
    n_max: int,
) -> list[str]:
    """Plain sentences for the goals missed, from what this run measured."""
    out: list[str] = []
    h, nv = key["hybrid"], key["naive"]
    cost = h.get("per_image_s", {})
    if ratio_single < 0.95:
        merged_row = next((r for r in rows if r["tasks"] == 1 and r["policy"] == "merged"), {})
        mixed, merged = cost.get("mixed"), merged_row.get("per_image_s", {}).get("merged")
        detail = (
            f" The hybrid ran {h['merged_batches']:.0f} merged and {h['mixed_batches']:.0f} mixed batches; "
            + (
                f"per image the mixed path cost {mixed * 1e3:.2f} ms there against {merged * 1e3:.2f} ms "
                "on the single task's merged copy (merged-only policy at 1 task; moving averages of "
                "the scheduler's own timings)."
                if mixed and merged
                else "the scheduler had no timing of both paths to compare."
            )
        )
        out += [
            f"Goal missed: {n_max} tasks under Zipf 1.0 reached {ratio_single:.2f} of the single task's "
            "throughput at the p99 target (goal 0.95)." + detail + " With a 5 ms batching window most "
            "batches mix tasks (the hot task rarely has 8 images waiting), so they pay the mixed path's "
            "gather-site overhead (3-5% at batch 16-64 on this backbone in the engine section, more at "
            "small batches) and batch-size noise; the rate search's step (about 5% of capacity) and the "
            "shared cores' noise are of the same size as the gap.",
            "",
        ]
    if ratio_naive < 5:
        forward, build = nv.get("forward_s", 0.0), nv.get("build_s", 0.0)
        out += [
            f"Goal missed: the hybrid served {ratio_naive:.1f}x the naive server's throughput at the same "
            f"p99 target (goal 5x). Profile of the naive server over its runs in that row: "
            f'{nv["loads"]} copies built ("loads") in {build:.1f} s against {forward:.1f} s of forwards in '
            f"{nv.get('naive_batches', 0)} batches. On this CPU a copy of this small backbone is built in "
            f"{1e3 * build / max(nv['loads'], 1):.1f} ms on average from the resident base while a forward "
            f"of a batch costs {1e3 * forward / max(nv.get('naive_batches', 0), 1):.1f} ms, so swapping is "
            "cheap "
            "and the naive server loses only what its one-task batches lose; the 5x gap the anchors show "
            "comes from loads that cost seconds (reading a full checkpoint, a GPU copy over PCIe) and from "
            "GPUs, where a small batch costs almost as much as a full one. A GPU run (or real per-task "
            "checkpoints loaded from disk) is what would show it.",
            "",
        ]
    return out


def main(quick: bool = False) -> None:
    import os

    threads = int(os.environ.get("BENCH_THREADS", "2"))  # 1 while the shared cores are busy (debugging)
    torch.set_num_threads(max(1, min(threads, torch.get_num_threads())))
    start = time.perf_counter()
    res = asyncio.run(run_grid(quick))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(res["rows"], RESULTS / "40-many-tasks.png")
    print(write_section("40-many-tasks", report(res)))
    print(f"[many_tasks] {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
