"""Open-loop load: arrivals at a fixed rate, latency from the scheduled arrival, and the rate search.

Used in process by ``many_tasks`` and ``e2e_bench`` (the in-process rows), and as a process of its own for
the HTTP row: ``python -m bench.loadgen`` reads one JSON command per line on stdin and answers one JSON line
per command on stdout, so the HTTP client neither shares the server's interpreter nor hides its cost (every
answer carries the generator's own CPU seconds). Its HTTP/1.1 client is a few lines on asyncio streams over
uvloop: one pre-built request per (task, image), keep-alive connections reused from a pool, Content-Length
responses only (what uvicorn sends), so a request costs the client tens of microseconds, not httpx's
hundreds.

Arrivals: a Poisson process conditioned on its count, i.e. ``round(rate * duration)`` uniform points in
the window, sorted. Every run offers exactly its rate, so a passing run's throughput is the rate itself and
the count's own Poisson noise (about 1/sqrt(n)) never enters the comparison.

A run is decided early once more requests are late (over the target, answered or not) than its p99 allows:
it stops sending, so an overloaded run neither lasts its whole window nor leaves a long queue behind.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def arrivals(rate: float, duration_s: float, seed: int, max_requests: int = 50_000) -> list[float]:
    n = min(max_requests, max(1, round(rate * duration_s)))
    rng = random.Random(seed)
    return sorted(rng.uniform(0.0, duration_s) for _ in range(n))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def allowed_late(n: int, q: float = 99.0) -> int:
    """How many of n latencies may exceed the target while the q-th percentile still meets it."""
    return n - max(1, math.ceil(q / 100 * n))


async def open_loop(
    send: Callable[[int], Awaitable[Any]],
    rate: float,
    duration_s: float,
    seed: int = 0,
    slo_s: float = 0.25,
    grace_s: float = 5.0,
    early_stop: bool = True,
) -> dict[str, Any]:
    """Send request i at its scheduled arrival; answered latencies from that arrival. Requests unanswered
    ``grace_s`` after the last one sent count as failed. Bounded: at most 50,000 requests, one window."""
    loop = asyncio.get_running_loop()
    at = arrivals(rate, duration_s, seed)
    n = len(at)
    budget = allowed_late(n)
    lat: list[float | None] = [None] * n
    lag = [0.0] * n
    flagged = [False] * n
    late = errors = 0
    head = 0
    first_error: list[str] = []
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    t0 = loop.time() + 0.02

    async def one(i: int) -> None:
        nonlocal errors, late
        lag[i] = loop.time() - (t0 + at[i])  # the generator's own delay before it sends
        try:
            await send(i)
            lat[i] = v = loop.time() - (t0 + at[i])
            if v > slo_s and not flagged[i]:
                late += 1
        except Exception as e:
            errors += 1
            if not first_error:
                first_error.append(repr(e)[:200])

    tasks = []
    stopped = False
    for i, a in enumerate(at):
        delay = t0 + a - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i)))
        if early_stop:
            now = loop.time()
            while head < i and t0 + at[head] + slo_s < now:  # requests already past the target
                if lat[head] is None and not flagged[head]:
                    flagged[head] = True
                    late += 1
                head += 1
            if late + errors > budget:
                stopped = True
                break
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    sent = len(tasks)
    done = [x for x in lat[:sent] if x is not None]
    tail = done + [math.inf] * (n - len(done))  # unanswered (or never sent) requests are the slowest
    return {
        "rate": rate,
        "sent": n,
        "done": len(done),
        "errors": errors,
        "stopped_early": stopped,
        "first_error": first_error[0] if first_error else "",
        "throughput": len(done) / max(duration_s, 1e-9),
        "goodput": sum(1 for x in done if x <= slo_s) / max(duration_s, 1e-9),
        "p50": percentile(tail, 50),
        "p95": percentile(tail, 95),
        "p99": percentile(tail, 99),
        "send_lag_max": max(lag[:sent], default=0.0),
        "loop_cpu_s": time.thread_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "arrivals_s": at[:sent],  # each request's scheduled arrival, and its latency (None: no answer)
        "latencies_s": lat[:sent],
    }


def meets(r: dict[str, Any], target: float) -> bool:
    """p99 at the target with nothing lost (the latency half of ``passes``, for rates already known to be
    below what the server sustains)."""
    return r["p99"] <= target and r["done"] == r["sent"] and not r["stopped_early"]


CONFIRM = 0.97  # capacity_at_target's first rate, as a fraction of the saturated throughput


async def saturated(
    send: Callable[[int], Awaitable[Any]],
    rate: float,
    duration_s: float,
    seed: int = 0,
    settle_s: float = 0.0,
) -> dict[str, Any]:
    """The throughput of an open-loop run at ``rate``, meant to be more than the server sustains
    (``overload`` keeps it so): the answers completed between ``settle_s`` (its queue filling, its batches
    growing) and the last arrival, per second of the span they were completed in (errors and unanswered
    requests not counted). No early stop; every answer is awaited."""
    r = await open_loop(send, rate, duration_s, seed, slo_s=math.inf, grace_s=60.0, early_stop=False)
    ends = sorted(a + v for a, v in zip(r["arrivals_s"], r["latencies_s"], strict=True) if v is not None)
    inside = [e for e in ends if settle_s <= e <= duration_s]
    # from the first completion counted to the last, not over the whole span: a batching server answers
    # in bursts, and a span's edges would otherwise add or drop up to one batch (5% of a one-second count)
    counted = sum(1 for e in inside if e > inside[0] + 1e-3) if inside else 0
    span = inside[-1] - inside[0] if len(inside) > 1 else 0.0
    throughput = counted / span if counted and span > 0 else len(inside) / max(duration_s - settle_s, 1e-9)
    return {"rate": rate, "throughput": throughput, "counted": counted, "done": r["done"], "sent": r["sent"]}


OVERLOAD = (1.25, 1.6)  # a saturation run offers this much more than the server answers


async def overload(saturate: Callable[[float], Awaitable[dict[str, Any]]], rate: float) -> dict[str, Any]:
    """``saturate(rate)``, run again (at most twice) at 1.4x the throughput it measured while the offer
    was outside ``OVERLOAD`` of it: with a smaller excess the queue grows too slowly for batches to reach
    their largest within the window, and with a larger one the arrivals the server turns away or parses
    ahead of the model take CPU that the steady state never spends."""
    sat = await saturate(rate)
    for _ in range(2):
        if OVERLOAD[0] * sat["throughput"] <= sat["rate"] <= OVERLOAD[1] * sat["throughput"]:
            break
        sat = await saturate(1.4 * sat["throughput"])
    return sat


async def capacity_at_target(
    run: Callable[[float], Awaitable[dict[str, Any]]],
    saturate: Callable[[float], Awaitable[dict[str, Any]]],
    rate: float,
    target: float,
    steps: int,
    lo: float = 0.0,
    confirm: float = CONFIRM,
) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """The highest rate the server sustains with p99 at ``target``, from its saturated throughput: measured
    under overload from ``rate`` (``overload``: raised until 25% above what is answered), then a run at
    ``confirm`` of it that must meet the target with nothing lost. A rate above the saturated throughput
    cannot be sustained (the queue grows for as long as it lasts) and one below it can, so the result is
    within ``1 - confirm`` of the limit, from one continuous count instead of a bisection's pass/fail coin
    flips at the edge. When latency binds before capacity, the confirming rate steps down 4% a run for
    ``steps`` runs, then is bisected between ``lo`` and the last missed rate for ``steps`` more. Returns
    (saturation run, best passing run or None, runs tried)."""
    sat = await overload(saturate, rate)
    tried: list[dict[str, Any]] = []
    hi = confirm * sat["throughput"]
    for k in range(max(steps, 1)):
        r = await run(hi * 0.96**k)
        tried.append(r)
        if meets(r, target):
            return sat, r, tried
    _, _, best = await bisect(run, lo, tried[-1]["rate"], steps, lambda r: meets(r, target), tried)
    return sat, best, tried


async def bisect(
    run: Callable[[float], Awaitable[dict[str, Any]]],
    lo: float,
    hi: float,
    steps: int,
    ok: Callable[[dict[str, Any]], bool],
    tried: list[dict[str, Any]],
    best: dict[str, Any] | None = None,
) -> tuple[float, float, dict[str, Any] | None]:
    """``steps`` runs halving [lo, hi] toward the highest rate whose run is ``ok`` (each appended to
    ``tried``); the bracket left and the best ``ok`` run (``best`` when none was)."""
    for _ in range(steps):
        rate = (lo + hi) / 2
        r = await run(rate)
        tried.append(r)
        if ok(r):
            lo, best = rate, r
        else:
            hi = rate
    return lo, hi, best


def passes(r: dict[str, Any], target: float) -> bool:
    """p99 at the target, nothing lost, and (where the caller measured it, ``kept_up``) the server busy for
    no longer than the window: a short window otherwise passes an overload whose backlog drains within the
    target after the last arrival (up to target / window more than the server sustains)."""
    return r["p99"] <= target and r["done"] == r["sent"] and not r["stopped_early"] and r.get("kept_up", True)


async def search_rate(
    run: Callable[[float], Awaitable[dict[str, Any]]],
    lo: float,
    hi: float,
    steps: int,
    target: float,
    floor_steps: int = 3,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Bisect the offered rate in [lo, hi] for the highest one whose run meets ``target`` (p99, nothing
    lost): ``steps`` runs leave a bracket of (hi - lo) / 2**steps. When every rate passed, it climbs in
    steps of (hi - lo) / 2 until one fails (at most ``steps`` more runs); when none did, the rate keeps
    halving below ``lo`` (``floor_steps`` more runs)."""
    tried: list[dict[str, Any]] = []
    lo, hi, best = await bisect(run, lo, hi, steps, lambda r: passes(r, target), tried)
    climb = (hi - lo) * 2 ** (steps - 1)  # half the first bracket
    for _ in range(steps if all(passes(r, target) for r in tried) else 0):
        # every rate passed: the limit lies above the bracket, so climb until one fails, then bisect twice
        r = await run(lo + climb)
        tried.append(r)
        if passes(r, target):
            lo, best = lo + climb, r
            continue
        lo, hi, best = await bisect(run, lo, lo + climb, 2, lambda r: passes(r, target), tried, best)
        break
    rate = lo
    for _ in range(floor_steps if best is None else 0):
        rate /= 2
        r = await run(rate)
        tried.append(r)
        if passes(r, target):
            best = r
            break
    return best, tried


# ------------------------------------------------------------------------- HTTP, in its own process
class Pool:
    """Keep-alive HTTP/1.1 connections to one host; a request takes an idle one or opens a new one.

    The server closes a connection that stays idle longer than its keep-alive timeout (``ssf-serve``:
    ``SSF_KEEP_ALIVE_S``, 75 s), which happens between the runs of a benchmark that interleaves several
    servers. Such connections are dropped before reuse (their reader has seen EOF), and a request whose
    reused connection closes before any byte of an answer (a close racing the reuse) is sent once more on a
    new connection, as HTTP clients do (urllib3, aiohttp): the server never read it. Without this, every
    request of a run fell on a dead connection and the run counted as a failure at any rate."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.resent = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    def _take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()  # the server closed it while it was idle
        return None

    async def request(self, raw: bytes) -> int:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(*conn, raw)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                    raise  # the server answered in part: a real failure, not a stale connection
                self.resent += 1
        return await self._exchange(*await self._open(), raw)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status

    async def warm(self, n: int) -> None:
        """``n`` open keep-alive connections before a run (as wrk does), so the run measures requests, not
        a burst of connection setups at its start; the ones the server closed since are replaced."""
        alive = []
        while (conn := self._take_idle()) is not None:
            alive.append(conn)
        self.idle = alive
        while len(self.idle) < n:
            self.idle.append(await self._open())

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def build_request(
    host: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def serve_commands() -> None:
    """stdin: {"setup": {url, bodies: [hex, ...], requests: [[path, content_type, body index], ...],
    headers: {name: value} (optional, sent with every request), connections: n (optional, opened now)}}, then
    {"run": {rate, duration, seed, slo_s, early_stop (optional, default true)}}; each answered with one JSON
    line (the run's numbers plus the process's CPU seconds during it)."""
    reader = asyncio.StreamReader(limit=1 << 26)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pool: Pool | None = None
    connections = 0
    raws: list[bytes] = []
    while line := await reader.readline():
        cmd = json.loads(line)
        if "setup" in cmd:
            s = cmd["setup"]
            host, _, port = s["url"].removeprefix("http://").partition(":")
            pool = Pool(host, int(port))
            bodies = [bytes.fromhex(b) for b in s["bodies"]]
            raws = [build_request(host, p, bodies[b], ct, s.get("headers")) for p, ct, b in s["requests"]]
            connections = s.get("connections", 0)  # opened before each run (``Pool.warm``)
            out: dict[str, Any] = {"ok": True}
        elif "run" in cmd and pool is not None:
            c, p = cmd["run"], pool

            statuses: dict[str, int] = {}

            async def send(
                i: int, p: Pool = p, raws: list[bytes] = raws, statuses: dict[str, int] = statuses
            ) -> None:
                status = await p.request(raws[i % len(raws)])
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")

            await p.warm(connections)  # the server may have closed idle ones since the last run
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            early = c.get("early_stop", True)
            out = await open_loop(send, c["rate"], c["duration"], c["seed"], c["slo_s"], early_stop=early)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            out["statuses"] = statuses
            out["client_cpu_s"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            out["connections"] = pool.opened
            out = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}
        else:
            out = {"error": f"unknown command {sorted(cmd)}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    if pool is not None:
        pool.close()


class RemoteLoad:
    """The generator process, driven from the benchmark: ``setup`` once, then ``run`` per rate."""

    def __init__(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited ({self.proc.poll()})")
        out: dict[str, Any] = json.loads(line)
        return {k: (math.inf if v is None and k.startswith("p") else v) for k, v in out.items()}

    def setup(
        self,
        url: str,
        requests: list[tuple[str, str, bytes]],
        headers: dict[str, str] | None = None,
        connections: int = 0,
    ) -> None:
        """The requests to cycle through: (path, content type, body); each distinct body is sent once.
        ``headers`` go with every request (an Authorization header, say); ``connections`` keep-alive
        connections are open before each run starts."""
        index: dict[bytes, int] = {}
        rows = [[p, ct, index.setdefault(b, len(index))] for p, ct, b in requests]
        setup = {
            "url": url,
            "bodies": [b.hex() for b in index],
            "requests": rows,
            "headers": headers or {},
            "connections": connections,
        }
        out = self._call({"setup": setup})
        if not out.get("ok"):
            raise RuntimeError(f"the load generator refused the setup: {out}")

    async def run(
        self, rate: float, duration: float, seed: int, slo_s: float, early_stop: bool = True
    ) -> dict[str, Any]:
        """One open-loop run in the generator process; ``early_stop=False`` sends the whole schedule
        whatever the answers (the run's ``statuses`` count every HTTP status seen)."""
        cmd = {
            "run": {
                "rate": rate,
                "duration": duration,
                "seed": seed,
                "slo_s": slo_s,
                "early_stop": early_stop,
            }
        }
        return await asyncio.to_thread(self._call, cmd)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    try:
        import uvloop

        uvloop.run(serve_commands())
    except ImportError:  # uvicorn[standard] brings uvloop; plain asyncio works too, a little slower
        asyncio.run(serve_commands())


if __name__ == "__main__":
    main()
