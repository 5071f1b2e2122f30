"""`make bench`: every CPU benchmark in sequence, then BENCHMARKS.md. Budget: under 15 minutes on 2 cores
(about: engine_bench 2 min, compile_bench 3, method_cost 2, many_tasks 6, e2e_bench 3; gpu_bench skips
without CUDA).
The wall time of each is printed at the end, so a run that outgrows the budget says which one did."""

from __future__ import annotations

import importlib
import sys
import time

from bench.report import assemble

# Each module exposes main(quick: bool) and writes its own section under bench/results/.
BENCHMARKS = [
    "bench.engine_bench",
    "bench.compile_bench",
    "bench.method_cost",
    "bench.many_tasks",
    "bench.e2e_bench",
    "bench.shadow_bench",
    "bench.gpu_bench",  # skipped without CUDA
]


def main() -> int:
    quick = "--quick" in sys.argv
    failed = []
    times: dict[str, float] = {}
    for name in BENCHMARKS:
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            print(f"[bench] {name}: not available ({e})", flush=True)
            continue
        try:
            module.main(quick=quick)
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            failed.append(name)
            print(f"[bench] {name} FAILED: {type(e).__name__}: {e}", flush=True)
        times[name] = time.perf_counter() - start
        print(f"[bench] {name}: {times[name]:.0f}s", flush=True)
    print(assemble())
    total = sum(times.values())
    print(
        "[bench] wall time: "
        + ", ".join(f"{n.removeprefix('bench.')} {t / 60:.1f} min" for n, t in times.items())
        + f"; total {total / 60:.1f} min (budget 15)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
