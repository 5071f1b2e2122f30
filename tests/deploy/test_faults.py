"""Faults on the process topology (R3, R5, R6 of RELIABILITY.md, CI tier):
kill -9 of Redis mid-load, kill -9 of one replica, SIGTERM of a replica under load. Each test leaves the
topology whole again (restarts what it killed) for the next one."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from deploy.topology import Topology
from tests.helpers.deltas import task_delta
from tests.helpers.load import Load, predict
from tests.helpers.servers import upload

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.timeout(240)]


def spread_tasks(topo: Topology, weights: Path, prefix: str, n: int) -> dict[str, str]:
    """Upload ``n`` tasks and return task -> the upstream nginx hashes it to (from the access log)."""
    for i in range(n):
        assert upload(topo.url, task_delta(f"{prefix}{i}", i + 1)).status_code == 201
    with httpx.Client(timeout=10) as http:
        for i in range(n):
            assert predict(http, topo.url, f"{prefix}{i}").status_code == 200
    out = {}
    for line in topo.access_log.read_text().splitlines():
        for i in range(n):
            if f"/tasks/{prefix}{i}/predict" in line and "upstream=" in line:
                out[f"{prefix}{i}"] = line.split("upstream=")[1].split()[0]
    return out


def test_redis_kill9_loses_no_acknowledged_upload(topo: Topology, weights: Path) -> None:
    for name in ("steady-a", "steady-b"):
        assert upload(topo.url, task_delta(name, 1)).status_code == 201
    deltas = [task_delta(f"up-{i}", i) for i in range(200)]
    acked: dict[str, str] = {}
    admin_during_outage: list[tuple[int, float]] = []
    outage = threading.Event()
    stop = threading.Event()

    def uploader() -> None:
        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {topo.admin_token}"}) as http:
            for i, data in enumerate(deltas):
                if stop.is_set():
                    return
                base = topo.replica_url(i % topo.replicas) if i % 3 else topo.url
                t0 = time.monotonic()
                try:
                    r = http.post(f"{base}/tasks", files={"delta": ("d", data)})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                if status == 201:
                    acked[f"up-{i}"] = r.json()["sha256"]
                elif outage.is_set():
                    admin_during_outage.append((status, time.monotonic() - t0))
                time.sleep(0.02)

    targets = [(topo.url, "steady-a"), (topo.url, "steady-b"), (topo.replica_url(1), "steady-a")]
    with Load(targets, max_s=60) as load:
        up = threading.Thread(target=uploader, daemon=True)
        up.start()
        time.sleep(1.5)
        topo.redis.kill()  # kill -9 mid-load
        t_kill = time.monotonic()
        outage.set()
        time.sleep(3.0)
        n_acked_before_restart = len(acked)
        topo.start_redis()
        t_back = time.monotonic()
        outage.clear()

        # reconvergence: a new task and a replace, each through one replica, served by all
        new, replaced = task_delta("after-outage", 1), task_delta("steady-b", 2)
        while upload(topo.replica_url(0), new).status_code != 201:
            assert time.monotonic() - t_back < 10, "uploads still fail 10 s after Redis came back"
            time.sleep(0.1)
        assert upload(topo.replica_url(1), replaced, replace=True).status_code == 201
        with httpx.Client(timeout=10) as http:
            for i in range(topo.replicas):
                base = topo.replica_url(i)
                while True:
                    a, b = predict(http, base, "after-outage"), predict(http, base, "steady-b")
                    if a.status_code == 200 and b.status_code == 200 and b.json()["version"] == 2:
                        break
                    assert time.monotonic() - t_back < 10, f"replica {i} has not reconverged in 10 s"
                    time.sleep(0.1)
        reconverged_s = time.monotonic() - t_back
        stop.set()
        up.join(30)
    answers = load.snapshot()
    slowest_admin_s = max((d for _, d in admin_during_outage), default=0.0)
    during = [a for a in answers if t_kill <= a.started <= t_back]
    print(
        f"redis kill -9: {len(acked)} uploads acknowledged ({n_acked_before_restart} before the restart), "
        f"{len(during)} predicts during the outage, admin during outage: "
        f"{sorted({s for s, _ in admin_during_outage})} in <= {slowest_admin_s:.3f}s, "
        f"reconverged in {reconverged_s:.2f}s"
    )
    assert during, "no predictions were made during the outage"
    assert all(a.status == 200 for a in answers), sorted({a.status for a in answers})
    assert admin_during_outage, "no admin call was made during the outage"
    assert all(s == 503 and d < 2.0 for s, d in admin_during_outage), admin_during_outage
    assert reconverged_s <= 10

    # 0 acknowledged uploads lost: every one is in the registry with the acknowledged digest
    with httpx.Client(timeout=10) as http:
        for name, sha in acked.items():
            r = http.get(f"{topo.replica_url(0)}/tasks/{name}")
            assert r.status_code == 200 and r.json()["sha256"] == sha, (name, r.text)
    assert acked and all(len(s) == len(hashlib.sha256().hexdigest()) for s in acked.values())


def test_replica_kill9_fails_only_requests_in_flight(topo: Topology, weights: Path) -> None:
    owner = spread_tasks(topo, weights, "k9-", 8)
    victim = f"127.0.0.1:{topo.replica_ports[1]}"
    on_victim = [t for t, u in owner.items() if u == victim]
    assert on_victim, f"no task hashed to {victim}: {owner}"
    tasks = sorted(owner)
    concurrency = 4
    with Load([(topo.url, tasks[i % len(tasks)]) for i in range(concurrency)], max_s=60) as load:
        time.sleep(1.5)
        topo.servers[1].kill()
        t_kill = time.monotonic()
        time.sleep(2.5)
        topo.start_replica(1, wait=False)  # the supervisor restarts it; traffic goes on meanwhile
        ready_s = topo.wait_ready(1)
        time.sleep(1.0)
    answers = load.snapshot()
    failed = [a for a in answers if a.status != 200]
    after = [a for a in answers if a.started > t_kill + 0.5 and a.status == 200]
    print(
        f"replica kill -9: {len(failed)} failed of {len(answers)}; restarted replica ready in {ready_s:.2f}s"
    )
    assert len(failed) <= concurrency  # at most the requests in flight on the killed replica
    assert after, "nothing succeeded after the kill"
    assert ready_s <= 30


def test_sigterm_under_load_fails_nothing(topo: Topology, weights: Path) -> None:
    """Also right after the previous test restarted replica 1 (nginx may still hold it down)."""
    owner = spread_tasks(topo, weights, "term-", 8)
    tasks = sorted(owner)
    probes: list[tuple[float, int | None]] = []  # what /readyz of the draining replica says, and when

    def probe_readiness() -> None:
        with httpx.Client(timeout=1) as http:
            for _ in range(400):  # bounded: 20 s at most
                try:
                    status: int | None = http.get(f"{topo.replica_url(0)}/readyz").status_code
                except httpx.HTTPError:
                    status = None
                probes.append((time.monotonic(), status))
                if status is None:
                    return
                time.sleep(0.05)

    with Load([(topo.url, tasks[i % len(tasks)]) for i in range(4)], max_s=60) as load:
        time.sleep(1.5)
        prober = threading.Thread(target=probe_readiness, daemon=True)
        prober.start()
        while not any(s == 200 for _, s in probes):  # the prober is running before the signal
            assert prober.is_alive()
            time.sleep(0.02)
        t_term = time.monotonic()
        topo.servers[0].signal(signal.SIGTERM)
        assert topo.servers[0].popen is not None
        exit_code = topo.servers[0].popen.wait(timeout=20)
        exit_s = time.monotonic() - t_term
        prober.join(10)
        time.sleep(1.0)
        topo.start_replica(0)
        time.sleep(0.5)
    answers = load.snapshot()
    failed = [a for a in answers if a.status != 200]
    not_ready = [t for t, s in probes if s == 503]
    closed = [t for t, s in probes if s is None]
    assert not_ready and closed, probes[:5]
    unready_s = closed[0] - t_term  # readiness turns 503 as the signal is handled; the listener stays
    print(
        f"SIGTERM: {len(failed)} failed of {len(answers)}; readiness 503 for {unready_s:.2f}s before the "
        f"listener closed; replica exited {exit_code} after {exit_s:.2f}s"
    )
    assert not failed, sorted({a.status for a in failed})
    assert 200 not in {s for t, s in probes if t > not_ready[0]}, "ready again while draining"
    assert not_ready[0] < closed[0]
    assert unready_s >= 1.0  # SSF_DRAIN_DELAY_S=1 in this topology
    assert exit_s < 10
