"""S7 for scoped tokens, through real HTTP against one ``ssf-serve`` subprocess with stored tokens on:
forged, spliced, truncated, padded, revoked, expired and oddly presented tokens, tokens of the wrong role or
tenant, and hostile ``X-SSF-Priority`` values. Every one is refused with a 4xx whose JSON body names the
problem (never a 5xx), nothing is written to the store, and no token appears in the server's log."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import Server, start, stop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

IMAGE = encode("PNG", 0, (32, 32))


class World:
    def __init__(self, server: Server, root: Path) -> None:
        self.server, self.root = server, root
        self.http = httpx.Client(base_url=server.url, timeout=30)

    def token(self, role: str, tenant: str | None, ttl_s: float | None = None) -> dict:
        body = {"role": role, "tenant": tenant, "ttl_s": ttl_s}
        r = self.http.post("/tokens", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        return r.json()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hostile-tokens")
    root = tmp / "store"
    server = start(
        tmp, backbone_file("vit", tmp), str(root), token_secret="hostile-secret", log_level="debug"
    )
    w = World(server, root)
    try:
        for tenant in ("a", "b"):
            assert w.http.put(f"/tenants/{tenant}", json={"weight": 1}, headers=AUTH).status_code == 200
            files = {"delta": ("d", task_delta(f"{tenant}.cats", 1))}
            assert w.http.post("/tasks", files=files, headers=AUTH).status_code == 201
        yield w
    finally:
        w.http.close()
        stop(server)


def tree(path: Path) -> dict[str, str]:
    """The store's files and hashes, without logs (the audit log records refusals by design)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and "audit" not in p.name and not p.name.endswith(".log")
    }


def predict(w: World, task: str, headers: dict[str, str]) -> httpx.Response:
    return w.http.post(
        f"/tasks/{task}/predict", content=IMAGE, headers={"Content-Type": "image/png", **headers}
    )


def refused(r: httpx.Response, *statuses: int) -> None:
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("error"), dict) and body["error"].get("message"), body


def test_forged_and_misused_tokens_are_refused(world: World) -> None:
    w = world
    client_a = w.token("client", "a")["token"]
    client_b = w.token("client", "b")["token"]
    admin_a = w.token("admin", "a")["token"]
    revoked = w.token("client", "a")
    assert w.http.delete(f"/tokens/{revoked['id']}", headers=AUTH).status_code == 204
    expiring = w.token("client", "a", ttl_s=0.5)["token"]
    assert predict(w, "a.cats", {"Authorization": f"Bearer {client_a}"}).status_code == 200
    before = tree(w.root)
    time.sleep(0.6)  # the expiring token is past its expiry

    token_id, secret = client_a[4:20], client_a[21:]
    other_secret = client_b[21:]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    forged = {
        "random secret on a real id": f"ssf_{token_id}_{secrets.token_urlsafe(32)}",
        "one character changed": f"ssf_{token_id}_{flipped}",
        "a real id with another token's secret": f"ssf_{token_id}_{other_secret}",
        "truncated": client_a[:-1],
        "padded": client_a + "x",
        "upper-case id": f"ssf_{token_id.upper()}_{secret}",
        "unknown id": f"ssf_{'0' * 16}_{secret}",
        "revoked": revoked["token"],
        "expired": expiring,
        "the id alone": token_id,
        "the digest of nothing": hashlib.sha256(b"").hexdigest(),
        "4 KB": "ssf_" + "a" * 4096,
        "non-ASCII": f"ssf_{token_id}_{secret[:-1]}\xe9",
    }
    for name, token in forged.items():
        headers = {"Authorization": f"Bearer {token}".encode("latin-1")}
        r = w.http.post(
            "/tasks/a.cats/predict", content=IMAGE, headers={"Content-Type": "image/png", **headers}
        )
        refused(
            r, 401, 403
        )  # 401: no usable token; 403 invalid_token: a token that is not (or no longer) one
        r = w.http.post("/tasks", files={"delta": ("d", task_delta("a.dogs", 1))}, headers=headers)
        assert r.status_code in (401, 403), (name, r.status_code, r.text)

    presentations = {
        "no scheme": {"Authorization": client_a},
        "Basic scheme": {"Authorization": f"Basic {client_a}"},
        "empty Bearer": {"Authorization": "Bearer"},
        "in another header": {"X-Api-Key": client_a},
    }
    for name, headers in presentations.items():
        r = predict(w, "a.cats", headers)
        assert r.status_code in (401, 403), name
        refused(r, 401, 403)
    refused(w.http.post("/tasks/a.cats/predict", params={"token": client_a}, content=IMAGE,
                        headers={"Content-Type": "image/png"}), 401, 403)  # fmt: skip

    # real tokens, wrong scope
    refused(predict(w, "b.cats", {"Authorization": f"Bearer {client_a}"}), 403, 404)
    refused(predict(w, "b.cats", {"Authorization": f"Bearer {client_a}", "X-SSF-Tenant": "b"}), 403, 404)
    for token in (client_a, admin_a):
        auth = {"Authorization": f"Bearer {token}"}
        refused(w.http.post("/tokens", json={"role": "operator"}, headers=auth), 403)
        refused(w.http.post("/tokens", json={"role": "admin", "tenant": "b"}, headers=auth), 403)
        refused(w.http.put("/tenants/a", json={"weight": 100}, headers=auth), 403)
        refused(w.http.delete("/tasks/b.cats", headers=auth), 403, 404)
    refused(w.http.post("/tasks", files={"delta": ("d", task_delta("a.dogs", 1))},
                        headers={"Authorization": f"Bearer {client_a}"}), 403)  # fmt: skip
    refused(w.http.post("/tasks", files={"delta": ("d", task_delta("b.dogs", 1))},
                        headers={"Authorization": f"Bearer {admin_a}"}), 403)  # fmt: skip

    assert tree(w.root) == before  # nothing a refused call did reached the store
    log = w.server.logs()
    for token in [client_a, client_b, admin_a, revoked["token"], expiring, *forged.values()]:
        if len(token) > 20:
            assert token not in log, "a token reached the server's log"
    assert "Traceback" not in log


def test_hostile_priority_headers(world: World) -> None:
    auth = {"Authorization": f"Bearer {world.token('client', 'a')['token']}"}
    for value in ("batch", "BATCH", "Interactive"):
        r = predict(world, "a.cats", {**auth, "X-SSF-Priority": value})
        assert r.status_code == 200, (value, r.text)
    for value in ("urgent", "realtime", "interactive,batch", "0", "-1", "x" * 4096, "batch\t1"):
        r = predict(world, "a.cats", {**auth, "X-SSF-Priority": value})
        refused(r, 422)
    r = predict(world, "a.cats", {**auth, "X-SSF-Priority": "h\xe9h\xe9".encode("latin-1")})  # type: ignore[dict-item]
    refused(r, 422)
