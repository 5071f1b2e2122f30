"""Hostile Open Inference Protocol requests (``POST /v2/models/{name}/infer``), generated from one valid
request of each kind: binary BYTES, JSON BYTES (base64) and JSON FP32 pixels. Every case must be refused
with a 4xx in the protocol's error shape (``{"error": "..."}``), never a 5xx. Deterministic."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class OipCase:
    name: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _json(name: str, request: Any) -> OipCase:
    return OipCase(name, json.dumps(request).encode(), {"Content-Type": "application/json"})


def _binary(name: str, header: dict[str, Any], tail: bytes, length: str | None = None) -> OipCase:
    text = json.dumps(header).encode()
    return OipCase(name, text + tail, {HEADER: length if length is not None else str(len(text))})


def _bytes_input(size: Any, shape: Any = (1,), datatype: Any = "BYTES", name: Any = "image_bytes") -> dict:
    tensor = {
        "name": name,
        "shape": list(shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }
    return {"inputs": [tensor]}


def binary_cases(image: bytes) -> Iterator[OipCase]:
    element = struct.pack("<I", len(image)) + image
    n = len(element)
    text = json.dumps(_bytes_input(n)).encode()
    for length in (
        "-1",
        "0",
        "1",
        str(len(text) - 1),
        str(len(text) + n + 1),
        "1e3",
        "",
        "0x10",
        "99999999999",
    ):
        yield OipCase(f"header-length-{length!r}", text + element, {HEADER: length})
    for size in (0, 1, 3, 4, n - 1, n + 1, n + 4, 2**31, 2**64, -1, True, "12", None, 1.5):
        yield _binary(f"binary_data_size-{size!r}", _bytes_input(size), element)
    yield _binary("element-length-past-end", _bytes_input(n), struct.pack("<I", len(image) + 1) + image)
    yield _binary("element-length-huge", _bytes_input(n), struct.pack("<I", 2**32 - 1) + image)
    yield _binary("truncated-length-prefix", _bytes_input(n + 2), element + b"\x01\x00")
    yield _binary("two-elements-shape-one", _bytes_input(2 * n), element * 2)
    yield _binary("one-element-shape-two", _bytes_input(n, shape=(2,)), element)
    yield _binary("empty-element", _bytes_input(4), struct.pack("<I", 0))
    yield _binary("not-an-image", _bytes_input(4 + 5), struct.pack("<I", 5) + b"hello")
    for datatype in ("FP32", "bytes", "INT8", "", None, 7):
        yield _binary(f"bytes-datatype-{datatype!r}", _bytes_input(n, datatype=datatype), element)
    for shape in ([], [1, 1], [0], [-1], [2**63]):
        yield _binary(f"bytes-shape-{shape}", _bytes_input(n, shape=shape), element)
    yield _binary(
        "fp32-binary-wrong-size", _bytes_input(n, shape=(1, 3, 2, 2), datatype="FP32", name="image"), element
    )
    yield _binary(
        "fp32-binary-nan", _bytes_input(12, shape=(1, 3, 1, 1), datatype="FP32", name="image"), b"\xff" * 12
    )
    with_data = _bytes_input(n)
    with_data["inputs"][0]["data"] = [base64.b64encode(image).decode()]
    yield _binary("data-and-binary", with_data, element)
    yield OipCase("binary-without-header-length", text + element)
    yield OipCase("invalid-utf8-header", b'{"inputs": [\xff\xfe]}')


def json_cases(image: bytes, input_size: tuple[int, int, int]) -> Iterator[OipCase]:
    b64 = base64.b64encode(image).decode()

    def one(tensor: dict[str, Any], **rest: Any) -> dict[str, Any]:
        return {"inputs": [tensor], **rest}

    good = {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [b64]}
    for body in ([], "x", 1, None, {"inputs": []}, {"inputs": [good, good]}, {"inputs": {}}, {"outputs": []}):
        yield _json(f"request-{json.dumps(body)[:30]}", body)
    yield OipCase("deep-nesting", b"[" * 50_000 + b"]" * 50_000)
    yield OipCase("not-json", b"\x89PNG\r\n\x1a\n" + image[:64])
    for key, value in (
        ("name", None),
        ("shape", "1"),
        ("shape", [[1]]),
        ("datatype", ["BYTES"]),
        ("data", "x"),
    ):
        yield _json(f"input-{key}-{value!r}", one({**good, key: value}))
    for data in ([1], [None], [[b64, b64]], ["***"], [""], [{"b64": b64}]):
        yield _json(f"bytes-data-{json.dumps(data)[:20]}", one({**good, "data": data}))
    yield _json("no-data-no-binary", one({k: v for k, v in good.items() if k != "data"}))
    c, h, w = input_size
    count = c * h * w
    pixels = {"name": "image", "shape": [1, c, h, w], "datatype": "FP32"}
    for shape in ([1, c, h, w - 1], [1, c * h * w], [c, h, w], [1, 1, c, h, w], [0, c, h, w]):
        size = 1
        for d in shape:
            size *= d
        yield _json(f"pixels-shape-{shape}", one({**pixels, "shape": shape, "data": [0.0] * size}))
    for bad_value in ("1", None, True, {"v": 1.0}, 1e400, 10**400, "nan"):
        yield _json(
            f"pixels-value-{bad_value!r}"[:40], one({**pixels, "data": [bad_value] + [0.0] * (count - 1)})
        )
    yield _json("pixels-too-few", one({**pixels, "data": [0.0] * (count - 1)}))
    yield _json("pixels-as-fp16", one({**pixels, "datatype": "FP16", "data": [0.0] * count}))
    yield _json("pixels-as-bytes", one({**pixels, "datatype": "BYTES", "data": [b64]}))
    yield _json("unknown-input", one({**good, "name": "input__0"}))
    for output in (
        {"name": "scores"},
        {"name": "logits", "parameters": {"classification": 0}},
        {"name": "logits", "parameters": {"classification": -1}},
        {"name": "logits", "parameters": {"classification": 1001}},
        {"name": "logits", "parameters": {"classification": "3"}},
        {"name": "logits", "parameters": {"classification": True}},
        {"name": "logits", "parameters": {"classification": 2.5}},
        {"name": "logits", "parameters": {"binary_data": "yes"}},
        {"parameters": {}},
    ):
        yield _json(f"output-{json.dumps(output)[:40]}", one(good, outputs=[output]))


def oip_cases(image: bytes, input_size: tuple[int, int, int]) -> Iterator[OipCase]:
    yield from binary_cases(image)
    yield from json_cases(image, input_size)
