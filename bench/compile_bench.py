"""``SSF_TORCH_COMPILE`` on CPU: the mixed path with its trunk compiled, against the eager bare backbone
and the compiled bare backbone, for the small ViTs whose eager mixed path misses the 1.10 goal.

Forward only, fp32, random weights, all-distinct mixed batches; each ratio is the median of interleaved
repeats (bench.engine_bench.interleaved). Compile seconds: the warm-up's two compiles (batch 1, dynamic).

    python -m bench.compile_bench          # writes bench/results/15-compile.md (~3 min)
"""

from __future__ import annotations

import time
from typing import Any

import torch

import ssf
from bench.engine_bench import interleaved, random_entry
from bench.report import machine_line, write_section
from service.engine.metrics import EngineMetrics
from service.engine.torch_backend import TorchBackend

MODELS = ("test_vit", "ssf_demo_vit")
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def measure(name: str, batches: tuple[int, ...], reps: int) -> tuple[list[dict[str, Any]], float]:
    torch._dynamo.reset()
    model = ssf.create_backbone(name, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, name)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    size = tuple(int(d) for d in ssf.sites.input_size(model))
    backend = TorchBackend(
        model, list(spec.sites), torch.device("cpu"), torch.float32, 1 << 34, EngineMetrics()
    )
    entries = [random_entry(spec, head, f"task{i}", i) for i in range(max(batches))]
    for e in entries:
        backend.install(e)
    backend.use_compile()
    runner = backend.mixed.runner
    start = time.perf_counter()
    backend.warmup(torch.zeros(2, *size))
    compile_s = time.perf_counter() - start
    bare_compiled = torch.compile(backend.bare, dynamic=True)
    rows = []
    for b in batches:
        x = torch.randn(b, *size)
        groups = [(entries[i], 1) for i in range(b)]

        def mixed(compiled: bool, x: torch.Tensor = x, g: list[Any] = groups) -> None:
            backend.mixed.runner = runner if compiled else None
            backend.run_mixed(x, g)

        def bare_c(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                bare_compiled(x)

        t = interleaved(
            {
                "bare": lambda x=x: backend.run_bare(x),
                "mixed": lambda: mixed(False),
                "mixed_compiled": lambda: mixed(True),
                "bare_compiled": bare_c,
            },
            reps,
        )
        rows.append(
            {"batch": b, "bare_ms": 1e3 * t["bare"], **{k: t[k] / t["bare"] for k in t if "_min" not in k}}
        )
        print(f"[compile_bench] {name} b={b}: {rows[-1]}", flush=True)
    assert not runner.failed, "torch.compile failed: the compiled column would be the eager path"
    return rows, compile_s


def main(quick: bool = False) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    lines = [
        "## torch.compile of the mixed trunk (`SSF_TORCH_COMPILE`, CPU)",
        "",
        machine_line(),
        "",
        "Forward only, fp32, random weights, all-distinct mixed batches; median of interleaved repeats. "
        "Every ratio is against the eager bare backbone (the merged path's cost). Compile: the warm-up's "
        "compiles (batch 1, then the dynamic batch) before the server is ready.",
    ]
    for name in ("test_vit",) if quick else MODELS:
        rows, compile_s = measure(name, (1, 8) if quick else BATCHES, 3 if quick else 5)
        lines += [
            "",
            f"### {name} (compile {compile_s:.1f} s)",
            "",
            "| batch | bare ms | mixed / bare | mixed compiled / bare | bare compiled / bare | "
            "mixed compiled / bare compiled |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['batch']} | {r['bare_ms']:.2f} | {r['mixed']:.3f} | **{r['mixed_compiled']:.3f}** | "
                f"{r['bare_compiled']:.3f} | {r['mixed_compiled'] / r['bare_compiled']:.3f} |"
            )
        every = max(r["mixed_compiled"] for r in rows)
        from8 = max((r["mixed_compiled"] for r in rows if r["batch"] >= 8), default=float("nan"))
        lines += [
            "",
            f"Compiled mixed / eager bare: worst {every:.3f} over every batch (goal <= 1.10: "
            f"{'met' if every <= 1.10 else 'missed'}), {from8:.3f} from batch 8 (goal <= 1.05: "
            f"{'met' if from8 <= 1.05 else 'missed'}).",
        ]
    print(write_section("15-compile", "\n".join(lines)))


if __name__ == "__main__":
    main()
