"""The Open Inference Protocol (KServe v2) over REST: its JSON bodies, and Triton's binary tensor extension.

One task is one model. Its inputs are ``image_bytes`` (BYTES, shape [N]: encoded JPEG, PNG, WebP or BMP
files) or ``image`` (FP32, shape [N, 3, H, W]: pixels already resized and normalized the way the backbone
expects, the input of the ONNX graph ``ssf-export`` writes); its outputs are ``logits`` and
``probabilities`` (FP32, [N, num_classes]), either of which the classification extension turns into the
top k as BYTES strings ``"<value>:<index>:<label>"``.

The binary extension: a request may carry its JSON header followed by raw tensor bytes; the header's
length is in ``Inference-Header-Content-Length`` and each binary input says its ``binary_data_size``. BYTES
elements are each a 4-byte little-endian length and the bytes; FP32 data is little-endian, row-major.
Everything here is pure parsing and encoding: every malformed body is an ``ApiError`` 400 naming the
problem; the engine checks what the values mean (shape against the backbone, limits).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.errors import ApiError
from service.engine.protocol import LogitsResult, check_top_k

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES_INPUT, PIXELS_INPUT = "image_bytes", "image"
OUTPUTS = ("logits", "probabilities")
EXTENSIONS = ["classification", "binary_tensor_data"]


class RequestInput(BaseModel):
    name: str = Field(description=f"{BYTES_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (FP32)")
    shape: list[int] = Field(description="[N] for image_bytes, [N, 3, H, W] for image")
    datatype: str = Field(description="BYTES or FP32")
    parameters: dict[str, Any] = Field(default_factory=dict, description="binary_data_size")
    data: list[Any] | None = Field(None, description="row-major values; base64 strings for BYTES")


class RequestOutput(BaseModel):
    name: str = Field(description="logits or probabilities")
    parameters: dict[str, Any] = Field(default_factory=dict, description="classification, binary_data")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="binary_data_output")
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 where any size goes")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the version this task serves now")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="labels (index order), num_classes, metrics")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ProtocolError(BaseModel):
    error: str = Field(description="what is wrong and how to fix it")


def bad(message: str) -> ApiError:
    return ApiError(400, "bad_infer_request", message)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, for a request body the route parses itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


# ---------------------------------------------------------------------------------------------- parsing
def split_body(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON header (validated) and the binary tensor bytes that follow it."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"{HEADER_LENGTH} must be an integer, not {header_length[:40]!r}") from None
        if not 0 < n <= len(body):
            raise bad(f"{HEADER_LENGTH} is {n}, but the body is {len(body)} bytes")
        body, binary = body[:n], body[n:]
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise bad(f"the inference request is not JSON: {str(e)[:200]}") from None
    try:
        return InferenceRequest.model_validate(parsed), binary
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise bad(f"invalid inference request: {where}") from None


def _binary_size(tensor: RequestInput) -> int | None:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise bad(f"input {tensor.name!r}: binary_data_size must be a non-negative integer")
    return size


def _count(shape: list[int], name: str) -> int:
    if any(d < 0 for d in shape):
        raise bad(f"input {name!r}: shape {shape} has a negative dimension")
    total = 1
    for d in shape:
        total *= d
    return total


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """Triton's BYTES serialization: each element a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad(f"input {name!r}: truncated BYTES element length at byte {offset}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise bad(f"input {name!r}: BYTES element of {size} bytes runs past binary_data_size")
        out.append(raw[offset : offset + size])
        offset += size
    return out


def _images(tensor: RequestInput, raw: bytes | None) -> list[bytes]:
    if len(tensor.shape) != 1:
        raise bad(f"input {BYTES_INPUT!r} has shape [N] (one encoded image each), not {tensor.shape}")
    if raw is not None:
        images = _bytes_elements(raw, tensor.name)
    else:
        assert tensor.data is not None
        images = []
        for i, item in enumerate(_flatten(tensor.data)):
            if not isinstance(item, str):
                raise bad(f"input {BYTES_INPUT!r}: element {i} must be a base64 string in JSON")
            try:
                images.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise bad(f"input {BYTES_INPUT!r}: element {i} is not valid base64") from None
    if len(images) != tensor.shape[0]:
        raise bad(f"input {BYTES_INPUT!r}: shape says {tensor.shape[0]} elements, the data has {len(images)}")
    return images


def _pixels(tensor: RequestInput, raw: bytes | None) -> np.ndarray:
    count = _count(tensor.shape, tensor.name)
    if raw is not None:
        if len(raw) != count * 4:
            raise bad(
                f"input {PIXELS_INPUT!r}: shape {tensor.shape} needs {count * 4} bytes of FP32, "
                f"binary_data_size is {len(raw)}"
            )
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(tensor.shape)
    assert tensor.data is not None
    values = _flatten(tensor.data)
    if len(values) != count:
        raise bad(
            f"input {PIXELS_INPUT!r}: shape {tensor.shape} needs {count} values, the data has {len(values)}"
        )
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise bad(f"input {PIXELS_INPUT!r}: FP32 data must be numbers")
    try:
        return np.asarray(values, dtype=np.float32).reshape(tensor.shape)
    except OverflowError:  # an integer beyond any float
        raise bad(f"input {PIXELS_INPUT!r}: a value is out of the FP32 range") from None


def read_input(request: InferenceRequest, binary: bytes) -> list[bytes] | np.ndarray:
    """The request's one input as encoded images or a pixel array; binary sizes must add up exactly."""
    (tensor,) = request.inputs
    size = _binary_size(tensor)
    if size is not None and tensor.data is not None:
        raise bad(f"input {tensor.name!r} has both data and binary_data_size")
    if size is None and tensor.data is None:
        raise bad(f"input {tensor.name!r} has neither data nor binary_data_size")
    if (size or 0) != len(binary):
        raise bad(f"binary_data_size says {size or 0} bytes, {len(binary)} follow the JSON header")
    raw = binary if size is not None else None
    wanted = {BYTES_INPUT: "BYTES", PIXELS_INPUT: "FP32"}
    if tensor.name not in wanted:
        raise bad(
            f"unknown input {tensor.name[:40]!r}: send {BYTES_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (FP32)"
        )
    if tensor.datatype != wanted[tensor.name]:
        raise bad(f"input {tensor.name!r} has datatype {wanted[tensor.name]}, not {tensor.datatype[:20]!r}")
    return _images(tensor, raw) if tensor.name == BYTES_INPUT else _pixels(tensor, raw)


# --------------------------------------------------------------------------------------------- encoding
@dataclass
class Wanted:
    name: str
    classification: int | None
    binary: bool


def requested_outputs(request: InferenceRequest) -> list[Wanted]:
    default_binary = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return [Wanted(name, None, default_binary) for name in OUTPUTS]
    out = []
    for o in request.outputs:
        if o.name not in OUTPUTS:
            raise bad(f"unknown output {o.name[:40]!r}: this model has {list(OUTPUTS)}")
        k = o.parameters.get("classification")
        if k is not None:
            check_top_k(k)  # 422 like top_k on the native route
        binary = o.parameters.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise bad(f"output {o.name!r}: binary_data must be true or false")
        out.append(Wanted(o.name, k, binary))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    result: np.ndarray = (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    return result


def classify(values: np.ndarray, labels: list[str], k: int) -> list[list[str]]:
    """Triton's classification strings, best first: ``"<value>:<index>:<label>"``."""
    k = min(k, values.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    return [[f"{row[i]:f}:{i}:{labels[i]}" for i in idx] for row, idx in zip(values, order, strict=True)]


def _serialize_bytes(items: list[str]) -> bytes:
    encoded = [s.encode() for s in items]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def encode_response(
    result: LogitsResult, request: InferenceRequest, wanted: list[Wanted]
) -> tuple[bytes, dict[str, str], str]:
    """The response body, its headers and media type (JSON, or JSON plus binary tensors)."""
    tensors = {"logits": result.logits.astype(np.float32), "probabilities": softmax(result.logits)}
    outputs, chunks = [], []
    for w in wanted:
        values = tensors[w.name]
        if w.classification is None:
            shape, datatype = list(values.shape), "FP32"
            flat: list[Any] = values.reshape(-1).tolist()
            raw = values.astype("<f4").tobytes()
        else:
            rows = classify(values, result.labels, w.classification)
            shape, datatype = [len(rows), len(rows[0]) if rows else 0], "BYTES"
            flat = [s for row in rows for s in row]
            raw = _serialize_bytes(flat)
        entry: dict[str, Any] = {"name": w.name, "shape": shape, "datatype": datatype}
        if w.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = flat
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": result.task, "model_version": str(result.version)}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return text, {}, "application/json"
    return text + b"".join(chunks), {HEADER_LENGTH: str(len(text))}, "application/octet-stream"
