"""The Open Inference Protocol end to end: ``tritonclient[http]`` (the real client from the package index)
against ``python -m service.cli`` under uvicorn, with a tiny real backbone and real deltas.

What must hold: every /v2 route answers tritonclient; the probabilities equal the native predict route's
scores for the same images and version (|difference| < 1e-4), for encoded images and for preprocessed
FP32 pixels, in JSON and in binary; bad protocol requests get 4xx in the protocol's error shape."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import timm
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.engine.images import Preprocessor
from service.settings import EngineConfig
from tests.helpers.deltas import task_delta
from tests.helpers.images import images as sample_images
from tests.helpers.models import MODEL, backbone_file
from tests.helpers.servers import Server, start, stop, upload

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MAX_IMAGES = 4
CLASSES = 4  # task_delta's default


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("oip")
    s = start(tmp, backbone_file("vit", tmp), max_images_per_request=MAX_IMAGES)
    assert upload(s.url, task_delta("cats", 1)).status_code == 201
    assert upload(s.url, task_delta("dogs", 2)).status_code == 201
    yield s
    stop(s)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


def native_scores(server: Server, task: str, images: list[bytes]) -> tuple[int, np.ndarray]:
    """The native route's softmax scores in class order, one row per image, and the version."""
    files = [("image", (f"{i}.img", data)) for i, data in enumerate(images)]
    r = httpx.post(f"{server.url}/tasks/{task}/predict", files=files, params={"top_k": CLASSES}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    rows = [[s["score"] for s in sorted(row, key=lambda s: s["index"])] for row in body["predictions"]]
    return body["version"], np.array(rows, dtype=np.float64)


def bytes_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    return tensor


def pixels(images: list[bytes]) -> np.ndarray:
    """The images preprocessed by a client the way the backbone expects (timm's eval transform)."""
    pre = Preprocessor(timm.create_model(MODEL), EngineConfig())
    return pre.decode_all(images).numpy()


def assert_error(err: InferenceServerException, status: int, words: str) -> None:
    assert err.status() == str(status), (err.status(), err.message())
    assert isinstance(err.message(), str) and words in err.message(), err.message()


# ------------------------------------------------------------------------------------------- metadata
def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "ssf-serve"
    assert {"classification", "binary_tensor_data"} <= set(meta["extensions"])


def test_model_metadata_has_real_shapes_datatypes_and_labels(
    server: Server, client: triton.InferenceServerClient
) -> None:
    info = httpx.get(f"{server.url}/tasks/cats").json()
    backbone = httpx.get(f"{server.url}/backbone").json()
    meta = client.get_model_metadata("cats")
    assert meta == client.get_model_metadata("cats", str(info["version"]))
    assert meta["name"] == "cats" and meta["versions"] == [str(info["version"])]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {"image_bytes": ("BYTES", [-1]), "image": ("FP32", [-1, *backbone["input_size"]])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs == {"logits": ("FP32", [-1, CLASSES]), "probabilities": ("FP32", [-1, CLASSES])}
    assert meta["parameters"]["labels"] == info["labels"]
    assert client.is_model_ready("cats") and client.is_model_ready("cats", str(info["version"]))
    assert not client.is_model_ready("nope") and not client.is_model_ready("cats", "99")


# ----------------------------------------------------------------------------------- same as native
@pytest.mark.parametrize("binary", [True, False], ids=["binary-outputs", "json-outputs"])
def test_encoded_images_equal_native_predict(
    server: Server, client: triton.InferenceServerClient, binary: bool
) -> None:
    images = sample_images(4, seed=3)  # JPEG, PNG, WebP, BMP
    version, native = native_scores(server, "cats", images)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "probabilities")]
    result = client.infer("cats", [bytes_input(images)], outputs=outputs)
    probs, logits = result.as_numpy("probabilities"), result.as_numpy("logits")
    assert probs.dtype == np.float32 and probs.shape == (4, CLASSES)
    assert result.get_response()["model_version"] == str(version)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    diff = max(np.abs(probs - native).max(), np.abs(softmax - native).max())
    print(f"encoded images ({'binary' if binary else 'JSON'} outputs): max |score - native| = {diff:.2e}")
    assert diff < 1e-4
    assert (probs.argmax(1) == native.argmax(1)).all()


@pytest.mark.parametrize("binary", [True, False], ids=["binary-input", "json-input"])
def test_preprocessed_pixels_equal_native_predict(
    server: Server, client: triton.InferenceServerClient, binary: bool
) -> None:
    images = sample_images(3, seed=4)
    _, native = native_scores(server, "dogs", images)
    x = pixels(images)
    tensor = triton.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("dogs", [tensor], outputs=[triton.InferRequestedOutput("probabilities")])
    diff = np.abs(result.as_numpy("probabilities") - native).max()
    print(f"FP32 pixels ({'binary' if binary else 'JSON'} input): max |score - native| = {diff:.2e}")
    assert diff < 1e-4


def test_classification_extension_is_the_native_top_k(
    server: Server, client: triton.InferenceServerClient
) -> None:
    images = sample_images(2, seed=5)
    r = httpx.post(
        f"{server.url}/tasks/cats/predict",
        files=[("image", (f"{i}", d)) for i, d in enumerate(images)],
        params={"top_k": 3},
        timeout=60,
    )
    top3 = triton.InferRequestedOutput("probabilities", class_count=3)
    got = client.infer("cats", [bytes_input(images)], outputs=[top3]).as_numpy("probabilities")
    assert got.shape == (2, 3)
    for row, want in zip(got, r.json()["predictions"], strict=True):
        parsed = [item.decode().split(":", 2) for item in row]
        assert [(int(i), label) for _, i, label in parsed] == [(s["index"], s["label"]) for s in want]
        assert np.allclose([float(v) for v, _, _ in parsed], [s["score"] for s in want], atol=1e-4)


def test_a_version_route_answers_only_for_the_served_version(
    server: Server, client: triton.InferenceServerClient
) -> None:
    images = sample_images(1, seed=6)
    assert upload(server.url, task_delta("birds", 7)).status_code == 201
    assert upload(server.url, task_delta("birds", 8), replace=True).status_code == 201
    version, native = native_scores(server, "birds", images)
    assert version == 2
    result = client.infer("birds", [bytes_input(images)], model_version="2")
    assert result.get_response()["model_version"] == "2"
    assert np.abs(result.as_numpy("probabilities") - native).max() < 1e-4
    with pytest.raises(InferenceServerException) as e:
        client.infer("birds", [bytes_input(images)], model_version="1")
    assert_error(e.value, 404, "version 2, not 1")
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("birds", "1")
    assert_error(e.value, 404, "not 1")


# --------------------------------------------------------------------------------- bad requests
def test_bad_requests_through_tritonclient(client: triton.InferenceServerClient) -> None:
    image = sample_images(1)
    small = triton.InferInput("image", [1, 3, 32, 32], "FP32")
    small.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    half = triton.InferInput("image", [1, 3, 160, 160], "FP16")
    half.set_data_from_numpy(np.zeros((1, 3, 160, 160), np.float16))
    cases = [
        ("cats", [small], 422, "this backbone takes [N, 3, 160, 160]"),
        ("cats", [half], 400, "datatype FP32"),
        ("nope", [bytes_input(image)], 404, "'nope' does not exist"),
        ("cats", [bytes_input(image * (MAX_IMAGES + 1))], 413, f"the limit is {MAX_IMAGES}"),
        ("cats", [bytes_input([b"not an image"])], 400, "image 0"),
        ("Bad Name", [bytes_input(image)], 422, "must match"),
    ]
    for model, inputs, status, words in cases:
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, inputs)
        assert_error(e.value, status, words)
    with pytest.raises(InferenceServerException) as e:
        client.infer("cats", [bytes_input(image)], outputs=[triton.InferRequestedOutput("scores")])
    assert_error(e.value, 400, "unknown output 'scores'")
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            "cats", [bytes_input(image)], outputs=[triton.InferRequestedOutput("logits", class_count=1001)]
        )
    assert_error(e.value, 422, "top_k")


def _post(server: Server, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/cats/infer", content=body, headers=headers, timeout=60)


def _binary_request(image: bytes, declared: int | None = None, extra: bytes = b"") -> tuple[bytes, str]:
    element = struct.pack("<I", len(image)) + image
    size = len(element) if declared is None else declared
    header = {
        "inputs": [
            {
                "name": "image_bytes",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": size},
            }
        ]
    }
    text = json.dumps(header).encode()
    return text + element + extra, str(len(text))


def test_bad_binary_and_json_bodies_are_400_in_the_protocol_shape(server: Server) -> None:
    image = sample_images(1)[0]
    good, length = _binary_request(image)
    ok = _post(server, good, {"Inference-Header-Content-Length": length})
    assert ok.status_code == 200, ok.text
    assert ok.headers["content-type"] == "application/json"
    short, length_short = _binary_request(image, declared=10)
    truncated, length_trunc = _binary_request(image, extra=b"\x05\x00")
    b64 = base64.b64encode(image).decode()
    cases = [
        (good, {"Inference-Header-Content-Length": str(len(good) + 1)}, "but the body is"),
        (good, {"Inference-Header-Content-Length": "twelve"}, "must be an integer"),
        (good, {"Inference-Header-Content-Length": "0"}, "is 0"),
        (short, {"Inference-Header-Content-Length": length_short}, "binary_data_size says 10"),
        (truncated, {"Inference-Header-Content-Length": length_trunc}, "binary_data_size says"),
        (good, {}, "not JSON"),  # binary data without the header length
        (b"[" * 100_000, {}, "not JSON"),
        (b'{"inputs": []}', {}, "inputs"),
        (
            json.dumps(
                {"inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "data": [b64]}]}
            ).encode(),
            {},
            "shape says 2",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}
            ).encode(),
            {},
            "not valid base64",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [1.0]}]}
            ).encode(),
            {},
            "needs 2 values",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": ["x"]}]}
            ).encode(),
            {},
            "must be numbers",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
            ).encode(),
            {},
            "unknown input",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "shape": [-1, 3], "datatype": "FP32", "data": []}]}
            ).encode(),
            {},
            "negative",
        ),
    ]
    for body, headers, words in cases:
        r = _post(server, body, headers)
        assert r.status_code == 400, (words, r.status_code, r.text)
        assert set(r.json()) == {"error"} and words in r.json()["error"], (words, r.text)
    r = _post(server, good, {"Inference-Header-Content-Length": length, "Content-Encoding": "gzip"})
    assert r.status_code == 415 and set(r.json()) == {"error"}
    element = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image_bytes",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)},
                }
            ]
        }
    ).encode()
    over = header + element * 1 + b"\0" * (9 * 1024 * 1024)
    r = _post(server, over, {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 413 and set(r.json()) == {"error"}, r.text
