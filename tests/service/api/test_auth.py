"""S7: every admin operation, enumerated from the app's own OpenAPI document (so a new route is covered
the day it is added), refuses a missing, empty, malformed or wrong token; the token is never logged."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import ROUTES, Perm
from tests.helpers.api import AUTH, TOKEN, assert_error, make_settings
from tests.helpers.engines import FakeEngine, fake_delta
from tests.helpers.images import png

# Routes anyone may call even though they are not GETs; everything else that writes is admin.
PUBLIC_WRITES = {
    ("post", "/tasks/{name}/predict"),
    ("post", "/v2/models/{name}/infer"),  # the Open Inference Protocol's predict
    ("post", "/v2/models/{name}/versions/{version}/infer"),
}
# reads that need a token: every GET the route table (service/api/auth.py ROUTES) does not make public
ADMIN_READS = {(m.lower(), p) for (m, p), perm in ROUTES.items() if m == "GET" and perm != Perm.PUBLIC}


ORIGINAL = {
    "/tasks",
    "/tasks/{name}",
    "/tasks/{name}/model.onnx",
}  # this test builds valid requests for these


def operations() -> list[tuple[str, str, bool]]:
    spec = create_app(make_settings(), engine=FakeEngine()).openapi()
    out = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            out.append((method, path, bool(op.get("security"))))
    return out


OPERATIONS = operations()
ADMIN_OPS = [(m, p) for m, p, secured in OPERATIONS if secured]


def test_admin_set_is_what_the_contract_says() -> None:
    for method, path, secured in OPERATIONS:
        must_be_admin = (method != "get" and (method, path) not in PUBLIC_WRITES) or (
            method,
            path,
        ) in ADMIN_READS
        assert secured == must_be_admin, f"{method.upper()} {path}: admin={secured}"
    assert len(ADMIN_OPS) >= 3


BAD_HEADERS = [
    ({}, 401, "missing_token"),
    ({"Authorization": ""}, 401, "missing_token"),
    ({"Authorization": "Bearer"}, 401, "missing_token"),
    ({"Authorization": "Bearer    "}, 401, "missing_token"),
    ({"Authorization": f"Basic {TOKEN}"}, 401, "missing_token"),
    ({"Authorization": "Bearer wrong-token"}, 403, "invalid_token"),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403, "invalid_token"),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403, "invalid_token"),
    ({"Authorization": "Bearer \u00e9\u00e9".encode("latin-1")}, 403, "invalid_token"),
]


def _request(client: TestClient, method: str, path: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    url = path.replace("{name}", "cats").replace("{tenant}", "team").replace("{token_id}", "0" * 16)
    if path.startswith("/tokens") and method == "post":  # no SSF_TOKEN_SECRET here: 422 once authorized
        return client.post(url, headers=headers, json={"role": "operator"})
    if path.startswith("/tenants/") and method == "put":  # an invalid weight: nothing is written
        return client.put(url, headers=headers, json={"weight": -1})
    files = {"delta": ("d", fake_delta("cats"))} if method == "post" else None
    return client.request(method.upper(), url, headers=headers, files=files)


@pytest.mark.parametrize(("method", "path"), ADMIN_OPS, ids=[f"{m} {p}" for m, p in ADMIN_OPS])
@pytest.mark.parametrize(("headers", "status", "code"), BAD_HEADERS)
def test_admin_routes_refuse_bad_tokens(
    with_task: TestClient, engine: FakeEngine, method: str, path: str, headers: dict, status: int, code: str
) -> None:
    before = dict(engine.tasks)
    r = _request(with_task, method, path, headers)
    assert_error(r, status, code)
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert engine.tasks == before  # nothing changed


@pytest.mark.parametrize(("method", "path"), ADMIN_OPS, ids=[f"{m} {p}" for m, p in ADMIN_OPS])
def test_admin_routes_accept_the_token(with_task: TestClient, method: str, path: str) -> None:
    r = _request(with_task, method, path + ("?replace=true" if method == "post" else ""), AUTH)
    if path not in ORIGINAL:  # newer routes have their own tests: here only "the token is accepted"
        assert r.status_code not in (401, 403), r.text
        return
    assert r.status_code < 300, r.text


@pytest.mark.parametrize(("method", "path"), ADMIN_OPS, ids=[f"{m} {p}" for m, p in ADMIN_OPS])
def test_admin_plane_off_without_a_configured_token(method: str, path: str) -> None:
    app = create_app(make_settings(admin_token=None), engine=FakeEngine())
    with TestClient(app, raise_server_exceptions=False) as c:
        for headers in ({}, AUTH):
            assert_error(_request(c, method, path, headers), 403, "admin_disabled")


def test_token_never_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client.post("/tasks", files={"delta": ("d", fake_delta())}, headers=AUTH)
    client.delete("/tasks/nope", headers={"Authorization": f"Bearer {TOKEN}-wrong"})
    client.get("/tasks/cats/model.onnx", headers=AUTH)
    assert caplog.records
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in repr(record.__dict__)
    assert TOKEN not in repr(make_settings())


def test_predict_is_open_without_client_tokens(with_task: TestClient) -> None:
    r = with_task.post("/tasks/cats/predict", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200


def test_client_tokens_guard_predict_only() -> None:
    engine = FakeEngine()
    app = create_app(make_settings(client_tokens="alpha-1, beta-2"), engine=engine)
    raw = {"Content-Type": "image/png"}
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/tasks", files={"delta": ("d", fake_delta("cats"))}, headers=AUTH).status_code == 201
        assert_error(c.post("/tasks/cats/predict", content=png(), headers=raw), 401, "missing_token")
        bad = {**raw, "Authorization": "Bearer gamma"}
        assert_error(c.post("/tasks/cats/predict", content=png(), headers=bad), 403, "invalid_token")
        for token in ("alpha-1", "beta-2", TOKEN):
            ok = {**raw, "Authorization": f"Bearer {token}"}
            assert c.post("/tasks/cats/predict", content=png(), headers=ok).status_code == 200
        assert c.get("/tasks").status_code == 200  # reads stay open
        assert c.get("/livez").status_code == 200
        spec = c.get("/openapi.json").json()
        assert spec["paths"]["/tasks/{name}/predict"]["post"]["security"]


def _all_routes(routes: list) -> list:  # type: ignore[type-arg]
    """Every route of the app, through FastAPI's included-router wrappers."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        out.extend(_all_routes(inner.routes) if inner is not None else [r])
    return out


def test_no_hidden_route_writes() -> None:
    """Routes left out of the OpenAPI document (so of the matrix above) may only read."""
    app = create_app(make_settings(), engine=FakeEngine())
    documented = {(m, p) for m, p, _ in OPERATIONS}
    routes = _all_routes(app.routes)
    assert any(getattr(r, "path", "") == "/tasks/{name}/predict" for r in routes)
    for r in routes:
        for method in getattr(r, "methods", None) or ():
            if (method.lower(), r.path) not in documented:
                assert method in ("GET", "HEAD"), f"{method} {r.path} is not in the auth matrix"
