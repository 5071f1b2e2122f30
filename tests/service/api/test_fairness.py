"""Fair share under open-loop load through real HTTP (bench/fairness.py's measurement, shorter, three
repeats): tenant B within its share, alone and then beside tenant A offering 3x its share. In every repeat B
loses no request and A is answered 429; B waits for about the batch in progress, not behind A's queue."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator
from typing import Any

import pytest

from bench.fairness import SERVER_SETTINGS, batches_waited, measure, setup
from tests.helpers.api import TOKEN
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import start, stop

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("fairness")
    server = start(tmp, backbone_file("vit", tmp), **SERVER_SETTINGS)  # type: ignore[arg-type]
    try:
        a, b = setup(server.url, TOKEN, [encode("PNG", i, (64, 64)) for i in range(8)])
        yield [asyncio.run(measure(a, b, seconds=6.0)) for _ in range(3)]
    finally:
        stop(server)


def test_b_loses_nothing_while_a_is_refused(results: list[dict[str, Any]]) -> None:
    for result in results:  # every repeat
        alone, shared, a = result["b_alone"], result["b_with_a"], result["a_with_b"]
        assert alone["sent"] >= 10 and shared["sent"] == alone["sent"], result
        assert shared["ok"] == shared["sent"], f"B lost requests beside A: {shared}"
        assert a["refused_429"] > 0 and a["other"] == 0, f"A was not held to its share: {a}"
        assert a["ok"] > 0, result  # A is refused only beyond its share, not shut out


def test_b_waits_for_about_the_batch_in_progress_not_for_a_backlog(results: list[dict[str, Any]]) -> None:
    """Beside A, fair order runs B's request next: B waits for A's batch in progress (half a batch on
    average) and for its own burst, not behind A's queue. Measured in mean batch times from the server's
    ``ssf_tenant_queue_wait_seconds``, single 6 s runs on a 2-core host, side by side: 0.89-1.35 (15 runs;
    the CI host 0.90-1.41) against 1.66-2.13 with the scheduler's sleeper credit removed
    (``BURST_BATCHES = 0``, 6 runs); a first-come-first-served queue would put B behind A's 16 queued
    batches. The bound sits between the two. The median of three repeats: one host stall of a second in a
    6 s window moves one run's mean wait by half a batch or more. B's p99 against its p99 alone, the
    issue's 1.5x, is measured over longer windows by bench/fairness.py (BENCHMARKS.md); in these 6 s
    windows it is the 2nd-slowest of about 110 requests (1.8-3.3x here)."""
    waits = [batches_waited(r["b_with_a"]) for r in results]
    waited = statistics.median(waits)
    ratios = [r["b_with_a"]["p99_ms"] / r["b_alone"]["p99_ms"] for r in results]
    assert waited <= 1.5, f"B waited {waits} batches beside A (p99 {ratios}x alone): {results}"
