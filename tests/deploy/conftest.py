"""Fixtures for the scale-out tests: the compose topology as processes (deploy/topology.py) on loopback,
a tiny random test_vit backbone, and a bounded load driver that records every answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deploy.topology import Topology, interrupt_on_sigterm
from tests.service.api import kit

TOKEN = "deploy-e2e-token-8c1f2a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="package", autouse=True)
def _teardown_on_sigterm() -> None:
    # a cancelled CI job (SIGTERM) still runs the fixtures' teardown: no servers are left behind
    interrupt_on_sigterm()


@pytest.fixture(scope="package")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kit.backbone_file(tmp_path_factory.mktemp("deploy-backbone"))


def open_topology(tmp: Path, weights: Path) -> Topology:
    # reconcile-driven behaviour is what we test: no batching delay, a short drain
    env = {"SSF_MAX_QUEUE_DELAY_MS": "1", "SSF_DRAIN_DELAY_S": "1", "SSF_GRACEFUL_TIMEOUT_S": "10"}
    return Topology(tmp, weights, kit.MODEL, replicas=2, admin_token=TOKEN, replica_env=env)


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[Topology]:
    t = open_topology(tmp_path_factory.mktemp("topology"), weights)
    with t:
        yield t


def upload(base: str, delta: bytes, replace: bool = False, timeout_s: float = 10.0) -> httpx.Response:
    return httpx.post(
        f"{base}/tasks",
        files={"delta": ("delta.safetensors", delta)},
        params={"replace": "true"} if replace else None,
        headers=AUTH,
        timeout=timeout_s,
    )


PNG = kit.image("PNG", 11)


def predict(http: httpx.Client, base: str, task: str) -> httpx.Response:
    return http.post(f"{base}/tasks/{task}/predict", files={"image": ("x.png", PNG)}, params={"top_k": 4})


@dataclass
class Answer:
    started: float
    ended: float
    source: str
    task: str
    status: int  # 0: no HTTP answer at all (connection error)
    version: int | None
    scores: tuple[tuple[int, float], ...]


class Load:
    """Threads that predict in a loop until stopped, bounded by ``max_s`` and ``max_requests`` each."""

    def __init__(self, targets: list[tuple[str, str]], max_s: float = 60.0, max_requests: int = 20_000):
        self.targets, self.max_s, self.max_requests = targets, max_s, max_requests
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in targets]

    def _run(self, target: tuple[str, str]) -> None:
        base, task = target
        deadline = time.monotonic() + self.max_s
        with httpx.Client(timeout=15) as http:
            for _ in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                t0 = time.monotonic()
                try:
                    r = predict(http, base, task)
                    status = r.status_code
                    body = r.json() if status == 200 else {}
                except httpx.HTTPError:
                    status, body = 0, {}
                scores = tuple((p["index"], p["score"]) for p in body.get("predictions", [[]])[0])
                with self._lock:
                    self.answers.append(
                        Answer(t0, time.monotonic(), base, task, status, body.get("version"), scores)
                    )

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)
