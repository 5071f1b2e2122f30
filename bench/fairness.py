"""Fair share under open-loop load: two tenants on one ``ssf-serve`` (real HTTP, uvicorn subprocess).

Tenant B offers a rate within its share, alone and then beside tenant A, who offers three times its share
(equal weights: each tenant's share is half the measured capacity). Requests are sent on a fixed schedule
whatever the answers (open loop). Reported: B's p50/p99 alone and beside A, B's losses, A's 429s. The
test (tests/service/api/test_fairness.py) runs the same ``measure`` smaller.

    python -m bench.fairness          # writes bench/results/60-fairness.md (< 3 min)
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.report import machine_line, write_section


@dataclass
class Shot:
    tenant: str
    latency_s: float
    status: int  # 0: no HTTP answer


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


async def _one(http: httpx.AsyncClient, t: Target, out: list[Shot]) -> None:
    headers = {"Authorization": f"Bearer {t.token}", "Content-Type": t.content_type}
    start = time.perf_counter()
    try:
        r = await http.post(
            f"{t.url}/tasks/{t.task}/predict", content=t.body, headers=headers, params={"top_k": 1}
        )
        status = r.status_code
    except httpx.HTTPError:
        status = 0
    out.append(Shot(t.tenant, time.perf_counter() - start, status))


async def open_loop(streams: list[tuple[Target, float]], seconds: float) -> list[Shot]:
    """Each (target, rate) sends ``rate`` requests/s on a fixed schedule for ``seconds``, never waiting
    for answers; bounded by ``rate * seconds`` requests per stream."""
    out: list[Shot] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        loop = asyncio.get_running_loop()
        begin = loop.time() + 0.05
        pending: list[asyncio.Task[None]] = []

        async def stream(t: Target, rate: float) -> None:
            for i in range(int(rate * seconds)):
                delay = begin + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(_one(http, t, out)))

        await asyncio.gather(*(stream(t, r) for t, r in streams))
        await asyncio.gather(*pending)
    return out


async def capacity(t: Target, seconds: float = 3.0, workers: int = 8) -> float:
    """Closed-loop requests/s the server completes for one tenant (its whole capacity when alone)."""
    out: list[Shot] = []
    async with httpx.AsyncClient(timeout=30) as http:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                await _one(http, t, out)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return sum(s.status == 200 for s in out) / seconds


def p(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def summary(shots: list[Shot], tenant: str) -> dict[str, Any]:
    mine = [s for s in shots if s.tenant == tenant]
    ok = [s.latency_s for s in mine if s.status == 200]
    return {
        "sent": len(mine),
        "ok": len(ok),
        "refused_429": sum(s.status == 429 for s in mine),
        "other": sum(s.status not in (200, 429) for s in mine),
        "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
        "p99_ms": 1000 * p(ok, 0.99),
    }


async def measure(a: Target, b: Target, seconds: float, b_fraction: float = 0.2) -> dict[str, Any]:
    """Capacity C, then B alone at ``b_fraction``*C, then A at 1.5*C (3x its half) beside B."""
    cap = await capacity(b)
    rate_b, rate_a = b_fraction * cap, 1.5 * cap
    alone = await open_loop([(b, rate_b)], seconds)
    await asyncio.sleep(2.5)  # B's activity window (scheduler.ACTIVE_S) passes: A starts as a newcomer
    both = await open_loop([(a, rate_a), (b, rate_b)], seconds)
    return {
        "capacity_rps": cap,
        "rate_a": rate_a,
        "rate_b": rate_b,
        "b_alone": summary(alone, b.tenant),
        "b_with_a": summary(both, b.tenant),
        "a_with_b": summary(both, a.tenant),
    }


def report(res: dict[str, Any], images: int) -> str:
    alone, shared, a = res["b_alone"], res["b_with_a"], res["a_with_b"]
    ratio = shared["p99_ms"] / alone["p99_ms"]
    batch_ms = 1000 / res["capacity_rps"]
    floor = (alone["p99_ms"] + batch_ms) / alone["p99_ms"]
    return "\n".join(
        [
            "## Fair share between tenants under open-loop load (multi-team)",
            "",
            machine_line(),
            "",
            f"Two tenants of equal weight on one `ssf-serve` (test_vit, CPU), {images} images a request. "
            f"Capacity measured closed-loop: {res['capacity_rps']:.1f} requests/s. B offers "
            f"{res['rate_b']:.1f}/s (within its half); A offers {res['rate_a']:.1f}/s (3x its half).",
            "",
            "| run | tenant | sent | 200 | 429 | other | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
            _row("B alone", "B", alone),
            _row("A and B", "B", shared),
            _row("A and B", "A", a),
            "",
            f"B's p99 beside A is {ratio:.2f}x its p99 alone (goal <= 1.5); B lost "
            f"{shared['sent'] - shared['ok']} requests; A was answered 429 {a['refused_429']} times.",
            "",
            f"Why the latency goal is missed here: a forward is not preempted, so beside a saturating A each "
            f"request of B can wait for one batch of A in progress ({batch_ms:.1f} ms: one request is one "
            f"batch of 8 at {res['capacity_rps']:.1f} requests/s). Even with a perfect order B's p99 would "
            f"be about {alone['p99_ms']:.1f} + {batch_ms:.1f} ms, {floor:.2f}x its p99 alone. The rest is "
            "the two cores: A's admitted requests (parsed, decoded) and its refused ones (answered 429 "
            "before the body is read), the load generator and the forward share them, so B's requests wait "
            "for CPU before they reach the scheduler. On a GPU host the forward leaves the CPU to the HTTP "
            "side; there the goal is the scheduler's to keep.",
        ]
    )


def _row(run: str, tenant: str, s: dict[str, Any]) -> str:
    return (
        f"| {run} | {tenant} | {s['sent']} | {s['ok']} | {s['refused_429']} | {s['other']} | "
        f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} |"
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
    # each tenant's share of the queue is half of it, 8 requests of 8 images: room for B's requests even
    # when a slow, shared CI host serves them at several times their latency alone (64 left 4: B lost 7
    # of 67 requests at 800 ms p50 on one CI run)
    "max_queue_size": 128,
    "max_queue_delay_ms": 1,
    "path_policy": "mixed",
}


def main(seconds: float = 20.0, images_per_request: int = 8) -> None:
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
            res = asyncio.run(measure(a, b, seconds))
        finally:
            stop(server)
    print(write_section("60-fairness", report(res, images_per_request)))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0)
