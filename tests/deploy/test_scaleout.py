"""Scale-out through nginx (deploy/topology.py: redis-server + 2 ssf-serve replicas + nginx, all loopback):
an upload through any replica is served by all, a replace reaches every replica within 1 s (p99) without
ever mixing versions, a delete is 404 everywhere, a task's traffic sticks to one replica, and nginx
enforces the app's body limits and the slowloris timeouts."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from deploy.topology import Topology
from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.load import Load, predict
from tests.helpers.servers import upload

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.timeout(240)]


def bases(topo: Topology) -> list[str]:
    return [topo.url, *(topo.replica_url(i) for i in range(topo.replicas))]


def test_upload_through_any_replica_is_served_by_all(topo: Topology, weights: Path) -> None:
    via = {"alpha": topo.replica_url(0), "beta": topo.replica_url(1), "gamma": topo.url}
    for name, base in via.items():
        r = upload(base, task_delta(name, 1))
        assert r.status_code == 201, r.text
    with httpx.Client(timeout=10) as http:
        for name in via:
            for base in bases(topo):
                r = predict(http, base, name)
                assert r.status_code == 200, (name, base, r.text)
                assert r.json()["version"] == 1
                info = http.get(f"{base}/tasks/{name}").json()
                assert info["version"] == 1


def test_replace_reaches_every_replica_within_1s_and_never_mixes_versions(
    topo: Topology, weights: Path
) -> None:
    task, replaces = "swap", 20
    deltas = {v: task_delta(task, seed=1000 + v) for v in range(1, replaces + 2)}
    assert upload(topo.url, deltas[1]).status_code == 201
    replicas = [topo.replica_url(i) for i in range(topo.replicas)]
    acked: dict[int, float] = {}
    with Load([(b, task) for b in [*replicas, topo.url]], max_s=90) as load:
        for v in range(2, replaces + 2):
            base = replicas[v % len(replicas)]  # replace through each replica in turn
            r = upload(base, deltas[v], replace=True)
            assert r.status_code == 201 and r.json()["version"] == v, r.text
            acked[v] = time.monotonic()
            time.sleep(0.4)
        time.sleep(1.5)
    answers = load.snapshot()
    assert answers and all(a.status == 200 for a in answers), {a.status for a in answers}
    versioned = [(a, a.version) for a in answers if a.version is not None]
    assert len(versioned) == len(answers)

    # propagation: from the acknowledgement to the first answer of a request sent after it
    lags = []
    for v, t_ack in acked.items():
        for base in replicas:
            seen = [a.ended for a, av in versioned if a.source == base and a.started >= t_ack and av >= v]
            assert seen, f"{base} never served version >= {v}"
            lags.append(min(seen) - t_ack)
    lags.sort()
    p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    print(f"replace propagation over {len(lags)} samples: p50={lags[len(lags) // 2]:.3f}s p99={p99:.3f}s")
    assert p99 <= 1.0

    # never mixed: one version, one answer (everywhere); versions only move forward on one client
    by_version: dict[int, set[tuple[tuple[int, float], ...]]] = {}
    for a, av in versioned:
        rounded = tuple((i, round(s, 4)) for i, s in a.scores)
        by_version.setdefault(av, set()).add(rounded)
    for v, variants in by_version.items():
        assert len(variants) == 1, f"version {v} answered {len(variants)} different ways"
    assert len({next(iter(s)) for s in by_version.values()}) == len(by_version)  # versions do differ
    for base in replicas:
        versions = [av for a, av in versioned if a.source == base]
        assert versions == sorted(versions), f"{base} went back to an older version"


def test_delete_is_404_everywhere(topo: Topology, weights: Path) -> None:
    assert upload(topo.url, task_delta("doomed", 1)).status_code == 201
    with httpx.Client(timeout=10) as http:
        for base in bases(topo):
            assert predict(http, base, "doomed").status_code == 200  # resident everywhere
        assert http.delete(f"{topo.replica_url(0)}/tasks/doomed", headers=AUTH).status_code == 204
        t0 = time.monotonic()
        for base in bases(topo):
            while (status := predict(http, base, "doomed").status_code) != 404:
                assert status == 200
                assert time.monotonic() - t0 < 5, f"{base} still serves a deleted task"
                time.sleep(0.05)
            assert http.get(f"{base}/tasks/doomed").status_code == 404
        print(f"delete seen everywhere after {time.monotonic() - t0:.3f}s")
        for base in bases(topo):  # and it stays gone
            assert predict(http, base, "doomed").status_code == 404


def test_a_task_sticks_to_one_replica(topo: Topology, weights: Path) -> None:
    names = [f"sticky-{i}" for i in range(6)]
    for name in names:
        assert upload(topo.url, task_delta(name, 1)).status_code == 201
    with httpx.Client(timeout=10) as http:
        for _ in range(5):
            for name in names:
                assert predict(http, topo.url, name).status_code == 200
    upstreams: dict[str, set[str]] = {}
    for line in topo.access_log.read_text().splitlines():
        m = re.search(r"POST /tasks/(sticky-\d)/predict\S* .* upstream=(\S+)", line)
        if m:
            upstreams.setdefault(m.group(1), set()).add(m.group(2))
    assert set(upstreams) == set(names)
    assert all(len(u) == 1 for u in upstreams.values()), upstreams


def test_nginx_body_limits_agree_with_the_app(topo: Topology) -> None:
    big = b"\x00" * (8 * 1024 * 1024 + 1)
    r = httpx.post(f"{topo.url}/tasks/x/predict", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 413
    fits = b"\x00" * (8 * 1024 * 1024 - 4096)  # passes nginx; the app then finds no image in it
    r = httpx.post(f"{topo.url}/tasks/alpha/predict", content=fits, headers={"Content-Type": "image/png"})
    assert r.status_code == 400, r.text
    r = httpx.post(
        f"{topo.url}/tasks", files={"delta": ("d", b"\x00" * (17 * 1024 * 1024))}, headers=AUTH, timeout=30
    )
    assert r.status_code == 413


def test_slowloris_connections_are_closed_by_nginx(topo: Topology) -> None:
    socks = []
    t0 = time.monotonic()
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", topo.nginx_port), timeout=10)
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(s)
    with httpx.Client(timeout=5) as http:  # legitimate traffic still flows meanwhile
        assert http.get(f"{topo.url}/healthz").status_code == 200
    closed_at = []
    for s in socks:
        try:
            while s.recv(4096):  # nginx may answer 408 before closing
                pass
        except OSError:
            pass
        closed_at.append(time.monotonic() - t0)
        s.close()
    print(f"slowloris connections closed after {max(closed_at):.2f}s")
    assert max(closed_at) <= 5 + 1.5
