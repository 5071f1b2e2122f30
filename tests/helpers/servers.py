"""Real servers in subprocesses: ``python -m service.cli`` (what ``ssf-serve`` runs) with uvicorn on a free
loopback port, and redis-server (never fakeredis). Start, wait until ready, stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.api import AUTH, TOKEN
from tests.helpers.models import MODEL
from tests.helpers.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start(
    tmp: Path,
    weights: Path,
    store: str | None = None,
    *,
    port: int | None = None,
    wait_ready: bool = True,
    module: str = "service.cli",
    log_level: str | None = None,
    **settings: object,
) -> Server:
    """``module`` serving ``weights`` (a test_vit backbone) on ``store`` (default: a directory in ``tmp``),
    with the admin ``TOKEN``, no drain delay, a 1 ms batching delay, one torch thread and ``settings`` as
    ``SSF_*``; returns once ``/readyz`` (``/healthz`` with ``wait_ready=False``) answers 200."""
    port = port or free_port()
    log = tmp / f"server-{port}-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSF_")}
    env.update({"SSF_ADMIN_TOKEN": TOKEN, "SSF_DRAIN_DELAY_S": "0", "SSF_MAX_QUEUE_DELAY_MS": "1"})
    # tests run several servers (and their load) on this host's cores at once: one intra-op thread each, as
    # deploy/ gives replicas sharing a machine; torch's default (every core per process) lets the OpenMP
    # teams of two busy servers stall each other's barriers, delaying a replica's following by seconds
    env["SSF_TORCH_THREADS"] = "1"
    env.update({f"SSF_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [sys.executable, "-m", module, "--model", MODEL, "--weights", str(weights)]
    cmd += ["--store", store or str(tmp / "store"), "--device", "cpu", "--port", str(port)]
    cmd += ["--log-level", log_level] if log_level else []
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
    """``sig`` (a graceful drain by default), then kill after 30 s; the exit code."""
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


class RedisServer:
    """A redis-server process with AOF on, in its own directory; restartable to test outages."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server); CI provides it")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextmanager
def store_of(kind: str, tmp: Path, local: str | None = None) -> Iterator[str | None]:
    """The store a test server uses: ``local`` for ``kind == "local"`` (None: ``start``'s own directory),
    else the URL of a fresh ``redis-server`` in ``tmp``, killed when the block ends."""
    if kind == "local":
        yield local
        return
    redis = RedisServer(tmp)
    redis.start()
    try:
        yield redis.url
    finally:
        redis.kill()
