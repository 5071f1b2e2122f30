"""The GPU benchmark cannot run here (no CUDA), so its code path is exercised on the CPU with a tiny model:
a script that only runs on a lent GPU must not be found broken there."""

from __future__ import annotations

from pathlib import Path

import torch

from bench import gpu_bench


def test_gpu_bench_runs_on_cpu_and_reports_every_cell(tmp_path: Path) -> None:
    res = gpu_bench.measure("test_vit", torch.device("cpu"), ["float32"], [1, 2], reps=1)
    assert [(r["dtype"], r["batch"]) for r in res["rows"]] == [("float32", 1), ("float32", 2)]
    for r in res["rows"]:
        assert r["bare_ms"] > 0 and r["img_s"] > 0 and r["merged"] > 0 and r["mixed"] > 0
        assert r["mfu"] is None  # no peak for a CPU: never a made-up utilisation
    assert res["flops"] > 1e6 and res["merges"]["float32"] > 0
    text = gpu_bench.report([res])
    assert "| float32 | 2 |" in text and "merge ms" in text
    gpu_bench.plot([res], tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
