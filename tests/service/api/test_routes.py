"""Every route of docs/api.md against a fake engine: success bodies, and every status code it lists."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.errors import STATUS
from service.engine import protocol as p
from service.store.base import InvalidTaskName
from tests.helpers.api import AUTH, assert_error, make_settings
from tests.helpers.engines import JPEG, FakeEngine, fake_delta
from tests.helpers.images import png

TASK_KEYS = {
    "name",
    "version",
    "sha256",
    "num_classes",
    "labels",
    "method",
    "site_scheme",
    "backbone_fingerprint",
    "size_bytes",
    "created_at",
    "metrics",
    "shadow",  # null unless the task has a staged version under shadow traffic
    "staged_version",  # null unless the task has a staged version
}


def upload(client: TestClient, data: bytes, replace: bool = False, **form: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/tasks",
        params={"replace": "true"} if replace else None,
        files={"delta": ("delta.safetensors", data)},
        data=form or None,
        headers=AUTH,
    )


def test_health_ready_backbone(client: TestClient, engine: FakeEngine) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert engine.started
    body = client.get("/backbone").json()
    assert set(body) == {"model", "fingerprint", "input_size", "site_scheme", "backend", "device", "dtype"}


def test_upload_list_get_replace_delete(client: TestClient) -> None:
    r = upload(client, fake_delta("cats"))
    assert r.status_code == 201 and r.headers["location"] == "/tasks/cats"
    info = r.json()
    assert set(info) == TASK_KEYS
    assert info["name"] == "cats" and info["version"] == 1 and info["num_classes"] == 3
    assert_error(upload(client, fake_delta("cats")), 409, "task_exists")
    assert upload(client, fake_delta("cats"), replace=True).json()["version"] == 2
    assert upload(client, fake_delta("cats"), name="dogs").json()["name"] == "dogs"
    assert upload(client, fake_delta("birds"), name="").json()["name"] == "birds"
    assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["birds", "cats", "dogs"]
    assert client.get("/tasks/cats").json()["version"] == 2
    r = client.delete("/tasks/cats", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get("/tasks/cats"), 404, "task_not_found")
    assert_error(client.delete("/tasks/cats", headers=AUTH), 404, "task_not_found")


def test_predict_multipart_raw_and_top_k(with_task: TestClient) -> None:
    c = with_task
    r = c.post("/tasks/cats/predict", files=[("image", ("a.png", png())), ("image", ("b.jpg", JPEG + b"x"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "cats" and body["version"] == 1 and len(body["predictions"]) == 2
    assert set(body["predictions"][0][0]) == {"label", "index", "score"}
    r = c.post("/tasks/cats/predict?top_k=2", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    assert len(r.json()["predictions"][0]) == 2


@pytest.mark.parametrize("top_k", ["0", "1001", "-1", "abc", "2.5"])
def test_predict_top_k_out_of_range_is_422(with_task: TestClient, top_k: str) -> None:
    r = with_task.post(
        f"/tasks/cats/predict?top_k={top_k}", content=png(), headers={"Content-Type": "image/png"}
    )
    assert_error(r, 422, "invalid_parameter")


def test_predict_errors(with_task: TestClient) -> None:
    c = with_task
    err = assert_error(
        c.post("/tasks/cats/predict", files=[("image", ("a.png", png())), ("image", ("b", b"junk"))]),
        400,
        "bad_image",
    )
    assert "image 1" in err["message"]
    assert_error(c.post("/tasks/nope/predict", content=png(), headers={"Content-Type": "image/png"}), 404)
    assert_error(
        c.post("/tasks/cats/predict", content=b"{}", headers={"Content-Type": "application/json"}), 415
    )
    assert_error(c.post("/tasks/cats/predict", content=png()), 415, "unsupported_media_type")
    assert_error(c.post("/tasks/cats/predict", files={"other": ("a.png", png())}), 422, "invalid_parameter")
    extra = c.post("/tasks/cats/predict", files={"image": ("a.png", png())}, data={"note": "x"})
    assert_error(extra, 422, "invalid_parameter")
    assert_error(c.post("/tasks/cats/predict", data={"image": "not a file"}, files={"x": ("x", b"")}), 422)
    assert_error(
        c.post("/tasks/cats/predict", files=[("image", ("a.png", png()))] * 5), 413, "too_many_images"
    )
    no_boundary = {"Content-Type": "multipart/form-data"}
    assert_error(c.post("/tasks/cats/predict", content=b"--x\r\n", headers=no_boundary), 400, "bad_multipart")
    truncated = {"Content-Type": "multipart/form-data; boundary=x"}
    r = c.post("/tasks/cats/predict", content=b"--x\r\nbroken", headers=truncated)
    assert r.status_code in (400, 422)


@pytest.mark.parametrize(
    "name", ["UPPER", "-lead", "a" * 64, "a b", "%2e%2e", "caf\u00e9", ".hidden", "cats%0A", "cats%00"]
)
def test_invalid_task_names_are_422(client: TestClient, name: str) -> None:
    assert_error(client.get(f"/tasks/{name}"), 422, "invalid_task_name")
    assert_error(upload(client, fake_delta(), name=name), 422, "invalid_task_name")


@pytest.mark.parametrize("path", ["/tasks/../x", "/tasks/a/b", "/nope", "/tasks/a/predict/extra"])
def test_unknown_routes_are_404_json(client: TestClient, path: str) -> None:
    assert_error(client.get(path), 404)


def test_wrong_method_is_405_json(client: TestClient) -> None:
    assert_error(client.put("/tasks"), 405, "method_not_allowed")
    assert_error(client.post("/healthz"), 405)


def test_upload_errors(client: TestClient) -> None:
    assert_error(upload(client, b"\x00 not json"), 422, "malformed_delta")
    assert_error(client.post("/tasks", content=b"x", headers=AUTH), 415)
    assert_error(client.post("/tasks", files={"other": ("d", fake_delta())}, headers=AUTH), 422)
    assert_error(client.post("/tasks", data={"delta": "text"}, files={"x": ("x", b"")}, headers=AUTH), 422)
    assert_error(client.post("/tasks?replace=maybe", files={"delta": ("d", fake_delta())}, headers=AUTH), 422)
    assert_error(upload(client, b"x" * (33 * 1024)), 413, "delta_too_large")


def test_onnx_download(with_task: TestClient) -> None:
    r = with_task.get("/tasks/cats/model.onnx", headers=AUTH)
    assert r.status_code == 200 and r.content == b"ONNX:cats"
    assert r.headers["content-type"] == "application/octet-stream"
    assert_error(with_task.get("/tasks/nope/model.onnx", headers=AUTH), 404)


# Every domain error of the engine facade, raised from every facade-backed route, gets the status of the
# one table, the contract's error body and, for 429/503, a Retry-After header.
DOMAIN_ERRORS = [
    (p.BadImage("image 0: truncated"), 400, "bad_image"),
    (p.TaskNotFound("cats"), 404, "task_not_found"),
    (p.TaskExists("cats"), 409, "task_exists"),
    (p.DeltaTooLarge("too big"), 413, "delta_too_large"),
    (p.ImageTooLarge("too many pixels"), 413, "payload_too_large"),
    (p.UnsupportedMediaType("gif is not accepted"), 415, "unsupported_media_type"),
    (p.InvalidDelta("fingerprint differs", code="fingerprint_mismatch"), 422, "fingerprint_mismatch"),
    (p.InvalidParameter("top_k"), 422, "invalid_parameter"),
    (p.Overloaded("queue full", retry_after_s=2.5), 429, "overloaded"),
    (p.Unavailable("draining"), 503, "unavailable"),
    (p.DeadlineExceeded("deadline passed"), 503, "deadline_exceeded"),
    (p.StoreUnavailable("redis://10.0.0.5:6379 refused"), 503, "registry_unavailable"),
    (InvalidTaskName("Bad\n"), 422, "invalid_task_name"),
]

CALLS = [
    ("get", "/tasks", {}),
    ("get", "/tasks/cats", {}),
    ("get", "/backbone", {}),
    ("post", "/tasks", {"files": {"delta": ("d", fake_delta())}, "headers": AUTH}),
    ("delete", "/tasks/cats", {"headers": AUTH}),
    ("post", "/tasks/cats/predict", {"content": png(), "headers": {"Content-Type": "image/png"}}),
    ("get", "/tasks/cats/model.onnx", {"headers": AUTH}),
]


class StoreRefusedValue(p.StoreError, ValueError):
    pass


def test_store_value_errors_are_422(with_task: TestClient, engine: FakeEngine) -> None:
    engine.fail_with = StoreRefusedValue("invalid task name 'x'")
    assert_error(with_task.get("/tasks/cats"), 422, "invalid_parameter")


def test_error_table_covers_every_domain_error() -> None:
    classes = {cls for cls, _ in STATUS}
    for name in p.__all__:
        obj = getattr(p, name)
        bases = (p.EngineError, p.StoreError)
        if isinstance(obj, type) and issubclass(obj, bases) and obj not in bases:
            assert any(issubclass(obj, c) for c in classes), f"{name} has no status code"


@pytest.mark.parametrize(("method", "path", "kwargs"), CALLS, ids=[f"{m} {p}" for m, p, _ in CALLS])
@pytest.mark.parametrize(("exc", "status", "code"), DOMAIN_ERRORS, ids=[c for _, _, c in DOMAIN_ERRORS])
def test_domain_error_matrix(
    with_task: TestClient,
    engine: FakeEngine,
    method: str,
    path: str,
    kwargs: dict,
    exc: Exception,
    status: int,
    code: str,
) -> None:
    engine.fail_with = exc
    r = with_task.request(method, path, **kwargs)
    err = assert_error(r, status, code)
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    assert "10.0.0.5" not in err["message"]


def test_unexpected_engine_error_is_500_json_and_logged(
    with_task: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.fail_with = RuntimeError("secret internal path /opt/x")
    r = with_task.get("/tasks")
    err = assert_error(r, 500, "internal_error")
    assert "/opt/x" not in err["message"]
    assert any("unhandled" in rec.getMessage() for rec in caplog.records)


class NeverReady(FakeEngine):
    async def start(self) -> None:
        self.started = True


def test_not_ready_and_draining() -> None:
    engine = NeverReady(ready=False)
    app = create_app(make_settings(), engine=engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert_error(r, 503, "not_ready")
        assert r.headers["retry-after"] == "1"
        assert_error(c.get("/backbone"), 503, "not_ready")
        assert c.get("/tasks").status_code == 200  # the registry view works while loading
        raw = {"Content-Type": "image/png"}
        for r in (
            c.post("/tasks/cats/predict", content=png(), headers=raw),
            c.post("/tasks", files={"delta": ("d", fake_delta())}, headers=AUTH),
            c.delete("/tasks/cats", headers=AUTH),
            c.get("/tasks/cats/model.onnx", headers=AUTH),
        ):
            assert_error(r, 503, "not_ready")
            assert r.headers["retry-after"] == "1"
        engine.ready = True
        r = c.get("/readyz")
        assert r.status_code == 200 and r.headers.get("connection") != "close"
        app.state.draining = True
        r = c.get("/readyz")
        assert_error(r, 503, "draining")
        assert r.headers["connection"] == "close"  # no keep-alive reuse racing the listener's close
        assert c.get("/tasks").headers["connection"] == "close"
    assert engine.stopped


class BrokenStart(FakeEngine):
    async def start(self) -> None:
        raise RuntimeError("weights do not fit")


def test_start_failure_reported_and_fatal_hook_called() -> None:
    app = create_app(make_settings(), engine=BrokenStart(ready=False))
    seen: list[str] = []
    app.state.on_fatal = seen.append
    with TestClient(app, raise_server_exceptions=False) as c:
        assert_error(c.get("/readyz"), 503, "start_failed")
    assert seen and "weights do not fit" in seen[0]


def test_metrics_has_route_latency_and_engine_registry(with_task: TestClient) -> None:
    with_task.post("/tasks/cats/predict", content=png(), headers={"Content-Type": "image/png"})
    with_task.get("/tasks/zzz")
    text = with_task.get("/metrics").text
    assert (
        'ssf_http_request_duration_seconds_bucket{le="0.001",method="POST",route="/tasks/{name}/predict"}'
        in text
    )
    assert 'route="/tasks/{name}",status="404"' in text
    assert "fake_engine_predictions_total 1.0" in text


def test_openapi_docs_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/tasks/{name}/predict" in spec["paths"]


def test_405_allow_lists_every_method_of_the_path(client: TestClient) -> None:
    r = client.request("OPTIONS", "/tasks")
    assert_error(r, 405)
    assert r.headers["allow"] == "GET, POST"
    assert client.request("PATCH", "/tasks/cats").headers["allow"] == "DELETE, GET"


def test_openapi_documents_the_task_name_pattern(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    params = spec["paths"]["/tasks/{name}"]["get"]["parameters"]
    assert params[0]["schema"]["pattern"] == "^[a-z0-9][a-z0-9_.-]{0,62}$"
