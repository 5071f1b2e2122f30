"""A bounded load driver for servers behind a balancer: threads that predict in a loop and record every
answer (status, version, scores), for tests that fail replicas or Redis under load."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx

from tests.helpers.images import encode

PNG = encode("PNG", 11)


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
