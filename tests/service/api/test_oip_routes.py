"""The /v2 routes over the test engine: the protocol's error shape from every layer that can refuse (body
limit, routing, validation, auth, readiness, the engine), the same auth rule as predict, and the binary
extension's framing both ways. The real engine and tritonclient: test_oip_e2e.py."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.helpers.api import AUTH, TOKEN, assert_error, make_settings
from tests.helpers.engines import FakeEngine, fake_delta
from tests.helpers.images import png

HEADER = "Inference-Header-Content-Length"


def protocol_error(r, status: int) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    message: str = body["error"]
    return message


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(make_settings(), engine=FakeEngine())
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/tasks", files={"delta": ("d", fake_delta("cats"))}, headers=AUTH).status_code == 201
        yield c


def binary_bytes_request(*images: bytes, outputs: list[dict] | None = None) -> tuple[bytes, dict[str, str]]:
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)
    tensor = {"name": "image_bytes", "shape": [len(images)], "datatype": "BYTES"}
    header = {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}], "id": "r1"}
    if outputs is not None:
        header["outputs"] = outputs
    text = json.dumps(header).encode()
    return text + raw, {HEADER: str(len(text))}


def test_every_layer_answers_in_the_protocol_shape_under_v2(client: TestClient) -> None:
    assert "no route" in protocol_error(client.get("/v2/nothing"), 404)
    assert "not allowed" in protocol_error(client.get("/v2/models/cats/infer"), 405)
    assert "version" in protocol_error(client.get("/v2/models/cats/versions/x"), 422)
    assert "must match" in protocol_error(client.get("/v2/models/Cats"), 422)
    assert "does not exist" in protocol_error(client.get("/v2/models/dogs"), 404)
    assert "not 7" in protocol_error(client.get("/v2/models/cats/versions/7/ready"), 404)
    too_big = client.post("/v2/models/cats/infer", content=b"\0" * (65 * 1024))
    assert "exceeds the limit" in protocol_error(too_big, 413)
    r = client.post("/v2/models/cats/infer", content=b"{}", headers={HEADER: "-3"})
    assert HEADER in protocol_error(r, 400)
    # the native routes keep their own shape
    assert_error(client.get("/tasks/dogs"), 404, "task_not_found")
    assert_error(client.get("/nothing"), 404, "not_found")


def test_readiness_and_engine_errors_take_the_protocol_shape() -> None:
    app = create_app(make_settings(), engine=FakeEngine(ready=False))
    with TestClient(app, raise_server_exceptions=False) as c:
        app.state.engine.ready = False  # the lifespan's start() set it
        r = c.get("/v2/health/ready")
        assert "loading" in protocol_error(r, 503) and r.headers["retry-after"] == "1"
        assert c.get("/v2/health/live").json() == {"live": True}
        assert "loading" in protocol_error(c.get("/v2/models/cats/ready"), 503)
        assert_error(c.get("/readyz"), 503, "not_ready")


def test_infer_needs_a_client_token_where_predict_does() -> None:
    app = create_app(make_settings(client_tokens="alpha-1"), engine=FakeEngine())
    body, headers = binary_bytes_request(png())
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/tasks", files={"delta": ("d", fake_delta("cats"))}, headers=AUTH).status_code == 201
        for path in ("/v2/models/cats/infer", "/v2/models/cats/versions/1/infer"):
            assert "Bearer" in protocol_error(c.post(path, content=body, headers=headers), 401)
            bad = {**headers, "Authorization": "Bearer gamma"}
            assert "wrong" in protocol_error(c.post(path, content=body, headers=bad), 403)
            for token in ("alpha-1", TOKEN):
                ok = {**headers, "Authorization": f"Bearer {token}"}
                assert c.post(path, content=body, headers=ok).status_code == 200
        assert c.get("/v2/models/cats").status_code == 200  # metadata stays open, as GET /tasks
        spec = c.get("/openapi.json").json()["paths"]
        assert spec["/v2/models/{name}/infer"]["post"]["security"]
        assert "security" not in spec["/v2/models/{name}"]["get"]


def test_binary_outputs_follow_the_json_header(client: TestClient) -> None:
    outputs = [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "probabilities"}]
    body, headers = binary_bytes_request(png(), png(), outputs=outputs)
    r = client.post("/v2/models/cats/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HEADER])
    header, tail = json.loads(r.content[:n]), r.content[n:]
    assert header["id"] == "r1" and header["model_name"] == "cats" and header["model_version"] == "1"
    logits, probs = header["outputs"]
    assert logits == {
        "name": "logits",
        "shape": [2, 3],
        "datatype": "FP32",
        "parameters": {"binary_data_size": 24},
    }
    assert np.array_equal(np.frombuffer(tail, "<f4").reshape(2, 3), [[0, -1, -2], [0, -1, -2]])
    assert probs["shape"] == [2, 3] and abs(sum(probs["data"][:3]) - 1) < 1e-6


def test_classification_strings_in_json_and_binary(client: TestClient) -> None:
    want = ["0.665241:0:cat", "0.244728:1:dog"]
    for binary in (False, True):
        out = [{"name": "probabilities", "parameters": {"classification": 2, "binary_data": binary}}]
        body, headers = binary_bytes_request(png(), outputs=out)
        r = client.post("/v2/models/cats/versions/1/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        if not binary:
            (output,) = r.json()["outputs"]
            assert (output["datatype"], output["shape"], output["data"]) == ("BYTES", [1, 2], want)
            continue
        n = int(r.headers[HEADER])
        tail, items = r.content[n:], []
        while tail:
            (size,) = struct.unpack_from("<I", tail)
            items.append(tail[4 : 4 + size].decode())
            tail = tail[4 + size :]
        assert items == want


def test_the_infer_body_is_declared_in_the_schema(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v2/models/{name}/infer"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["inputs"] and "$ref" not in json.dumps(schema)
    assert {"400", "404", "413", "422", "429", "503"} <= set(op["responses"])
