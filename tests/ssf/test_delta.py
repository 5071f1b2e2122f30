"""The delta file: bit-exact round trip, and every kind of bad delta refused with a message naming it."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable

import pytest
import safetensors.torch
import torch

import ssf
from ssf.delta import FORMAT_VERSION, BackboneSpec, Delta
from tests.helpers import deltas
from tests.helpers.models import NUM_CLASSES, make


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, BackboneSpec]:
    model = make("vit")
    spec = BackboneSpec.from_model(model, "test_vit")
    ssf.inject_ssf(model)
    for a in model.ssf.values():
        a.scale.data.normal_(1, 0.3)
        a.shift.data.normal_(0, 0.3)
    return model, spec


def make_delta(model: torch.nn.Module, spec: BackboneSpec, labels: list[str] | None = None) -> Delta:
    delta = deltas.make_delta(
        model,
        "digits",
        spec.model,
        labels=labels or [f"c{i}" for i in range(NUM_CLASSES)],
        preprocess={"input_size": [3, 160, 160]},
        metrics={"val_acc": 0.5},
    )
    assert delta.backbone_fingerprint == spec.fingerprint
    return delta


def test_round_trip_is_bit_exact(trained: tuple[torch.nn.Module, BackboneSpec]) -> None:
    model, spec = trained
    delta = make_delta(model, spec)
    data = ssf.delta_to_bytes(delta)
    loaded = ssf.load_delta(data, spec)
    assert loaded.metadata() == delta.metadata()
    assert loaded.sites.keys() == delta.sites.keys()
    for path, (scale, shift) in delta.sites.items():
        assert torch.equal(loaded.sites[path][0], scale) and torch.equal(loaded.sites[path][1], shift)
    assert all(torch.equal(loaded.head[k], v) for k, v in delta.head.items())
    # safetensors writes __metadata__ from a hash map (order varies), so compare content, not file bytes
    again = safetensors.torch.load(ssf.delta_to_bytes(loaded))
    first = safetensors.torch.load(data)
    assert again.keys() == first.keys()
    assert all(again[k].numpy().tobytes() == first[k].numpy().tobytes() for k in first)


def test_delta_folds_to_the_trained_model(trained: tuple[torch.nn.Module, BackboneSpec]) -> None:
    model, spec = trained
    delta = ssf.load_delta(ssf.delta_to_bytes(make_delta(model, spec)), spec)
    base = make("vit")
    merged_sd = ssf.fold_state_dict(base.state_dict(), list(spec.sites), delta.sites, delta.head)
    base.load_state_dict(merged_sd)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(base(x), model(x), atol=1e-5)


def test_packed_sites_hold_the_same_values_in_one_tensor(
    trained: tuple[torch.nn.Module, BackboneSpec],
) -> None:
    model, spec = trained
    delta = ssf.load_delta(ssf.delta_to_bytes(make_delta(model, spec)), spec)
    packed = ssf.packed(delta, spec)
    assert isinstance(packed.sites, ssf.PackedSites)
    assert list(packed.sites) == [s.path for s in spec.sites]  # the spec's order
    assert len(packed.sites) == len(delta.sites)
    for path, (scale, shift) in delta.sites.items():
        got_scale, got_shift = packed.sites[path]
        assert torch.equal(got_scale, scale) and torch.equal(got_shift, shift)  # bit for bit
        assert got_scale.untyped_storage().data_ptr() == packed.sites.flat.untyped_storage().data_ptr()
    # the packed delta serialises to the same tensors and folds to the same model
    again = safetensors.torch.load(ssf.delta_to_bytes(packed))
    first = safetensors.torch.load(ssf.delta_to_bytes(delta))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    base = make("vit").state_dict()
    sites = list(spec.sites)
    a = ssf.fold_state_dict(base, sites, delta.sites, delta.head)
    b = ssf.fold_state_dict(base, sites, packed.sites, packed.head)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every task of a backbone shares one layout: a packed delta holds one tensor of its own for its sites
    other = ssf.packed(ssf.load_delta(ssf.delta_to_bytes(make_delta(model, spec)), spec), spec)
    assert other.sites.layout is packed.sites.layout  # type: ignore[attr-defined]
    with pytest.raises(KeyError):
        packed.sites["no.such.site"]
    # a delta made in half precision (delta_from_model on an fp16 model) packs in its own dtype
    half = dataclasses.replace(delta, sites={p: (s.half(), b.half()) for p, (s, b) in delta.sites.items()})
    packed_half = ssf.packed(half, spec)
    assert all(torch.equal(packed_half.sites[p][0], s) for p, (s, _) in half.sites.items())
    assert packed_half.sites.flat.dtype == torch.float16  # type: ignore[attr-defined]


def _retensor(data: bytes, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> bytes:
    tensors = safetensors.torch.load(data)
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    edit(tensors, meta)
    return safetensors.torch.save(tensors, metadata=meta)


def _first_site(t: dict[str, torch.Tensor]) -> str:
    return next(k for k in t if k.startswith("sites.") and k.endswith(".scale"))[: -len(".scale")]


def _nan(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t[_first_site(t) + ".shift"][3] = float("nan")


def _inf(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t["head.head.weight"][0, 0] = float("inf")


def _missing_site(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    site = _first_site(t)
    del t[site + ".scale"], t[site + ".shift"]


def _half_site(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    del t[_first_site(t) + ".shift"]


def _extra_site(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t["sites.blocks.9.mlp.fc1.scale"] = torch.ones(4)
    t["sites.blocks.9.mlp.fc1.shift"] = torch.ones(4)


def _wrong_site_shape(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    site = _first_site(t)
    t[site + ".scale"] = torch.ones(5)
    t[site + ".shift"] = torch.ones(5)


def _int_dtype(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t[_first_site(t) + ".scale"] = t[_first_site(t) + ".scale"].to(torch.int32)


def _stray_tensor(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t["backbone.blocks.0.attn.qkv.weight"] = torch.zeros(2)


def _head_shape(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    t["head.head.bias"] = torch.zeros(NUM_CLASSES + 1)


def _labels_vs_head(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["labels"] = json.dumps(["a", "b", "c"])


def _labels_not_list(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["labels"] = '{"a": 1}'


def _fingerprint(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["backbone_fingerprint"] = "sha256:" + "0" * 64


def _version(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["format_version"] = "2"


def _format(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["format"] = "lora"


def _no_metadata_field(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    del m["backbone_fingerprint"]


def _method(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    m["method"] = "adapter"


def _no_head(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    for k in [k for k in t if k.startswith("head.")]:
        del t[k]


BAD = [
    (_nan, "non_finite", "NaN"),
    (_inf, "non_finite", "head.head.weight"),
    (_missing_site, "missing_site", "lacks"),
    (_half_site, "missing_site", "both"),
    (_extra_site, "unknown_site", "blocks.9.mlp.fc1"),
    (_wrong_site_shape, "invalid_shape", "5 channels"),
    (_int_dtype, "invalid_dtype", "int32"),
    (_stray_tensor, "unexpected_tensor", "backbone.blocks"),
    (_head_shape, "invalid_shape", "'head.bias' has shape (8,)"),
    (_labels_vs_head, "labels_mismatch", "3 labels"),
    (_labels_not_list, "invalid_metadata", "labels"),
    (_fingerprint, "fingerprint_mismatch", "fingerprint"),
    (_version, "unsupported_version", "format_version '2'"),
    (_format, "unsupported_format", "lora"),
    (_no_metadata_field, "invalid_metadata", "backbone_fingerprint"),
    (_method, "invalid_metadata", "adapter"),
    (_no_head, "missing_head", "head"),
]


@pytest.mark.parametrize(("edit", "code", "fragment"), BAD, ids=[b[1] + ":" + b[0].__name__ for b in BAD])
def test_bad_delta_is_refused_with_its_reason(
    trained: tuple[torch.nn.Module, BackboneSpec], edit: Callable, code: str, fragment: str
) -> None:
    model, spec = trained
    data = _retensor(ssf.delta_to_bytes(make_delta(model, spec)), edit)
    with pytest.raises(ssf.DeltaError) as info:
        ssf.load_delta(data, spec)
    assert info.value.code == code
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "malformed_delta"),
        (b"\x00" * 7, "malformed_delta"),
        (struct.pack("<Q", 2**40) + b"{}", "malformed_delta"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "malformed_delta"),
        (struct.pack("<Q", 2) + b"[]", "malformed_delta"),
        (b"PK\x03\x04" + b"\x00" * 100, "malformed_delta"),  # a zip (torch.save's format)
        (b"\x80\x04\x95" + b"\x00" * 100, "malformed_delta"),  # a pickle stream
        # duplicate tensor names: our JSON parser and safetensors' could pick different entries
        (struct.pack("<Q", 41) + b'{"a":{"dtype":"F32"},"a":{"dtype":"F32"}}', "malformed_delta"),
    ],
)
def test_garbage_is_malformed(data: bytes, code: str) -> None:
    with pytest.raises(ssf.DeltaError) as info:
        ssf.parse_delta(data)
    assert info.value.code == code


def test_truncated_file_is_refused(trained: tuple[torch.nn.Module, BackboneSpec]) -> None:
    model, spec = trained
    data = ssf.delta_to_bytes(make_delta(model, spec))
    with pytest.raises(ssf.DeltaError) as info:
        ssf.parse_delta(data[: len(data) - 100])
    assert info.value.code == "malformed_delta"


def test_oversize_file_and_header_are_refused(trained: tuple[torch.nn.Module, BackboneSpec]) -> None:
    model, spec = trained
    data = ssf.delta_to_bytes(make_delta(model, spec))
    with pytest.raises(ssf.DeltaError, match="limit") as info:
        ssf.parse_delta(data, max_bytes=len(data) - 1)
    assert info.value.code == "delta_too_large"
    huge = make_delta(model, spec, labels=[f"label-{i:07d}" for i in range(NUM_CLASSES)])
    huge.metrics = {"blob": "x" * (5 * 1024 * 1024)}
    with pytest.raises(ssf.DeltaError, match="header length") as info:
        ssf.parse_delta(ssf.delta_to_bytes(huge))
    assert info.value.code == "malformed_delta"


def test_linear_probe_delta_is_head_only(trained: tuple[torch.nn.Module, BackboneSpec]) -> None:
    model, spec = trained
    delta = ssf.delta_from_model(
        model,
        task="probe",
        backbone=spec.model,
        backbone_fingerprint=spec.fingerprint,
        site_scheme="foldable",
        labels=[str(i) for i in range(NUM_CLASSES)],
        method="linear",
    )
    assert delta.sites == {}
    assert ssf.load_delta(ssf.delta_to_bytes(delta), spec).method == "linear"
    assert ssf.packed(delta, spec) is delta  # nothing to pack
    assert FORMAT_VERSION == "1"
