"""The authorization matrix, generated from the route table (``service.api.auth.ROUTES``): every route x
every kind of caller x the caller's own task, another tenant's, and one shared with it, through real HTTP
(uvicorn in a subprocess) on both stores (a directory and a real redis-server). Each answer must be the
status docs/multi-team.md documents, and nothing a refused or tenant-scoped call does may change another
tenant's tasks, or any tenant or token record when it is refused (store snapshots before and after)."""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.api.auth import ROUTES, Perm
from service.settings import Settings
from service.store import open_store
from service.tenants.backends import open_backend
from tests.helpers.api import TOKEN
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import Server, stop, store_of
from tests.helpers.tenants import (
    GLOBAL_CLIENT,
    bearer,
    create_token,
    put_tenant,
    revoke,
    start_tenant_server,
    upload_as,
)

pytestmark = pytest.mark.e2e

OWN, OTHER, SHARED = "alpha.t", "beta.t", "beta.s"
TARGETS = {"own": OWN, "other": OTHER, "shared": SHARED}
PNG = encode("PNG", 3)
DELTA = task_delta("x", 1)
INFER = {
    "inputs": [
        {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(PNG).decode()]}
    ]
}

# docs/multi-team.md, "Who may do what": the status of each permission for each caller and task.
CALLERS = [
    "none",
    "wrong",
    "forged",
    "expired",
    "revoked",
    "admin_token",
    "operator",
    "global_client",
    "alpha_admin",
    "alpha_client",
]


def expected(perm: Perm, caller: str, target: str | None, ok: int | None) -> tuple[int | None, str | None]:
    if perm == Perm.PUBLIC:
        return ok, None
    if caller == "none":
        return 401, "missing_token"
    if caller in ("wrong", "forged", "revoked"):
        return 403, "invalid_token"
    if caller == "expired":
        return 403, "token_expired"
    if caller in ("admin_token", "operator"):
        return ok, None
    allowed = {
        Perm.PREDICT: caller == "global_client" or target in ("own", "shared"),
        Perm.TASK_ADMIN: caller == "alpha_admin" and target == "own",
        Perm.UPLOAD: caller == "alpha_admin" and target == "own",
        Perm.OPERATOR: False,
    }[perm]
    return (ok, None) if allowed else (403, "forbidden")


class World:
    """One server, its store, and a token for every kind of caller."""

    def __init__(self, server: Server, store: str) -> None:
        self.server, self.url, self.store = server, server.url, store
        self.tokens: dict[str, str | None] = {}

    def setup(self) -> None:
        put_tenant(self.url, "alpha")
        put_tenant(self.url, "beta", shares={SHARED: ["alpha"]})
        for task in TARGETS.values():
            self.ensure(task)
        _, alpha_admin = create_token(self.url, "admin", "alpha")
        _, alpha_client = create_token(self.url, "client", "alpha")
        _, operator = create_token(self.url, "operator")
        _, expired = create_token(self.url, "client", "alpha", ttl_s=0.5)
        revoked_id, revoked = create_token(self.url, "admin", "alpha")
        revoke(self.url, revoked_id)
        forged = f"ssf_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
        self.tokens = {
            "none": None,
            "wrong": "not-a-token",
            "forged": forged,
            "expired": expired,
            "revoked": revoked,
            "admin_token": TOKEN,
            "operator": operator,
            "global_client": GLOBAL_CLIENT,
            "alpha_admin": alpha_admin,
            "alpha_client": alpha_client,
        }
        time.sleep(0.6)  # the expired token's 0.5 s

    def ensure(self, task: str) -> None:
        if httpx.get(f"{self.url}/tasks/{task}", timeout=10).status_code == 404:
            r = upload_as(self.url, TOKEN, DELTA, task)
            assert r.status_code == 201, r.text

    def snapshot(self) -> dict[str, Any]:
        tasks = open_store(self.store)
        backend = open_backend(self.store)
        try:
            tenants, tokens = backend.load()
            return {
                "tasks": {t.name: (t.version, t.sha256) for t in tasks.list()},
                "tenants": {k: v.to_json() for k, v in tenants.items()},
                "tokens": sorted(tokens),
            }
        finally:
            tasks.close()
            backend.close()


# route -> (request for a task name, success status, setup before the call)
Request = tuple[str, str, dict[str, Any]]


def request_for(world: World, method: str, template: str, task: str) -> tuple[Request, int | None]:
    """The request and its status once authorized; None: a route this matrix has no valid request for
    (added by another part of the product): then only "not 401/403" is checked, and the snapshots."""
    url = world.url + template.replace("{name}", task)
    if "{version}" in url:
        current = httpx.get(f"{world.url}/tasks/{task}", timeout=10).json()["version"]
        url = url.replace("{version}", str(current))
    if (method, template) not in KNOWN:
        return (method, re.sub(r"\{[a-z_]+\}", "0" * 16, url), {}), None
    if template == "/tasks" and method == "POST":
        files = {"delta": ("d.safetensors", DELTA)}
        return (method, url + "?replace=true", {"files": files, "data": {"name": task}}), 201
    if template.endswith("/predict"):
        return (method, url, {"content": PNG, "headers": {"Content-Type": "image/png"}}), 200
    if template.endswith("/infer"):
        return (method, url, {"json": INFER}), 200
    if template.endswith("/evaluate"):
        files = [("image", ("0.png", PNG))]
        return (method, url, {"files": files, "data": {"label": "x-class0"}}), 200
    if template.endswith("/evaluations/{job_id}"):  # no such job: a caller allowed in reaches the lookup
        return (method, url.replace("{job_id}", "0" * 16), {}), 404
    if template == "/tokens" and method == "POST":
        return (method, url, {"json": {"role": "client", "tenant": "alpha"}}), 201
    if template == "/tokens/{token_id}":
        token_id, _ = create_token(world.url, "client", "beta")
        return (method, url.replace("{token_id}", token_id), {}), 204
    if template == "/tenants/{tenant}":
        if method == "DELETE":
            put_tenant(world.url, "gamma")
            return (method, url.replace("{tenant}", "gamma"), {}), 204
        return (method, url.replace("{tenant}", "gamma"), {"json": {"weight": 2}}), 200
    if method == "DELETE":
        world.ensure(task)
        return (method, url, {}), 204
    return (method, url, {}), 200


KNOWN = {
    (m, p)
    for m, p in ROUTES
    if not p.startswith("/tasks/{name}/")
    or p.endswith(("/predict", "/model.onnx"))
    or p in ("/tasks/{name}",)
}


@pytest.fixture(scope="module", params=["local", "redis"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"matrix-{request.param}")
    weights = backbone_file("vit", tmp)
    with store_of(request.param, tmp, str(tmp / "store")) as store:
        assert store is not None
        server = start_tenant_server(tmp, weights, store, client_tokens=GLOBAL_CLIENT)
        try:
            w = World(server, store)
            w.setup()
            yield w
        finally:
            stop(server)


def app_routes() -> set[tuple[str, str]]:
    """Every route the app serves, those left out of the OpenAPI schema too (the console's files)."""
    from fastapi.routing import APIRoute

    def walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
        for route in routes:
            if isinstance(route, APIRoute):
                yield from ((m.upper(), prefix + route.path) for m in route.methods)
            elif hasattr(route, "original_router"):  # newer FastAPI keeps included routers as entries
                ctx = getattr(route, "include_context", None)
                yield from walk(route.original_router.routes, prefix + (getattr(ctx, "prefix", "") or ""))

    app = create_app(Settings(model="test_vit"))
    schema = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    return schema | set(walk(app.routes))


def test_the_route_table_names_every_route() -> None:
    missing = app_routes() - set(ROUTES)
    assert not missing, f"routes without a permission in service/api/auth.py ROUTES: {sorted(missing)}"


@pytest.mark.parametrize(("method", "template"), sorted(ROUTES), ids=[f"{m} {p}" for m, p in sorted(ROUTES)])
def test_matrix(world: World, method: str, template: str) -> None:
    perm = ROUTES[(method, template)]
    targets = TARGETS if "{name}" in template or perm == Perm.UPLOAD else {None: OWN}
    wrong: list[str] = []
    for target, task in targets.items():
        for caller in CALLERS:
            (verb, url, kwargs), ok = request_for(world, method, template, task)
            want, code = expected(perm, caller, target, ok)
            writes = method not in ("GET", "HEAD")  # reads cannot write (test_auth.py: no hidden writes)
            before = world.snapshot() if writes else None
            headers = {**kwargs.pop("headers", {}), **bearer(world.tokens[caller])}
            r = httpx.request(verb, url, headers=headers, timeout=60, **kwargs)
            after = world.snapshot() if writes else None
            error = r.json().get("error") if r.status_code >= 400 else None
            got_code = error.get("code") if isinstance(error, dict) else code  # /v2: {"error": "message"}
            if want is None:
                if r.status_code in (401, 403):
                    wrong.append(f"{caller} on {target}: {r.status_code} {r.text[:120]} (want authorized)")
            elif r.status_code != want or (code is not None and got_code != code):
                wrong.append(f"{caller} on {target}: {r.status_code} {r.text[:120]} (want {want} {code})")
            if before is None or after is None:
                continue
            if r.status_code >= 400:  # refused: nothing at all changed
                if before != after:
                    wrong.append(f"{caller} on {target}: refused but the store changed")
            elif caller.startswith("alpha"):  # a tenant's call never touches another tenant's tasks
                theirs = [
                    {k: v for k, v in snap["tasks"].items() if not k.startswith("alpha.")}
                    for snap in (before, after)
                ]
                if theirs[0] != theirs[1]:
                    wrong.append(f"{caller} on {target}: another tenant's tasks changed")
    assert not wrong, "\n".join(wrong)


def test_refused_calls_never_reach_the_task(world: World) -> None:
    """The other tenant's admin cannot delete, replace or download a task even by naming it in the form."""
    token = world.tokens["alpha_admin"]
    before = world.snapshot()
    r = upload_as(world.url, token, task_delta(OTHER, 2), "")  # the name comes from inside the delta
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert world.snapshot() == before
