"""The CPU benchmarks' quick modes run end to end (tiny backbone, short windows) and report every cell:
``make bench`` runs once, on a quiet machine, so a broken code path must show up here first. Nothing is
written under bench/results (the report and plot go to tmp_path)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from bench import e2e_bench, many_tasks


@pytest.mark.timeout(300)
def test_many_tasks_quick_reports_every_cell_with_its_counters(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    results = many_tasks.run_loop(many_tasks.run_grid(quick=True))
    [res] = results
    setup = res["setup"]
    assert res["install"]["n"] == setup.resident and res["cap"] > 0
    for cell in setup.cells:
        runs = res["runs"][cell]
        assert len(runs) == cell.repeats and all(r["tried"] for r in runs)
        for r in runs:
            assert len(r["tried"]) >= setup.steps  # the bisection ran every step
    text = many_tasks.report(results, 1.0)
    assert "| 1 | single | hybrid | 2 |" in text and "| 20 | zipf1.0 | naive | 1 |" in text
    assert "### Goals" in text and "hybrid, 20 zipf1.0 vs single task" not in text  # goals need 10/100+
    many_tasks.plot(results, tmp_path / "many.png")
    assert (tmp_path / "many.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_e2e_quick_measures_http_against_the_engine_in_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    res = asyncio.run(e2e_bench.run_all(quick=True))
    tp = res["throughput"]
    for mode in e2e_bench.MODES:
        [(_, tried)] = tp[mode]
        assert tried and all(r["sent"] > 0 for r in tried)
    http = [r for _, tried in tp["HTTP, JPEG body"] for r in tried]
    assert all("client_cpu_s" in r and r["server_cpu_s"] >= 0 for r in http)
    assert tp["_memory"]["server_rss"] > 0
    text = e2e_bench.report(res)
    assert "| HTTP (JPEG) / in-process engine (JPEG bytes)" in text
    assert "load generator CPU ms / req" in text
    e2e_bench.plot(res, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"
