"""`make bench`: every CPU benchmark in sequence, then BENCHMARKS.md. Budget: under 15 minutes on 2 cores."""

from __future__ import annotations

import importlib
import sys
import time

from bench.report import assemble

# Each module exposes main(quick: bool) and writes its own section under bench/results/.
BENCHMARKS = [
    "bench.engine_bench",
    "bench.method_cost",
    "bench.many_tasks",
    "bench.e2e_bench",
    "bench.shadow_bench",
    "bench.gpu_bench",  # skipped without CUDA
]


def main() -> int:
    quick = "--quick" in sys.argv
    failed = []
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
        print(f"[bench] {name}: {time.perf_counter() - start:.0f}s", flush=True)
    print(assemble())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
