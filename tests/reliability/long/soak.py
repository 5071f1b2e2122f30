"""Long tier (not collected by pytest): ``python -m tests.reliability.long.soak [--minutes M] [--kills N]``.

- R3: Redis (AOF always) is killed with -9 ``--kills`` times while an uploader replaces tasks; every
  acknowledged (name, version, sha256) must be in the registry after the restarts (0 lost); predicts on the
  loaded task during each outage must succeed.
- R7: soak with churn: a predict loop plus an upload every 5 s and a delete every 30 s for ``--minutes``;
  RSS sampled once a second from /proc; reports growth over the second half and fd count drift.

Every loop is bounded in count and time. Prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import servers
from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import RedisServer

IMG = encode("PNG", 3)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--leaky", action="store_true", help="run the deliberately leaking build (must FAIL)")
    ap.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    ap.add_argument("--max-fd-drift", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ssf-soak-"))
    weights = backbone_file("vit", tmp)
    (tmp / "redis").mkdir()
    rs = RedisServer(tmp / "redis")
    rs.start()
    # R3 wants appendfsync always
    import redis

    redis.Redis.from_url(rs.url).config_set("appendfsync", "always")
    module = "tests.reliability.long.leaky_serve" if args.leaky else "service.cli"
    s = servers.start(tmp, weights, store=rs.url, module=module)
    deltas = [task_delta(f"t{i}", 10 + i) for i in range(4)]
    assert servers.upload(s.url, task_delta("base", 1)).status_code == 201
    acked: dict[str, tuple[int, str]] = {}
    stats = {"predict_ok": 0, "predict_other": {}, "uploads_acked": 0, "uploads_refused": 0, "deletes": 0}
    stop = threading.Event()
    samples: list[tuple[float, float, int]] = []
    t_start = time.monotonic()
    t_end = t_start + args.minutes * 60

    def predictor() -> None:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            while not stop.is_set() and time.monotonic() < t_end:
                try:
                    r = c.post("/tasks/base/predict", content=IMG, headers={"Content-Type": "image/png"})
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                if code == 200:
                    stats["predict_ok"] += 1
                else:
                    stats["predict_other"][str(code)] = stats["predict_other"].get(str(code), 0) + 1
                time.sleep(0.02)

    def churn() -> None:
        i = 0
        last_delete = time.monotonic()
        while not stop.is_set() and time.monotonic() < t_end:
            name = f"t{i % 4}"
            try:
                r = servers.upload(s.url, deltas[i % 4], replace=True, timeout=10)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 201:
                stats["uploads_acked"] += 1
                acked[name] = (r.json()["version"], r.json()["sha256"])
            else:
                stats["uploads_refused"] += 1
            if time.monotonic() - last_delete > 30:
                victim = f"t{(i + 2) % 4}"
                try:
                    if httpx.delete(f"{s.url}/tasks/{victim}", headers=AUTH, timeout=10).status_code == 204:
                        acked.pop(victim, None)
                        stats["deletes"] += 1
                except httpx.HTTPError:
                    pass
                last_delete = time.monotonic()
            i += 1
            time.sleep(5)

    def sampler() -> None:
        while not stop.is_set() and time.monotonic() < t_end:
            samples.append((time.monotonic() - t_start, rss_mb(s.proc.pid), fds(s.proc.pid)))
            time.sleep(1)

    threads = [threading.Thread(target=f) for f in (predictor, churn, sampler)]
    for t in threads:
        t.start()
    kill_every = args.minutes * 60 / (args.kills + 1)
    kills = 0
    while time.monotonic() < t_end and kills < args.kills:
        time.sleep(min(kill_every, max(0, t_end - time.monotonic())))
        if time.monotonic() >= t_end:
            break
        rs.kill()  # kill -9
        kills += 1
        time.sleep(2)
        rs.start()
    for t in threads:
        t.join(timeout=args.minutes * 60 + 60)
    stop.set()
    time.sleep(3)
    # R3: every acknowledged upload is in the registry
    lost = []
    with httpx.Client(base_url=s.url, timeout=30) as c:
        for name, (version, sha) in acked.items():
            info = c.get(f"/tasks/{name}").json()
            if (info.get("version"), info.get("sha256")) != (version, sha):
                lost.append((name, version, info.get("version")))
    half = [x for x in samples if x[0] >= samples[-1][0] / 2] if samples else []
    summary = {
        "minutes": args.minutes,
        "redis_kills": kills,
        "acked_tasks_checked": len(acked),
        "lost_acknowledged": lost,
        **stats,
        "rss_mb_start": samples[0][1] if samples else None,
        "rss_mb_mid": half[0][1] if half else None,
        "rss_mb_end": samples[-1][1] if samples else None,
        "rss_growth_second_half_mb": round(half[-1][1] - half[0][1], 1) if half else None,
        "fd_min_max_second_half": [min(x[2] for x in half), max(x[2] for x in half)] if half else None,
    }
    servers.stop(s)
    rs.kill()
    failures = verdict(summary, args.max_rss_growth_mb, args.max_fd_drift)
    summary["build"] = "leaky" if args.leaky else "product"
    summary["failures"] = failures
    print(json.dumps(summary))
    return 1 if failures else 0


def verdict(summary: dict, max_growth_mb: float, max_fd_drift: int) -> list[str]:
    """The R3 and R7 goals; each miss is one line (an empty list is a pass)."""
    failures = []
    if summary["lost_acknowledged"]:
        failures.append(f"R3: {len(summary['lost_acknowledged'])} acknowledged uploads lost")
    if summary["predict_other"]:
        failures.append(f"predicts not 200: {summary['predict_other']}")
    growth = summary["rss_growth_second_half_mb"]
    if growth is None or growth > max_growth_mb:
        failures.append(f"R7: RSS grew {growth} MB in the second half (limit {max_growth_mb} MB)")
    fd = summary["fd_min_max_second_half"]
    if fd is None or fd[1] - fd[0] > max_fd_drift:
        failures.append(f"R7: open fds ranged {fd} in the second half (limit drift {max_fd_drift})")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
