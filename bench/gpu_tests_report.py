"""The GPU test run as a BENCHMARKS.md section: the largest measured error per test, dtype and path, from
the JSON lines tests/gpu writes to ``$SSF_GPU_REPORT`` (bench/gpu_run.sh sets it).

    python -m bench.gpu_tests_report /tmp/ssf-gpu/gpu-errors.jsonl "22 passed" "NVIDIA H200"
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from bench.report import RESULTS

BOUND = {"float32": "1e-4 (scores)", "float16": "1e-2 (rel)", "bfloat16": "4e-2 (rel)"}


def section(rows: list[dict[str, object]], outcome: str, device: str) -> str:
    worst: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        key = (str(r["test"]), str(r.get("dtype", "float32")), str(r.get("path", r.get("policy", "-"))))
        w = worst[key]
        w[0] = max(w[0], float(r.get("rel_err", 0.0)))  # type: ignore[arg-type]
        w[1] = max(w[1], float(r.get("score_abs_err", 0.0)))  # type: ignore[arg-type]
        w[2] += 1
    lines = [
        "## GPU tests (tests/gpu, marker `gpu`)",
        "",
        f"Run by `bench/gpu_run.sh` on {device}: **{outcome}**. Each row: the largest error over its cases "
        "against a float64 folded reference (TF32 off for float32).",
        "",
        "| test | dtype | path | cases | max rel. error of logits | max abs. error of scores | bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for (test, dtype, path), (rel, score, n) in sorted(worst.items()):
        lines.append(
            f"| {test} | {dtype} | {path} | {int(n)} | {rel:.2e} | {score:.2e} | {BOUND.get(dtype, '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    path, outcome, device = sys.argv[1], sys.argv[2], sys.argv[3]
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = RESULTS / "61-gpu-tests.md"
    out.write_text(section(rows, outcome, device))
    print(out)


if __name__ == "__main__":
    main()
