"""The app around the real Engine in-process (TestClient), with an in-memory registry: real deltas made by
the ssf core, real Pillow images, real ONNX-free torch inference. No 5xx anywhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.helpers.api import AUTH, assert_error, make_settings
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import MODEL, backbone_file
from tests.helpers.stores import MemoryStore


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("backbone"))


@pytest.fixture
def client(weights: Path) -> Iterator[TestClient]:
    from service.engine.engine import Engine

    settings = make_settings(max_delta_bytes=4 * 1024 * 1024, max_body_bytes=1024 * 1024, device="cpu")
    engine = Engine(MODEL, weights, MemoryStore(), config=settings, pretrained=False)
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200
        yield c


def test_upload_predict_replace_delete(client: TestClient, weights: Path) -> None:
    backbone = client.get("/backbone").json()
    assert backbone["model"] == MODEL and backbone["fingerprint"].startswith("sha256:")
    r = client.post("/tasks", files={"delta": ("d.safetensors", task_delta("cats", 1))}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["backbone_fingerprint"] == backbone["fingerprint"]
    images = [("image", ("a.png", encode("PNG", 1))), ("image", ("b.jpg", encode("JPEG", 2)))]
    first = client.post("/tasks/cats/predict?top_k=3", files=images)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["version"] == 1 and [len(p) for p in body["predictions"]] == [3, 3]
    scores = [s["score"] for s in body["predictions"][0]]
    assert scores == sorted(scores, reverse=True)

    r = client.post(
        "/tasks?replace=true",
        files={"delta": ("d.safetensors", task_delta("cats", 2))},
        headers=AUTH,
    )
    assert r.status_code == 201 and r.json()["version"] == 2
    second = client.post("/tasks/cats/predict?top_k=3", files=images).json()
    assert second["version"] == 2 and second["predictions"] != body["predictions"]

    assert "ssf_engine_batches_total" in client.get("/metrics").text  # the engine's own registry
    assert client.delete("/tasks/cats", headers=AUTH).status_code == 204
    assert_error(client.post("/tasks/cats/predict", files=images), 404, "task_not_found")


def test_real_engine_refusals_are_4xx(client: TestClient, weights: Path, tmp_path: Path) -> None:
    client.post("/tasks", files={"delta": ("d", task_delta("cats", 1))}, headers=AUTH)
    other = task_delta("dogs", 1, backbone_seed=5)  # made for another backbone
    err = assert_error(client.post("/tasks", files={"delta": ("d", other)}, headers=AUTH), 422)
    assert "fingerprint" in err["code"] + err["message"]
    assert_error(client.post("/tasks", files={"delta": ("d", b"not a delta")}, headers=AUTH), 422)
    assert_error(client.post("/tasks", files={"delta": ("d", task_delta("cats", 3))}, headers=AUTH), 409)
    err = assert_error(
        client.post(
            "/tasks/cats/predict", files=[("image", ("a", encode("PNG", 1))), ("image", ("b", b"xx"))]
        ),
        400,
    )
    assert "1" in err["message"]
    gif = encode("GIF", 3)
    r = client.post("/tasks/cats/predict", content=gif, headers={"Content-Type": "image/gif"})
    assert r.status_code in (400, 415), r.text


def _bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def hostile_images() -> list[tuple[str, bytes]]:
    png, jpeg = encode("PNG", 9), encode("JPEG", 9)
    cases = [("empty", b""), ("text", b"hello"), ("gif", encode("GIF", 1)), ("tiff", encode("TIFF", 1))]
    cases += [(f"png-cut-{f}", png[: int(len(png) * f)]) for f in (0.1, 0.5, 0.99)]
    cases += [(f"jpeg-cut-{f}", jpeg[: int(len(jpeg) * f)]) for f in (0.1, 0.5, 0.99)]
    cases += [("bomb-30k", _bomb_png(30_000, 30_000)), ("bomb-65535x1", _bomb_png(65_535, 1))]
    flipped = bytearray(jpeg)
    for i in range(20, len(flipped), 97):
        flipped[i] ^= 0xFF
    cases.append(("jpeg-bitflips", bytes(flipped)))
    return cases


def test_hostile_images_are_4xx_never_5xx(client: TestClient, weights: Path) -> None:
    client.post("/tasks", files={"delta": ("d", task_delta("cats", 1))}, headers=AUTH)
    for label, data in hostile_images():
        for r in (
            client.post("/tasks/cats/predict", files={"image": ("x", data)}),
            client.post("/tasks/cats/predict", content=data, headers={"Content-Type": "image/png"}),
        ):
            assert r.status_code < 500, (label, r.status_code, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"code", "message"}
    assert client.get("/healthz").status_code == 200


def test_onnx_download_runs_and_matches_the_server(client: TestClient, weights: Path) -> None:
    """The admin ONNX download is the current version's merged graph: onnxruntime on it agrees with
    the server's own top-1 for the same image."""
    import numpy as np
    import onnxruntime as ort
    import torch

    client.post("/tasks", files={"delta": ("d", task_delta("cats", 4))}, headers=AUTH)
    r = client.get("/tasks/cats/model.onnx", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    png = encode("PNG", 11)
    served = client.post("/tasks/cats/predict?top_k=1", files={"image": ("a.png", png)}).json()
    engine = client.app.state.engine  # type: ignore[attr-defined]  # its preprocessing, to feed ONNX
    x = engine.preprocess([png]) if callable(getattr(engine, "preprocess", None)) else None
    if x is None:
        pytest.skip("engine exposes no preprocess to build the ONNX input")
    assert isinstance(x, torch.Tensor)
    (logits,) = session.run(["logits"], {"image": x.numpy().astype(np.float32)})
    assert int(logits[0].argmax()) == served["predictions"][0][0]["index"]


def test_app_builds_its_engine_from_settings_onnx_backend(weights: Path, tmp_path: Path) -> None:
    """create_app(settings) with no engine: the lifespan builds Engine + LocalStore from the settings."""
    settings = make_settings(
        weights=str(weights),
        store=str(tmp_path / "store"),
        backend="onnx",
        device="cpu",
        max_delta_bytes=4 * 1024 * 1024,
        max_body_bytes=1024 * 1024,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/backbone").json()["backend"] == "onnx"
        r = c.post("/tasks", files={"delta": ("d", task_delta("cats", 1))}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = c.post("/tasks/cats/predict", files={"image": ("a.png", encode("PNG", 1))})
        assert r.status_code == 200 and r.json()["version"] == 1
    assert any((tmp_path / "store").iterdir())  # the upload landed in the store directory
