"""R1, R10, R6, R9, R2, R4 against real ``ssf-serve`` subprocesses (tiny test_vit backbone), short and bounded
in count and time for the CI tier. Numbers are printed (run with -s) and recorded in RELIABILITY.md."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import servers
from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TASK = "cats"
IMG = encode("PNG", 3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("rel-r-backbone"))


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[max(0, int(len(xs) * 0.99) - 1)] if xs else 0.0


def predict(c: httpx.Client, task: str = TASK) -> httpx.Response:
    return c.post(f"/tasks/{task}/predict?top_k=4", content=IMG, headers={"Content-Type": "image/png"})


async def blast(
    url: str, concurrency: int, duration_s: float, max_requests: int
) -> list[tuple[int, float, dict]]:
    """``concurrency`` clients predicting as fast as they can for ``duration_s`` (at most max_requests)."""
    out: list[tuple[int, float, dict]] = []
    stop_at = time.monotonic() + duration_s

    async def worker(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at and len(out) < max_requests:
            t0 = time.perf_counter()
            try:
                r = await c.post(
                    f"/tasks/{TASK}/predict?top_k=4", content=IMG, headers={"Content-Type": "image/png"}
                )
            except httpx.TransportError as e:  # recorded (status 0), so one does not end every worker
                out.append((0, time.perf_counter() - t0, {"error": repr(e)}))
                continue
            out.append((r.status_code, time.perf_counter() - t0, dict(r.headers)))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return out


# ----------------------------------------------------------------------------------------- R1 + R10

QUEUE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def overload_server(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[servers.Server]:
    tmp = tmp_path_factory.mktemp("rel-r1")
    s = servers.start(
        tmp,
        weights,
        request_timeout_s=QUEUE_TIMEOUT_S,
        max_queue_size=16,
        max_batch_size=8,
        max_images_per_request=16,
    )
    assert servers.upload(s.url, task_delta(TASK, 1)).status_code == 201
    yield s
    servers.stop(s)


def test_r1_r10_overload(overload_server: servers.Server) -> None:
    url = overload_server.url
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(5):
            predict(c)
        unloaded = []
        for _ in range(40):
            t0 = time.perf_counter()
            assert predict(c).status_code == 200
            unloaded.append(time.perf_counter() - t0)
    # saturation: concurrency 4 for 3 s (the model runs batches; this is its throughput)
    sat = asyncio.run(blast(url, 4, 3.0, 5000))
    sat_rps = sum(1 for s, _, _ in sat if s == 200) / 3.0
    images0 = servers.metric(url, "ssf_engine_images_total")
    results = asyncio.run(blast(url, 48, 8.0, 20000))  # ~12x the saturating concurrency
    images1 = servers.metric(url, "ssf_engine_images_total")
    ok = [dt for s, dt, _ in results if s == 200]
    rejected = [(s, h) for s, _, h in results if s != 200]
    bad = [s for s, h in rejected if s not in (429, 503) or "retry-after" not in h]
    offered = len(results) / 8.0
    print(
        f"R1: unloaded p99 {p99(unloaded) * 1000:.1f} ms; saturation {sat_rps:.1f} req/s; overload offered "
        f"{offered:.1f} req/s ({offered / max(sat_rps, 1e-9):.1f}x), {len(ok)} admitted (p99 "
        f"{p99(ok) * 1000:.1f} ms, max {max(ok, default=0) * 1000:.1f} ms), {len(rejected)} rejected "
        f"({sorted({s for s, _ in rejected})}), {len(bad)} without 429/503+Retry-After"
    )
    transport = [h.get("error") for s, h in rejected if s == 0]
    assert not bad, f"transport errors (first 3): {transport[:3]}"
    assert rejected, "48 concurrent clients against a queue of 16 should have been refused some of the time"
    # No admitted request waited in the queue longer than the queue timeout (server-side histogram). The
    # client-side p99 is printed, not asserted: the 48-coroutine client shares the 2 cores with the server,
    # so its own scheduling delay lands in its timings (RELIABILITY.md records the numbers).
    waits_le = servers.metric(url, "ssf_engine_queue_wait_seconds_bucket", f'le="{QUEUE_TIMEOUT_S}"')
    waits_all = servers.metric(url, "ssf_engine_queue_wait_seconds_count")
    print(
        f"R1: queue waits <= {QUEUE_TIMEOUT_S} s: {waits_le:.0f} of {waits_all:.0f}; client p99 within "
        f"2x unloaded + timeout: {p99(ok) <= 2 * p99(unloaded) + QUEUE_TIMEOUT_S}"
    )
    assert waits_all > 0 and waits_le == waits_all
    # R10: every executed image answered 200; none whose deadline passed was run
    executed = images1 - images0
    expired = servers.metric(url, "ssf_engine_rejected_total", 'reason="deadline"')
    print(
        f"R10: {executed:.0f} images executed during the overload, {len(ok)} answered 200; "
        f"{expired:.0f} requests dropped at their deadline"
    )
    assert executed == len(ok)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert predict(c).status_code == 200
        assert c.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------------------------- R6


def test_r6_sigterm_under_load(tmp_path: Path, weights: Path) -> None:
    s = servers.start(tmp_path, weights, drain_delay_s=1.0, graceful_timeout_s=20)
    assert servers.upload(s.url, task_delta(TASK, 1)).status_code == 201
    outcomes: list[str] = []
    ready_flip: list[float] = []
    stop_at = time.monotonic() + 20
    signalled = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            while time.monotonic() < stop_at and s.proc.poll() is None:
                try:
                    r = predict(c)
                    outcomes.append("ok" if r.status_code == 200 else f"status {r.status_code}")
                except httpx.ConnectError:  # listener closed: never admitted, the client retries elsewhere
                    outcomes.append("refused")
                    time.sleep(0.05)
                except httpx.HTTPError as e:  # dropped: admitted (a failure) or never read by the app
                    outcomes.append(f"dropped {type(e).__name__}")

    def probe() -> None:
        while time.monotonic() < stop_at and s.proc.poll() is None:
            if signalled.is_set():
                try:
                    if httpx.get(s.url + "/readyz", timeout=1).status_code == 503 and not ready_flip:
                        ready_flip.append(time.monotonic())
                except httpx.HTTPError:
                    break
            time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(4)] + [threading.Thread(target=probe)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    t_sig = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    signalled.set()
    rc = s.proc.wait(timeout=40)
    t_exit = time.monotonic()
    for t in threads:
        t.join(timeout=40)
    ok = outcomes.count("ok")
    answered = [o for o in outcomes if o == "ok" or o.startswith("status")]
    dropped = [o for o in outcomes if o.startswith("dropped")]
    # What the server handled, from its access log (one line per request it read, written as it answered):
    # a connection that dropped is a failed in-flight request only if the app had read that request, i.e.
    # only if the server handled more predictions than its clients received answers.
    handled = sum(
        1
        for line in s.logs().splitlines()
        if line.startswith("{")
        and (rec := json.loads(line)).get("message") == "request"
        and rec["http"]["route"] == "/tasks/{name}/predict"
    )
    print(
        f"R6: {ok} ok, {outcomes.count('refused')} refused after close, {len(dropped)} connections dropped "
        f"{sorted(set(dropped))}, {handled} handled by the server vs {len(answered)} answers received; "
        f"readyz 503 {((ready_flip or [t_exit])[0] - t_sig) * 1000:.0f} ms after SIGTERM; exit "
        f"{t_exit - t_sig:.2f} s after, rc {rc}"
    )
    assert ok > 0
    assert not [o for o in answered if o.startswith("status 5")]
    assert handled == len(answered), "the server handled requests whose answers never reached the client"
    assert ready_flip and ready_flip[0] - t_sig < 1.0
    assert t_exit - t_sig < 20


# ----------------------------------------------------------------------------------------------- R9


def test_r9_liveness_never_depends_on_redis(tmp_path: Path, weights: Path) -> None:
    rs = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    rs.start()
    s = servers.start(tmp_path, weights, store=rs.url)
    try:
        assert servers.upload(s.url, task_delta(TASK, 1)).status_code == 201
        with httpx.Client(base_url=s.url, timeout=30) as c:
            first = predict(c)
            assert first.status_code == 200
            v1 = first.json()
            rs.kill()
            statuses, live = [], []
            for _ in range(20):
                t0 = time.perf_counter()
                live.append(c.get("/healthz").status_code)
                statuses.append(predict(c).status_code)
                time.sleep(0.1)
            t0 = time.perf_counter()
            r = c.post(
                "/tasks?replace=true",
                headers=AUTH,
                files={"delta": ("d.safetensors", task_delta(TASK, 2))},
            )
            admin_s = time.perf_counter() - t0
            ready_down = c.get("/readyz").status_code
            print(
                f"R9: Redis down: /healthz {sorted(set(live))}, predict {sorted(set(statuses))} "
                f"(20 each), admin upload {r.status_code} in {admin_s * 1000:.0f} ms, /readyz {ready_down}"
            )
            assert set(live) == {200}
            assert set(statuses) == {200}
            assert r.status_code == 503 and "retry-after" in r.headers and admin_s < 2.0
            # R8: that replace failed after validation and install (at the store write); the old version
            # still serves with identical scores, and the replica stays live
            after = [predict(c) for _ in range(10)]
            assert {x.status_code for x in after} == {200}
            assert {x.json()["version"] for x in after} == {1}
            assert all(x.json()["predictions"] == v1["predictions"] for x in after)
            print(
                "R8: replace that failed after validation (store write, Redis down): 10/10 predicts 200 "
                "on version 1 with identical scores"
            )
            rs.start()
            t_up = time.monotonic()
            while time.monotonic() - t_up < 10:
                if (
                    c.get("/readyz").status_code == 200
                    and servers.upload(s.url, task_delta(TASK, 2), replace=True).status_code == 201
                ):
                    break
                time.sleep(0.2)
            back = time.monotonic() - t_up
            print(f"R9: after Redis returned, admin works again in {back:.2f} s")
            assert back < 10
    finally:
        servers.stop(s)
        rs.kill()


def test_r9_start_with_redis_down(tmp_path: Path, weights: Path) -> None:
    rs = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    s = servers.start(tmp_path, weights, store=rs.url, wait_ready=False)
    try:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            assert c.get("/healthz").status_code == 200
            time.sleep(1.0)
            # docs/api.md: /readyz is 200 once the backbone is loaded and warmed; Redis is not part of it
            # (loaded tasks keep serving while it is down)
            ready_before = c.get("/readyz").status_code
            assert ready_before == 200
            up = servers.upload(s.url, task_delta(TASK, 1))
            assert up.status_code == 503 and "retry-after" in up.headers, up.text
            rs.start()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15:
                if servers.upload(s.url, task_delta(TASK, 1)).status_code == 201:
                    break
                time.sleep(0.1)
            took = time.monotonic() - t0
            print(
                f"R9: started with Redis down: live 200, ready {ready_before}, upload 503; "
                f"uploads work {took:.2f} s after Redis up"
            )
            assert predict(c).status_code == 200
            assert took <= 5.0
    finally:
        servers.stop(s)
        rs.kill()


# ------------------------------------------------------------------------------------------ R2 + R4


def reference_scores(weights: Path, store_tmp: Path, seeds: range) -> dict[int, list[float]]:
    """Reference scores per version, from a private server that loads each version in turn."""
    ref = servers.start(store_tmp, weights)
    out = {}
    try:
        with httpx.Client(base_url=ref.url, timeout=30) as c:
            for v, seed in enumerate(seeds, 1):
                r = servers.upload(ref.url, task_delta("hot", seed), replace=v > 1)
                assert r.status_code == 201 and r.json()["version"] == v, r.text
                p = predict(c, "hot").json()
                out[v] = [round(x["score"], 4) for x in sorted(p["predictions"][0], key=lambda x: x["index"])]
    finally:
        servers.stop(ref)
    return out


def test_r2_r4_hot_swap_under_load_two_replicas(tmp_path: Path, weights: Path) -> None:
    swaps = 30
    seeds = range(100, 100 + swaps + 1)
    deltas = {v: task_delta("hot", seed) for v, seed in enumerate(seeds, 1)}
    (tmp_path / "ref").mkdir()
    ref = reference_scores(weights, tmp_path / "ref", seeds)
    rs = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    rs.start()
    a = servers.start(tmp_path, weights, store=rs.url)
    b = servers.start(tmp_path, weights, store=rs.url)
    mismatches: list[str] = []
    statuses: dict[int, int] = {}
    stale: list[float] = []
    stop = threading.Event()
    current = {"v": 1}

    def client(url: str) -> None:
        last = 0
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                r = predict(c, "hot")
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    continue
                body = r.json()
                v = body["version"]
                got = [round(x["score"], 4) for x in sorted(body["predictions"][0], key=lambda x: x["index"])]
                if got != pytest.approx(ref[v], abs=2e-4):
                    mismatches.append(f"{url} v{v}: {got} != {ref[v]}")
                if v < last:
                    mismatches.append(f"{url}: version went back {last} -> {v}")
                last = v

    def watcher() -> None:
        """Each replica's /tasks/hot version vs the store's, every 0.1 s: how long a replica stays stale."""
        behind_since: dict[str, float] = {}
        while not stop.is_set():
            for s in (a, b):
                try:
                    v = httpx.get(s.url + "/tasks/hot", timeout=5).json().get("version", 0)
                except (httpx.HTTPError, ValueError):
                    continue
                now = time.monotonic()
                if v < current["v"]:
                    behind_since.setdefault(s.url, now)
                    stale.append(now - behind_since[s.url])
                else:
                    behind_since.pop(s.url, None)
            time.sleep(0.1)

    kills = 0
    try:
        assert servers.upload(a.url, deltas[1]).status_code == 201
        time.sleep(2.5)
        threads = [threading.Thread(target=client, args=(u,)) for u in (a.url, b.url)]
        threads.append(threading.Thread(target=watcher))
        for t in threads:
            t.start()
        r = redis.Redis.from_url(rs.url)
        t_end = time.monotonic() + 90
        for v in range(2, swaps + 2):
            if time.monotonic() > t_end:
                break
            target = (a, b)[v % 2]
            resp = servers.upload(target.url, deltas[v], replace=True)
            assert resp.status_code == 201 and resp.json()["version"] == v, resp.text
            current["v"] = v
            if v % 3 == 0:  # R4: drop the pub/sub connections (10 injections over the run)
                kills += int(r.execute_command("CLIENT", "KILL", "TYPE", "pubsub") or 0)
            time.sleep(0.5)
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        final = {s.url: httpx.get(s.url + "/tasks/hot").json()["version"] for s in (a, b)}
    finally:
        stop.set()
        servers.stop(a)
        servers.stop(b)
        rs.kill()
    worst = max(stale, default=0.0)
    print(
        f"R2: {swaps} replaces, responses {statuses}, {len(mismatches)} mismatches; R4: {kills} pub/sub "
        f"connections killed, worst staleness {worst:.2f} s (reconcile interval 2 s), final {final}"
    )
    assert not mismatches, "\n".join(mismatches[:20])
    assert not any(s >= 500 for s in statuses)
    assert set(final.values()) == {current["v"]}
    assert worst <= 2.0 + 1.0  # reconcile interval plus one reconcile's work on a loaded 2-core machine
