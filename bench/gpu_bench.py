"""The GPU set (run whenever CUDA is present): ViT-B/16 at 224 in fp16/bf16, batch up to 256.

Per dtype and batch: bare backbone, merged path and mixed path (all-distinct tasks) timed side by side
(interleaved, CUDA-synchronised, median), images/s and model FLOP utilisation (forward FLOPs counted by
``torch.utils.flop_counter`` times images/s over the device's dense peak for that dtype), and the merge
time of one task on the device. Writes ``bench/results/60-gpu.md``. Without CUDA it writes nothing new:
the section keeps the last GPU run, or says that none has run yet.

    python -m bench.gpu_bench                   # the full set on cuda:0
    python -m bench.gpu_bench --device cpu --model test_vit --dtypes float32 --batches 1 2   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import ssf
from bench.engine_bench import interleaved, random_entry
from bench.report import RESULTS, machine_line, write_section
from service.engine.metrics import EngineMetrics
from service.engine.torch_backend import TorchBackend

SECTION = "60-gpu"
# Dense tensor-core peaks (FLOP/s) from the vendors' data sheets, SXM parts; fp32 is the non-tensor peak.
PEAKS = {
    "H100": {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12},
    "H200": {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12},
    "A100": {"float16": 312e12, "bfloat16": 312e12, "float32": 19.5e12},
}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[dtype] for k, p in PEAKS.items() if k in name), None)


def forward_flops(model_name: str) -> float:
    """FLOPs of one image's forward (multiply-add = 2 FLOPs), counted on the CPU in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    size = tuple(int(d) for d in ssf.sites.input_size(model))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *size))
    return float(counter.get_total_flops())


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def measure(
    model_name: str, device: torch.device, dtypes: list[str], batches: list[int], reps: int
) -> dict[str, Any]:
    flops = forward_flops(model_name)
    rows, merges = [], {}
    for dtype_name in dtypes:
        dtype_rows, merges[dtype_name] = measure_dtype(model_name, device, dtype_name, batches, reps)
        for r in dtype_rows:
            peak = peak_flops(device, dtype_name)
            r["mfu"] = flops * r["img_s"] / peak if peak else None
        rows += dtype_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": model_name, "device": device, "flops": flops, "rows": rows, "merges": merges}


def measure_dtype(
    model_name: str, device: torch.device, dtype_name: str, batches: list[int], reps: int
) -> tuple[list[dict[str, Any]], float]:
    dtype = getattr(torch, dtype_name)
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, model_name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    size = tuple(int(d) for d in ssf.sites.input_size(model))
    backend = TorchBackend(model, list(spec.sites), device, dtype, 1 << 36, EngineMetrics())
    graphed = None
    if device.type == "cuda":
        backend.use_cuda_graphs(max(batches))
        graphed, backend.mixed.runner = backend.mixed.runner, None
    entries = [random_entry(spec, head, f"task{i}", i) for i in range(max(batches))]
    for e in entries:
        backend.install(e)
    hot = entries[0]
    times = []
    for _ in range(max(3, reps)):
        synced(lambda: None, device)()
        start = time.perf_counter()
        synced(lambda: backend.builder.build(hot.delta.sites, hot.head), device)()
        times.append(time.perf_counter() - start)
    merge_ms = 1e3 * statistics.median(times[1:])
    rows = []
    for b in batches:
        x = torch.randn(b, *size).to(device=device, dtype=dtype)
        groups = [(entries[i], 1) for i in range(b)]
        backend.run_merged(hot, x)

        def mixed(x: torch.Tensor = x, g: list[Any] = groups, graph: Any = None) -> None:
            backend.mixed.runner = graph
            backend.run_mixed(x, g)
            backend.mixed.runner = None

        runs: dict[str, Callable[[], None]] = {
            "bare": synced(partial(backend.run_bare, x), device),
            "merged": synced(partial(backend.run_merged, hot, x), device),
            "mixed": synced(mixed, device),
        }
        if graphed is not None:
            runs["mixed_graph"] = synced(lambda: mixed(graph=graphed), device)
        t = interleaved(runs, reps)
        rows.append(
            {
                "dtype": dtype_name,
                "batch": b,
                "bare_ms": 1e3 * t["bare"],
                "merged": t["merged"] / t["bare"],
                "mixed": t["mixed"] / t["bare"],
                "mixed_graph": t["mixed_graph"] / t["bare"] if "mixed_graph" in t else None,
                "img_s": b / t["bare"],
            }
        )
        print(f"[gpu_bench] {dtype_name} b={b}: {rows[-1]}", flush=True)
    return rows, merge_ms


def plot(results: list[dict[str, Any]], path: Any) -> None:
    """Per model: images/s of the bare backbone, and the path/bare ratios, against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for (left, right), res in zip(axes, results, strict=True):
        for dtype in dict.fromkeys(r["dtype"] for r in res["rows"]):
            rs = [r for r in res["rows"] if r["dtype"] == dtype]
            bs = [r["batch"] for r in rs]
            left.plot(bs, [r["img_s"] for r in rs], "o-", label=dtype)
            right.plot(bs, [r["mixed"] for r in rs], "s-", label=f"mixed / bare, {dtype}")
            if rs[0].get("mixed_graph") is not None:
                right.plot(
                    bs, [r["mixed_graph"] for r in rs], "^-", label=f"mixed (CUDA graph) / bare, {dtype}"
                )
            right.plot(bs, [r["merged"] for r in rs], "o--", label=f"merged / bare, {dtype}")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.legend(fontsize=7)
        left.set(ylabel="images/s (bare backbone)", title=res["model"])
        right.axhline(1.0, color="gray", lw=0.8)
        right.set(ylabel="time ratio (lower is faster)", title=res["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "## GPU set: ViT-B/16 and EfficientNet-Lite0 at 224, fp16/bf16 (B1, B3 on GPU)",
        "",
        machine_line(),
    ]
    if results and results[0]["device"].type == "cuda":
        lines.append(
            f"Device: **{torch.cuda.get_device_name(results[0]['device'])}**, torch {torch.__version__}."
        )
    lines += [
        "",
        "`python -m bench.gpu_bench`: random weights, pre-decoded tensors on the device, mixed batches of "
        "all-distinct tasks, each time the median of interleaved repeats, every forward synchronised and "
        "its logits copied to the host (as the server does). MFU = forward FLOPs x images/s of the bare "
        'backbone / the device\'s dense peak for the dtype. "mixed (graph)" is the mixed path replayed '
        "from CUDA graphs (`SSF_CUDA_GRAPHS=true`), the bare backbone stays eager.",
    ]
    for res in results:
        lines += [
            "",
            f"### {res['model']} (forward {res['flops'] / 1e9:.2f} GFLOP per image)",
            "",
            "| dtype | batch | bare ms | img/s | MFU | merged / bare | mixed / bare | mixed (graph) / bare |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            graph = f"{r['mixed_graph']:.3f}" if r.get("mixed_graph") is not None else "n/a"
            lines.append(
                f"| {r['dtype']} | {r['batch']} | {r['bare_ms']:.2f} | {r['img_s']:.0f} | {mfu} | "
                f"{r['merged']:.3f} | {r['mixed']:.3f} | {graph} |"
            )
        lines += ["", "| dtype | merge ms |", "|---|---|"]
        lines += [f"| {d} | {ms:.3f} |" for d, ms in res["merges"].items()]
    lines += ["", f"![GPU set](bench/results/{SECTION}.png)"]
    return "\n".join(lines)


def main(quick: bool = False, argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "tf_efficientnet_lite0"])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--reps", type=int, default=5 if quick else 21)
    args = ap.parse_args(argv if argv is not None else [])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        path = RESULTS / f"{SECTION}.md"
        if not path.exists():
            write_section(
                SECTION,
                "## GPU set: ViT-B/16 and EfficientNet-Lite0 at 224, fp16/bf16 (B1, B3 on GPU)\n\nNot "
                "measured yet: no CUDA device on any machine that ran `make bench` so far. "
                "`bash bench/gpu_run.sh` runs tests/gpu and this benchmark on one.",
            )
        print("[gpu_bench] no CUDA device: the GPU set is skipped", flush=True)
        return
    results = [measure(m, device, args.dtypes, args.batches, args.reps) for m in args.models]
    text = report(results)
    if device.type == "cuda":
        plot(results, RESULTS / f"{SECTION}.png")
        write_section(SECTION, text)
    print(text)


if __name__ == "__main__":
    import sys

    main(argv=sys.argv[1:])
