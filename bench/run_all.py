"""`make bench`: every CPU benchmark in sequence, then BENCHMARKS.md. Budget: 15 minutes on 2 cores (on a
2-vCPU AMD EPYC host, 2026-12-01, two runs: engine_bench 2.1-2.2 min, compile_bench 0.9 (2.4 with a cold
inductor cache, the first run on a machine), method_cost 1.6, many_tasks 5.0-6.2, e2e_bench 2.3, shadow_bench
0.1, total 13.2-13.6; gpu_bench skips without CUDA). A third run that evening, on a new machine of the
same type (cold inductor cache), bare forwards 1.4-2.1x slower than in those two, merged/bare
null control read up to 1.16: engine_bench 3.2, compile_bench 2.3, method_cost 2.4, many_tasks 7.3,
e2e_bench 2.7, shadow_bench 0.2, total 18.2, over the budget by the host's speed. On a 2-vCPU Intel Xeon
host (2026-12-02): 18.4 min with a cold inductor cache, 17.5 min the next run (many_tasks 7.4 of it).
The wall time of each is printed at the end, so a run that outgrows the budget says which one did."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.report import ROOT, assemble

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
        # each in a process of its own: what one leaves behind (OpenMP teams of the threads that ran its
        # forwards, allocator state, the heap it froze) must not slow the next
        code = f"import {name} as b; b.main(quick={quick})"
        rc = subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode
        if rc != 0:  # one broken benchmark must not hide the others' numbers
            failed.append(name)
            print(f"[bench] {name} FAILED (exit {rc})", flush=True)
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
