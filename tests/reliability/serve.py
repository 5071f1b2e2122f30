"""Start ``python -m service.cli`` (what ssf-serve runs) with extra SSF_* settings; shared by the R tests and
the long tier."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.service.api import kit
from tests.service.api.test_e2e import ROOT, TOKEN, Server

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start(
    tmp: Path,
    weights: Path,
    store: str | None = None,
    port: int | None = None,
    wait_ready: bool = True,
    module: str = "service.cli",
    **settings: object,
) -> Server:
    port = port or free_port()
    log = tmp / f"server-{port}-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSF_")}
    env.update({"SSF_ADMIN_TOKEN": TOKEN, "SSF_DRAIN_DELAY_S": "0", "SSF_MAX_QUEUE_DELAY_MS": "1"})
    env.update({f"SSF_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [sys.executable, "-m", module, "--model", kit.MODEL, "--weights", str(weights)]
    cmd += ["--store", store or str(tmp / "store"), "--device", "cpu", "--port", str(port)]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ssf-serve exited {proc.returncode}:\n{server.logs()[-3000:]}")
        try:
            r = httpx.get(server.url + ("/readyz" if wait_ready else "/healthz"), timeout=1)
            if r.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"ssf-serve not up after 90 s:\n{server.logs()[-3000:]}")


def stop(server: Server, sig: int = signal.SIGTERM) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


def upload(url: str, data: bytes, replace: bool = False, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        url + "/tasks" + ("?replace=true" if replace else ""),
        headers=AUTH,
        files={"delta": ("d.safetensors", data)},
        timeout=timeout,
    )


def metric(url: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus sample (``name{labels...}``) from /metrics; 0 when absent."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total
