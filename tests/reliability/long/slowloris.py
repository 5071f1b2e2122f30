"""S5 (long tier, not collected): ``python -m tests.reliability.long.slowloris [--conns 50]``.

Opens N idle sockets and N sockets trickling a header at 1 B/s to nginx (deploy/topology.py) and the same to a
bare uvicorn replica port (the negative control), while a legitimate client predicts through nginx. Reports
how many attack sockets are still open after 6 s (nginx client_header_timeout 5 s + 1 s) and after 30 s (bare
uvicorn), and legitimate request status/latency during the attack. Bounded: 35 s of attack.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx

from deploy.topology import Topology
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file


def open_conns(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        out.append(s)
    return out


def still_open(socks: list[socket.socket]) -> int:
    alive = 0
    for s in socks:
        try:
            data = s.recv(4096)
            if data == b"":
                continue  # closed by the server (EOF)
            alive += 0  # the server answered (e.g. 408) and will close: count as handled
        except BlockingIOError:
            alive += 1
        except OSError:
            continue
    return alive


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ssf-slowloris-"))
    weights = backbone_file("vit", tmp)
    topo = Topology(tmp / "topo", weights, replicas=1)
    topo.start()
    try:
        img = encode("PNG", 3)
        r = httpx.post(
            f"{topo.url}/tasks",
            headers={"Authorization": f"Bearer {topo.admin_token}"},
            files={"delta": ("d.safetensors", task_delta("cats", 1))},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        uvicorn_port = int(topo.replica_url(0).rsplit(":", 1)[1])

        def legit(results: list, until: float) -> None:
            with httpx.Client(base_url=topo.url, timeout=30) as c:
                while time.monotonic() < until:
                    t0 = time.perf_counter()
                    code = c.post(
                        "/tasks/cats/predict", content=img, headers={"Content-Type": "image/png"}
                    ).status_code
                    results.append((code, time.perf_counter() - t0))
                    time.sleep(0.05)

        base: list = []
        legit(base, time.monotonic() + 3)
        targets = {"nginx": topo.nginx_port, "uvicorn": uvicorn_port}
        idle = {k: open_conns(p, args.conns) for k, p in targets.items()}
        trickle = {k: open_conns(p, args.conns) for k, p in targets.items()}
        during: list = []
        t = threading.Thread(target=legit, args=(during, time.monotonic() + 30))
        t.start()
        t0 = time.monotonic()
        report = {}
        header = b"POST /tasks/cats/predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        i = 0
        while time.monotonic() - t0 < 31:
            for socks in trickle.values():
                for s in socks:
                    try:
                        s.send(header[i % len(header) : i % len(header) + 1])
                    except OSError:
                        pass
            i += 1
            el = time.monotonic() - t0
            if "at_6s" not in report and el >= 6:
                report["at_6s"] = {
                    k: {"idle": still_open(idle[k]), "trickle": still_open(trickle[k])} for k in targets
                }
            time.sleep(1)
        report["at_30s"] = {
            k: {"idle": still_open(idle[k]), "trickle": still_open(trickle[k])} for k in targets
        }
        t.join(timeout=40)

        def p99(xs: list) -> float:
            ys = sorted(d for _, d in xs)
            return ys[max(0, int(len(ys) * 0.99) - 1)] if ys else 0.0

        report["conns_per_kind"] = args.conns
        report["legit_baseline_p99_ms"] = round(p99(base) * 1000, 1)
        report["legit_during_p99_ms"] = round(p99(during) * 1000, 1)
        report["legit_during_statuses"] = sorted({c for c, _ in during})
        report["legit_during_non200"] = sum(1 for c, _ in during if c != 200)
        print(json.dumps(report))
    finally:
        topo.stop()


if __name__ == "__main__":
    main()
