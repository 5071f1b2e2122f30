"""End to end: ``python -m service.cli`` (what the ``ssf-serve`` script runs) in a subprocess with uvicorn
on a free loopback port, a tiny random backbone, a local store directory, deltas from the ssf core and
Pillow images. Also: JSON logs without the token, and a graceful drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import service.store
from service.client import Client, SSFError
from tests.helpers.api import TOKEN
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import MODEL, backbone_file
from tests.helpers.ports import free_port
from tests.helpers.servers import ROOT, RedisServer, Server, start, stop

pytestmark = [
    pytest.mark.e2e,
    # Runs as soon as the store lands (service.store.open_store); until then it says why it cannot.
    pytest.mark.skipif(
        not hasattr(service.store, "open_store"), reason="service.store.open_store is missing"
    ),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("e2e-backbone"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[Server]:
    s = start(tmp_path_factory.mktemp("e2e"), weights, log_level="debug")
    yield s
    stop(s)


def test_upload_predict_replace_delete(server: Server, weights: Path) -> None:
    images = [encode("PNG", 1), encode("JPEG", 2)]
    with Client(server.url, token=TOKEN) as c:
        assert c.backbone()["model"] == MODEL
        info = c.upload(task_delta("cats", 1))
        assert (info["name"], info["version"], info["num_classes"]) == ("cats", 1, 4)
        v1 = c.predict("cats", images, top_k=2)
        assert v1["version"] == 1 and [len(p) for p in v1["predictions"]] == [2, 2]
        assert c.upload(task_delta("cats", 2), replace=True)["version"] == 2
        v2 = c.predict("cats", images, top_k=2)
        assert v2["version"] == 2 and v2["predictions"] != v1["predictions"]
        raw = httpx.post(
            f"{server.url}/tasks/cats/predict", content=images[1], headers={"Content-Type": "image/jpeg"}
        )
        assert raw.status_code == 200 and raw.json()["version"] == 2
        assert [t["name"] for t in c.list()] == ["cats"]
        c.delete("cats")
        with pytest.raises(SSFError) as e:
            c.predict("cats", images)
        assert e.value.status == 404
        with pytest.raises(SSFError) as e:
            c.get("cats")
        assert e.value.status == 404


def test_limits_and_auth_over_real_http(server: Server) -> None:
    r = httpx.post(
        f"{server.url}/tasks/x/predict",
        content=b"\x00" * (9 * 1024 * 1024),
        headers={"Content-Type": "image/png"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunked() -> Iterator[bytes]:
        for _ in range(200):
            yield b"\x00" * 65536

    r = httpx.post(f"{server.url}/tasks/x/predict", content=chunked(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413
    assert httpx.delete(f"{server.url}/tasks/x").status_code == 401
    assert httpx.delete(f"{server.url}/tasks/x", headers={"Authorization": "Bearer no"}).status_code == 403
    assert "ssf_http_request_duration_seconds" in httpx.get(f"{server.url}/metrics").text


def test_logs_are_json_and_never_hold_the_token(server: Server) -> None:
    httpx.get(f"{server.url}/healthz")
    for _ in range(50):  # the access line is written just after the response is sent
        if '"route": "/healthz"' in server.logs():
            break
        time.sleep(0.05)
    lines = [line for line in server.logs().splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)  # every line one JSON object
    assert TOKEN not in server.logs()
    assert any('"route": "/healthz"' in line for line in lines)


def test_sigterm_drains(tmp_path: Path, weights: Path) -> None:
    """Readiness turns 503 at once; an in-flight request started before SIGTERM still succeeds."""
    server = start(tmp_path, weights, drain_delay_s=1.0, log_level="debug")
    try:
        with Client(server.url, token=TOKEN) as c:
            c.upload(task_delta("cats", 1))
        result: dict[str, int] = {}
        png = encode("PNG", 7)

        def slow_body() -> Iterator[bytes]:
            for i in range(0, len(png), max(1, len(png) // 8)):
                time.sleep(0.25)
                yield png[i : i + max(1, len(png) // 8)]

        def in_flight() -> None:
            r = httpx.post(
                f"{server.url}/tasks/cats/predict",
                content=slow_body(),
                headers={"Content-Type": "image/png"},
                timeout=30,
            )
            result["status"] = r.status_code

        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(0.4)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{server.url}/readyz").status_code == 503  # still listening, not ready
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        t.join(30)
        assert result.get("status") == 200
        server.proc.wait(timeout=30)
        assert '"draining: readiness is now 503"' in server.logs() or "draining" in server.logs()
    finally:
        stop(server)


def test_weights_that_do_not_fit_end_with_one_line(tmp_path: Path) -> None:
    import safetensors.torch
    import torch

    bad = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"not.a.vit.weight": torch.zeros(3)}, str(bad))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSF_")}
    cmd = [sys.executable, "-m", "service.cli", "--model", MODEL, "--weights", str(bad)]
    cmd += ["--store", str(tmp_path / "store"), "--device", "cpu", "--port", str(free_port())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ssf-serve: error: the engine could not start: ") and "do not fit" in last
    assert "Traceback" not in r.stderr


@pytest.mark.redis
def test_redis_store_round_trip(tmp_path: Path, weights: Path, redis_server: RedisServer) -> None:
    """The same flow with --store redis://: two replicas on one registry see each other's uploads."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start(tmp_path / "a", weights, store=redis_server.url, log_level="debug")
    b = start(tmp_path / "b", weights, store=redis_server.url, log_level="debug")
    try:
        with Client(a.url, token=TOKEN) as ca, Client(b.url, token=TOKEN) as cb:
            assert ca.upload(task_delta("cats", 1))["version"] == 1
            assert cb.predict("cats", [encode("PNG", 1)])["version"] == 1
            assert cb.upload(task_delta("cats", 2), replace=True)["version"] == 2
            deadline = time.monotonic() + 10
            while ca.predict("cats", [encode("PNG", 1)])["version"] != 2:
                assert time.monotonic() < deadline, "replica a never saw version 2"
                time.sleep(0.1)
            ca.delete("cats")
            with pytest.raises(SSFError) as e:
                cb.get("cats")
            assert e.value.status == 404
    finally:
        stop(a)
        stop(b)
