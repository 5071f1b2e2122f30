"""Tenant tokens and quotas through real HTTP: tokens only as HMACs at rest, never in a log line, never
listed; revocation and expiry; a revocation reaches another replica within SSF_TENANT_REFRESH_S; storage
and image quotas name the quota; priorities are checked; per-tenant metrics."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers.api import AUTH, TOKEN
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import RedisServer, Server, metric, stop
from tests.helpers.tenants import (
    GLOBAL_CLIENT,
    SECRET,
    bearer,
    create_token,
    put_tenant,
    revoke,
    start_tenant_server,
    upload_as,
)

pytestmark = pytest.mark.e2e

PNG = encode("PNG", 7, (32, 32))
RAW = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("tenants-backbone"))


@pytest.fixture
def replicas(tmp_path: Path, weights: Path, redis_server: RedisServer) -> Iterator[list[Server]]:
    servers = [
        start_tenant_server(
            tmp_path, weights, redis_server.url, client_tokens=GLOBAL_CLIENT, log_level="debug"
        )
        for _ in range(2)
    ]
    try:
        yield servers
    finally:
        for s in servers:
            stop(s)


def predict(url: str, token: str | None, task: str = "t.cats", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/tasks/{task}/predict", content=PNG, headers={**RAW, **bearer(token), **headers}, timeout=30
    )


def test_tokens_at_rest_in_logs_and_across_replicas(
    replicas: list[Server], redis_server: RedisServer
) -> None:
    a, b = replicas
    put_tenant(a.url, "t")
    assert upload_as(a.url, TOKEN, task_delta("t.cats", 1), "t.cats").status_code == 201
    client_id, client = create_token(a.url, "client", "t", description="ci")
    admin_id, admin = create_token(a.url, "admin", "t")
    time.sleep(0.6)  # SSF_TENANT_REFRESH_S is 0.2 in these servers
    for server in (a, b):
        assert predict(server.url, client).status_code == 200
    assert upload_as(b.url, admin, task_delta("t.cats", 2), "t.cats").status_code == 201

    # at rest: only HMAC-SHA256(secret, token), no token string anywhere in Redis
    r = redis.Redis.from_url(redis_server.url)
    dump = b"".join(r.dump(k) or b"" for k in r.keys("*"))
    stored = json.loads(r.hget("ssf:tokens", client_id) or b"{}")
    assert stored["digest"] == hmac.new(SECRET.encode(), client.encode(), hashlib.sha256).hexdigest()
    for token in (client, admin, TOKEN, GLOBAL_CLIENT):
        assert token.encode() not in dump

    # listed without the token or its hash
    listed = httpx.get(f"{a.url}/tokens", headers=AUTH, timeout=10)
    assert listed.status_code == 200 and {t["id"] for t in listed.json()["tokens"]} >= {client_id, admin_id}
    assert client not in listed.text and stored["digest"] not in listed.text

    # revocation: at once on the replica that served it, within the refresh bound on the other
    revoke(a.url, client_id)
    assert predict(a.url, client).json()["error"]["code"] == "invalid_token"
    deadline = time.monotonic() + 1.0  # 5 x SSF_TENANT_REFRESH_S
    while predict(b.url, client).status_code == 200:
        assert time.monotonic() < deadline, "revocation did not reach the other replica within 1 s"
        time.sleep(0.05)
    assert predict(b.url, client).json()["error"]["code"] == "invalid_token"

    # expiry
    _, short = create_token(a.url, "client", "t", ttl_s=0.3)
    assert predict(a.url, short).status_code == 200
    time.sleep(0.4)
    assert predict(a.url, short).json()["error"]["code"] == "token_expired"

    # every log line of both servers (debug level), and no token string in any of them
    predict(a.url, "ssf_0123456789abcdef_" + "x" * 43)
    for server in (a, b):
        logs = server.logs()
        assert '"audit"' in logs or "audit" in logs
        for token in (client, admin, short, TOKEN, GLOBAL_CLIENT):
            assert token not in logs, f"a token appeared in {server.url}'s log"
        assert stored["digest"] not in logs


def test_quotas_priorities_and_metrics(tmp_path: Path, weights: Path) -> None:
    server = start_tenant_server(tmp_path, weights)
    try:
        url = server.url
        put_tenant(url, "s", quotas={"max_tasks": 1, "images_per_s": 2})
        _, admin = create_token(url, "admin", "s")
        delta = task_delta("s.one", 1)
        assert upload_as(url, admin, delta, "s.one").status_code == 201
        assert upload_as(url, admin, delta, "s.one").status_code == 201  # a replace is not a new task
        r = upload_as(url, admin, delta, "s.two")
        assert r.status_code == 403 and r.json()["error"]["code"] == "quota_exceeded", r.text
        assert "max_tasks" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/tasks/s.two", timeout=10).status_code == 404

        put_tenant(url, "s", quotas={"max_bytes": len(delta) + 10})
        time.sleep(0.1)
        r = upload_as(url, TOKEN, task_delta("s.two", 2), "s.two")  # the operator's uploads count too
        assert r.status_code == 403 and "max_bytes" in r.json()["error"]["message"], r.text

        put_tenant(url, "s", quotas={"images_per_s": 2})
        four = [("image", (f"{i}.png", PNG)) for i in range(4)]
        first = httpx.post(f"{url}/tasks/s.one/predict", files=four, headers=bearer(admin), timeout=30)
        assert first.status_code == 200, first.text  # admitted, then charged 4 images: 1 s of debt
        second = predict(url, admin, "s.one")
        assert second.status_code == 429 and "images_per_s" in second.json()["error"]["message"]
        assert int(second.headers["retry-after"]) >= 1
        time.sleep(2.0)  # the debt: 4 images less the 1-image bucket, at 2 images/s
        assert predict(url, admin, "s.one").status_code == 200

        assert predict(url, admin, "s.one", **{"X-SSF-Priority": "batch"}).status_code in (200, 429)
        bad = predict(url, admin, "s.one", **{"X-SSF-Priority": "urgent"})
        assert bad.status_code == 422 and "X-SSF-Priority" in bad.json()["error"]["message"]

        assert metric(url, "ssf_tenant_images_total", 'tenant="s"') >= 4
        assert metric(url, "ssf_tenant_refusals_total", 'quota="images_per_s"') >= 1
    finally:
        stop(server)
