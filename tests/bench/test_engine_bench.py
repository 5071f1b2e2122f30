"""engine_bench's pieces: the paired ratios and their spread, the goal verdicts, and the cold-start probe
through a real engine on a local store (bounded resident set)."""

from __future__ import annotations

import time

from bench import engine_scale
from bench.engine_bench import paired, verdict


def test_paired_ratios_come_round_by_round_with_their_spread() -> None:
    result = paired({"bare": lambda: time.sleep(0.002), "slow": lambda: time.sleep(0.006)}, reps=5)
    assert result["reps"] == 5 and result["bare"] == 1.0
    assert result["slow_lo"] <= result["slow"] <= result["slow_hi"]
    assert 1.5 < result["slow"] < 6 and result["slow_s"] > result["bare_s"]


def test_verdict_names_every_miss() -> None:
    assert verdict({1: 1.0, 8: 1.02}, 1.05) == "yes"
    assert verdict({1: 1.2, 4: 1.0, 8: 1.01}, 1.10) == "from batch 4 (missed at b1)"
    assert verdict({1: 1.2, 4: 1.0, 8: 1.3}, 1.10) == "no (missed at b1, b8)"


def test_cold_start_probe_loads_cold_tasks_from_the_store() -> None:
    cold = engine_scale.cold_start("test_vit", stored=6, resident=2, probes=2)
    assert cold["resident_after"] == 2 and cold["cold_ms"] > 0 and cold["warm_ms"] > 0
