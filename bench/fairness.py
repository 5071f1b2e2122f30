"""Fair share under open-loop load: two tenants on one ``ssf-serve`` (real HTTP, uvicorn subprocess).

Tenant B offers a rate within its share, alone and then beside tenant A, who offers three times its share
(equal weights: each tenant's share is half the measured capacity). Each tenant's requests come from a
``bench.loadgen`` process of its own and are sent whatever the answers (open loop). Reported: B's p50/p99
alone and beside A, B's losses, A's 429s. The test (tests/service/api/test_fairness.py) runs the same
``measure`` smaller.

    python -m bench.fairness          # writes bench/results/60-fairness.md (about 4 min)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen
from bench.report import machine_line, write_section

ONSET_S = 1.0  # the steady-state p99 leaves out requests sent in the first second of a run


@dataclass
class Target:
    url: str
    tenant: str
    token: str
    task: str
    body: bytes  # multipart body with the request's images
    content_type: str


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    request = httpx.Request(
        "POST", "http://x", files=[("image", (f"{i}.png", im)) for i, im in enumerate(images)]
    )
    return request.read(), request.headers["content-type"]


async def capacity(t: Target, seconds: float = 3.0, workers: int = 8) -> float:
    """Closed-loop requests/s the server completes for one tenant (its whole capacity when alone)."""
    done = 0
    headers = {"Authorization": f"Bearer {t.token}", "Content-Type": t.content_type}
    async with httpx.AsyncClient(timeout=30) as http:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                r = await http.post(
                    f"{t.url}/tasks/{t.task}/predict?top_k=1", content=t.body, headers=headers
                )
                done += r.status_code == 200

        await asyncio.gather(*(worker() for _ in range(workers)))
    return done / seconds


def summary(run: dict[str, Any], onset_s: float = ONSET_S) -> dict[str, Any]:
    """One tenant's run from its generator: counts by status, and p50/p99 of the answered (200) requests,
    over the whole window and without the first ``onset_s`` seconds."""
    statuses = {int(k): v for k, v in run["statuses"].items()}
    pairs = [
        (at, lat) for at, lat in zip(run["arrivals_s"], run["latencies_s"], strict=True) if lat is not None
    ]
    ok = [lat for _, lat in pairs]
    steady = [lat for at, lat in pairs if at >= onset_s]
    return {
        "sent": run["sent"],
        "ok": statuses.get(200, 0),
        "refused_429": statuses.get(429, 0),
        "other": run["sent"] - statuses.get(200, 0) - statuses.get(429, 0),
        "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
        "p99_ms": 1000 * loadgen.percentile(ok, 99),
        "p99_steady_ms": 1000 * loadgen.percentile(steady, 99),
        "mean_ms": 1000 * statistics.fmean(ok) if ok else float("nan"),
        "client_cpu_s": run["client_cpu_s"],
        "send_lag_max_ms": 1000 * run["send_lag_max"],  # the generator's own delay, inside the latencies
    }


# the server's series read before and after each run: key -> (metric, the label that picks B's series)
SERIES = {
    "engine": ("ssf_task_request_seconds", "task"),  # B's time in the engine, admission to answer
    "queue": ("ssf_tenant_queue_wait_seconds", "tenant"),  # B's wait for its batch
    "batch": ("ssf_engine_batch_seconds", "path"),  # every batch's forward (the mixed path here)
}


Scrape = dict[str, tuple[float, float]]


def scrape(url: str, b: Target) -> Scrape:
    """(sum, count) of each of ``SERIES`` for tenant B (its task, its tenant; the mixed path's batches)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {"engine": b.task, "queue": b.tenant.lower(), "batch": "mixed"}
    found = {k: [0.0, 0.0] for k in SERIES}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            for key, (metric, label) in SERIES.items():
                if sample.labels.get(label) != want[key]:
                    continue
                if sample.name == f"{metric}_sum":
                    found[key][0] = sample.value
                elif sample.name == f"{metric}_count":
                    found[key][1] = sample.value
    return {k: (v[0], v[1]) for k, v in found.items()}


def means_ms(before: Scrape, after: Scrape) -> dict[str, float]:
    """Each series' mean over the run between two scrapes, in ms (``<key>_mean_ms``)."""
    out = {}
    for key in SERIES:
        n = after[key][1] - before[key][1]
        out[f"{key}_mean_ms"] = 1000 * (after[key][0] - before[key][0]) / n if n else float("nan")
    return out


def _load(t: Target, connections: int) -> loadgen.RemoteLoad:
    """A generator process for ``t`` with ``connections`` keep-alive connections open before each run (a
    tenant's client keeps a pool; a burst of connection setups would be the generator's artefact)."""
    load = loadgen.RemoteLoad()
    path = f"/tasks/{t.task}/predict?top_k=1"
    auth = {"authorization": f"Bearer {t.token}"}
    load.setup(t.url, [(path, t.content_type, t.body)], auth, connections)
    return load


async def measure(a: Target, b: Target, seconds: float, b_fraction: float = 0.2) -> dict[str, Any]:
    """Capacity C, then B alone at ``b_fraction``*C, then A at 1.5*C (3x its half) beside B. Each tenant's
    requests come from a generator process of its own (``bench.loadgen``: Poisson arrivals, sent whatever
    the answers, latency from the scheduled arrival), so neither tenant's client delays the other's."""
    cap = await capacity(b)
    rate_b, rate_a = b_fraction * cap, 1.5 * cap
    load_a, load_b = _load(a, 32), _load(b, 8)
    try:
        e0 = scrape(b.url, b)
        alone = await load_b.run(rate_b, seconds, 1, 10.0, early_stop=False)
        e1 = scrape(b.url, b)
        await asyncio.sleep(2.5)  # B's activity window (scheduler.ACTIVE_S) passes: A starts as a newcomer
        with_a, with_b = await asyncio.gather(
            load_a.run(rate_a, seconds, 2, 10.0, early_stop=False),
            load_b.run(rate_b, seconds, 1, 10.0, early_stop=False),  # B's same arrival times as alone
        )
        e2 = scrape(b.url, b)
    finally:
        load_a.close()
        load_b.close()
    return {
        "capacity_rps": cap,
        "rate_a": rate_a,
        "rate_b": rate_b,
        "b_alone": {**summary(alone), **means_ms(e0, e1)},
        "b_with_a": {**summary(with_b), **means_ms(e1, e2)},
        "a_with_b": summary(with_a),
    }


def ratios(res: dict[str, Any]) -> tuple[float, float]:
    """B's p99 beside A over its p99 alone: over the whole window, and without each run's first second."""
    alone, shared = res["b_alone"], res["b_with_a"]
    return shared["p99_ms"] / alone["p99_ms"], shared["p99_steady_ms"] / alone["p99_steady_ms"]


def report(runs: list[dict[str, Any]], images: int) -> str:
    ranked = sorted(runs, key=lambda r: ratios(r)[0])
    res = ranked[len(ranked) // 2]  # the median repeat, shown in full
    alone, shared, a = res["b_alone"], res["b_with_a"], res["a_with_b"]
    ratio, steady = ratios(res)
    all_ratios = [ratios(r)[0] for r in ranked]
    batch_ms = 1000 / res["capacity_rps"]
    floor = (alone["p99_ms"] + batch_ms) / alone["p99_ms"]
    met = sum(x <= 1.5 for x in all_ratios)
    lost = sum(r["b_with_a"]["sent"] - r["b_with_a"]["ok"] for r in runs)
    verdict = "met" if ratio <= 1.5 and lost == 0 else "missed"
    return "\n".join(
        [
            "## Fair share between tenants under open-loop load (multi-team)",
            "",
            machine_line(),
            "",
            f"Two tenants of equal weight on one `ssf-serve` (test_vit, CPU, `SSF_TORCH_THREADS=1`: one core "
            f"for the forward, one for HTTP and decoding), {images} images a request, max batch 8. B offers "
            "0.2 of the capacity measured closed-loop (within its half); A offers 1.5 of it (3x its half). "
            "Each tenant's load comes from a generator process of its own (`bench/loadgen.py`: Poisson "
            "arrivals sent whatever the answers, latency from the scheduled arrival; B's arrival times "
            f"are the same alone and beside A). Steady: without the requests sent in a run's first "
            f"{ONSET_S:g} s. {len(runs)} repeats on one server, each measuring its own capacity.",
            "",
            "| repeat | capacity req/s | B p99 alone ms | B p99 beside A ms | ratio | steady ratio | B lost "
            "| A 429 | B's wait for its batch beside A |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {i + 1} | {r['capacity_rps']:.1f} | {r['b_alone']['p99_ms']:.1f} | "
                f"{r['b_with_a']['p99_ms']:.1f} | {ratios(r)[0]:.2f} | {ratios(r)[1]:.2f} | "
                f"{r['b_with_a']['sent'] - r['b_with_a']['ok']} | {r['a_with_b']['refused_429']} | "
                f"{_wait(r['b_with_a'])} |"
                for i, r in enumerate(runs)
            ),
            "",
            "The median repeat in full (client send lag: how late the generator sent a request against its "
            "schedule, already inside the latencies):",
            "",
            "| run | tenant | sent | 200 | 429 | other | p50 ms | p99 ms | p99 steady ms | client CPU s "
            "| client send lag max ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            _row("B alone", "B", alone),
            _row("A and B", "B", shared),
            _row("A and B", "A", a),
            "",
            f"B's p99 beside A is {ratio:.2f}x its p99 alone in the median repeat (goal <= 1.5: {verdict}; "
            f"{min(all_ratios):.2f}-{max(all_ratios):.2f}x over the repeats, within the goal in {met} of "
            f"{len(runs)}), {steady:.2f}x in the steady state; B lost {lost} requests in all; A was answered "
            f"429 {a['refused_429']} times.",
            "",
            f"B's mean wait for its batch (`ssf_tenant_queue_wait_seconds`): {_wait(alone)} alone, "
            f"{_wait(shared)} beside A, where waiting for the batch in progress alone averages half a "
            "batch.",
            "",
            f"B's mean time in the engine (admission to answer, the server's `ssf_task_request_seconds`): "
            f"{alone['engine_mean_ms']:.1f} ms alone, {shared['engine_mean_ms']:.1f} ms beside A, against "
            f"{alone['mean_ms']:.1f} and {shared['mean_ms']:.1f} ms at the client: beside A, "
            f"{shared['mean_ms'] - shared['engine_mean_ms']:.1f} ms of B's mean is spent before admission "
            f"and after the answer (HTTP, body parsing, the event loop), "
            f"{alone['mean_ms'] - alone['engine_mean_ms']:.1f} ms alone.",
            "",
            "What B still pays beside A: fair order runs B's request next (a short burst of B's back to "
            "back, the scheduler's sleeper credit), but a forward is not preempted, so B waits for A's batch "
            f"in progress: even a perfect order gives B's p99 about {alone['p99_ms']:.1f} + "
            f"{batch_ms:.1f} ms ({floor:.2f}x). The rest is CPU: on these two cores A's admitted requests "
            "are parsed and decoded beside B's and beside the forward, A's at the lowest CPU priority "
            "(`SSF_OVER_SHARE_NICE`; timing probes while building this benchmark, before that: B's "
            "decoding 8 ms beside A against 5 ms alone, its forward 12 against 10 ms). The spread between "
            "repeats is mostly B's p99 alone, the 4th-slowest of about 300 requests. Before the fair "
            "queuing's sleeper credit B waited 2-5 of A's batches whenever a few of its requests came "
            "close together (2.5-3.9x); a full garbage collection (225 ms with every thread stopped) is "
            "avoided by freezing the heap once the tasks are resident.",
        ]
    )


def batches_waited(run: dict[str, Any]) -> float:
    """A tenant's mean wait for its batch over the run, in mean batch times."""
    return float(run["queue_mean_ms"] / run["batch_mean_ms"])


def _wait(run: dict[str, Any]) -> str:
    batch = run["batch_mean_ms"]
    return f"{run['queue_mean_ms']:.1f} ms ({batches_waited(run):.2f} batches of {batch:.1f} ms)"


def _row(run: str, tenant: str, s: dict[str, Any]) -> str:
    return (
        f"| {run} | {tenant} | {s['sent']} | {s['ok']} | {s['refused_429']} | {s['other']} | "
        f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['p99_steady_ms']:.1f} | {s['client_cpu_s']:.2f} | "
        f"{s['send_lag_max_ms']:.1f} |"
    )


def setup(url: str, admin: str, images: list[bytes]) -> tuple[Target, Target]:
    """Tenants a and b (equal weight), a task each, a client token each."""
    from tests.helpers.deltas import task_delta

    auth = {"Authorization": f"Bearer {admin}"}
    body, kind = multipart(images)
    targets = []
    for tenant in ("a", "b"):
        httpx.put(f"{url}/tenants/{tenant}", json={"weight": 1}, headers=auth, timeout=10).raise_for_status()
        files = {"delta": ("d", task_delta(f"{tenant}.task", 1))}
        httpx.post(f"{url}/tasks", files=files, headers=auth, timeout=60).raise_for_status()
        r = httpx.post(f"{url}/tokens", json={"role": "client", "tenant": tenant}, headers=auth, timeout=10)
        r.raise_for_status()
        targets.append(Target(url, tenant.upper(), r.json()["token"], f"{tenant}.task", body, kind))
    return targets[0], targets[1]


SERVER_SETTINGS = {
    "token_secret": "bench-secret",
    "max_batch_size": 8,
    # each tenant's share of the queue is half of it, 16 requests of 8 images: room for B's requests even
    # when a slow, shared host serves them at several times their latency alone (64 left 4: B lost 7 of
    # 67 requests at 800 ms p50 on one CI run; 128 left 8: B lost 1-3 of ~170 in 2 of 15 runs on a host
    # whose capacity had dropped to 30 requests/s)
    "max_queue_size": 256,
    "max_queue_delay_ms": 1,
    "path_policy": "mixed",
    # one of the two cores for the forward, the other for HTTP and decoding (docs/cli.md: SSF_TORCH_THREADS)
    "torch_threads": 1,
}


def main(seconds: float = 20.0, images_per_request: int = 8, repeats: int = 5) -> None:
    from tests.helpers.api import TOKEN
    from tests.helpers.images import encode
    from tests.helpers.models import backbone_file
    from tests.helpers.servers import start, stop

    with tempfile.TemporaryDirectory() as tmp:
        weights = backbone_file("vit", Path(tmp))
        server = start(Path(tmp), weights, **SERVER_SETTINGS)  # type: ignore[arg-type]
        try:
            images = [encode("PNG", i, (64, 64)) for i in range(images_per_request)]
            a, b = setup(server.url, TOKEN, images)
            runs = [asyncio.run(measure(a, b, seconds)) for _ in range(repeats)]
        finally:
            stop(server)
    print(write_section("60-fairness", report(runs, images_per_request)))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0)
