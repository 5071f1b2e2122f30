"""Tenant rate quotas across replicas: two ``ssf-serve`` processes on one real redis-server share one token
bucket per tenant (a Lua script, timed by Redis's clock), so the rate both admit together stays within
10 % of the quota; the embedded store's in-process bucket holds one server to it as well."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.api import TOKEN
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import RedisServer, Server, stop
from tests.helpers.tenants import bearer, create_token, put_tenant, start_tenant_server, upload_as

pytestmark = pytest.mark.e2e

PNG = encode("PNG", 5, (32, 32))
QUOTA = 20.0  # requests per second
SECONDS = 8.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("quota-backbone"))


def hammer(
    urls: list[str], token: str, seconds: float, threads_per_url: int = 2
) -> list[tuple[float, int, str]]:
    """Closed loops (a short pause between calls, so refusals do not spin) against every URL; each answer's
    time, status and error code. Bounded by ``seconds``."""
    out: list[tuple[float, int, str]] = []
    lock = threading.Lock()
    start = time.monotonic()

    def run(url: str) -> None:
        with httpx.Client(timeout=10, headers=bearer(token)) as http:
            while time.monotonic() - start < seconds:
                # a cheap request of the tenant's admin (a task it could own, that does not exist): the quota
                # is checked before the route, so 404 means admitted; this machine's CPU is not the limit
                r = http.delete(f"{url}/tasks/q.absent")
                code = r.json()["error"]["code"] if r.status_code >= 400 else ""
                if r.status_code == 429:
                    assert (
                        "requests_per_s" in r.json()["error"]["message"]
                        and int(r.headers["retry-after"]) >= 1
                    )
                with lock:
                    out.append((time.monotonic() - start, r.status_code, code))
                time.sleep(0.005)

    workers = [threading.Thread(target=run, args=(u,)) for u in urls for _ in range(threads_per_url)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 30)
    return out


def admitted_rate(answers: list[tuple[float, int, str]]) -> float:
    assert {s for _, s, _ in answers} <= {404, 429}, {(s, c) for _, s, c in answers}
    window = [s for t, s, _ in answers if 1.0 <= t <= SECONDS]
    refused = sum(s == 429 for s in window)
    # offered well over the quota all along, or the admitted rate would measure this machine, not the quota
    assert refused >= 0.3 * len(window), f"only {refused} of {len(window)} refused: the load is too light"
    # answered within [1 s, SECONDS]: the bucket's first burst is spent and every thread is in its loop
    ok = sum(s == 404 and 1.0 <= t <= SECONDS for t, s, _ in answers)
    return ok / (SECONDS - 1.0)


def setup_tenant(url: str) -> str:
    put_tenant(url, "q", quotas={"requests_per_s": QUOTA})
    assert upload_as(url, TOKEN, task_delta("q.task", 1), "q.task").status_code == 201
    return create_token(url, "admin", "q")[1]


@pytest.fixture
def two_replicas(tmp_path: Path, weights: Path, redis_server: RedisServer) -> Iterator[list[Server]]:
    servers = [start_tenant_server(tmp_path, weights, redis_server.url) for _ in range(2)]
    try:
        yield servers
    finally:
        for s in servers:
            stop(s)


def test_two_replicas_admit_the_quota_together(two_replicas: list[Server]) -> None:
    a, b = two_replicas
    token = setup_tenant(a.url)
    time.sleep(0.6)  # the tenant and token reach replica b (SSF_TENANT_REFRESH_S 0.2)
    answers = hammer([a.url, b.url], token, SECONDS)
    rate = admitted_rate(answers)
    assert abs(rate - QUOTA) <= 0.1 * QUOTA, f"admitted {rate:.1f}/s together, quota {QUOTA}/s"


def test_one_server_on_the_embedded_store_admits_the_quota(tmp_path: Path, weights: Path) -> None:
    server = start_tenant_server(tmp_path, weights)
    try:
        token = setup_tenant(server.url)
        rate = admitted_rate(hammer([server.url], token, SECONDS, threads_per_url=8))
        assert abs(rate - QUOTA) <= 0.1 * QUOTA, f"admitted {rate:.1f}/s, quota {QUOTA}/s"
    finally:
        stop(server)
