"""The task delta file: format "ssf-delta", version 1 (one safetensors file, no pickle).

Tensors: ``sites.<module path>.scale`` / ``.shift`` (shape (C,)) and the head as ``head.<state_dict name>``.
``__metadata__`` holds strings (JSON where structured): format, format_version, task, backbone,
backbone_fingerprint, site_scheme, method, labels, preprocess, metrics, created_at.

All validation of deltas happens here, once: ``parse_delta`` checks the file on its own, and
``check_compatible`` checks it against the backbone that will serve it. Every refusal is a
``DeltaError`` whose ``code`` says what kind of problem it is and whose message names the offending part.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import nn

from ssf.backbone import fingerprint
from ssf.layers import head_tensors, site_tensors
from ssf.sites import Site, find_sites, head_prefix

FORMAT = "ssf-delta"
FORMAT_VERSION = "1"
MAX_DELTA_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
METHODS = ("ssf", "linear", "bias")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REQUIRED = (
    "format",
    "format_version",
    "task",
    "backbone",
    "backbone_fingerprint",
    "site_scheme",
    "method",
    "labels",
)


class DeltaError(ValueError):
    """A delta that cannot be used. ``code`` is a stable snake_case kind; the message names the problem."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Delta:
    task: str
    backbone: str
    backbone_fingerprint: str
    site_scheme: str
    method: str
    labels: list[str]
    sites: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # a dict, or ``PackedSites`` (``packed``)
    head: dict[str, torch.Tensor]
    preprocess: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "backbone": self.backbone,
            "backbone_fingerprint": self.backbone_fingerprint,
            "site_scheme": self.site_scheme,
            "method": self.method,
            "labels": json.dumps(self.labels),
            "preprocess": json.dumps(self.preprocess),
            "metrics": json.dumps(self.metrics),
            "created_at": self.created_at,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, (scale, shift) in self.sites.items():
            out[f"sites.{path}.scale"] = scale.detach().float().cpu().contiguous()
            out[f"sites.{path}.shift"] = shift.detach().float().cpu().contiguous()
        for name, t in self.head.items():
            out[f"head.{name}"] = t.detach().float().cpu().contiguous()
        return dict(sorted(out.items()))  # canonical order: the same delta always has the same bytes


def delta_to_bytes(delta: Delta) -> bytes:
    return safetensors.torch.save(delta.tensors(), metadata=delta.metadata())


def save_delta(delta: Delta, path: str | Path) -> None:
    Path(path).write_bytes(delta_to_bytes(delta))


# ---------------------------------------------------------------------------------------------- parsing


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Two parsers (ours, safetensors') must never disagree on which of two same-named entries wins."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise json.JSONDecodeError("duplicate key in header", "", 0)
    return out


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise DeltaError("malformed_delta", f"not a safetensors file: {len(data)} bytes, no header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        raise DeltaError("malformed_delta", f"not a safetensors file: header length {n} is impossible here")
    try:
        header = json.loads(data[8 : 8 + n], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeltaError("malformed_delta", f"not a safetensors file: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise DeltaError("malformed_delta", "not a safetensors file: header is not a JSON object")
    return header


def _json_field(meta: Mapping[str, str], key: str, kind: type, default: Any) -> Any:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DeltaError("invalid_metadata", f"metadata {key!r} is not valid JSON ({e.msg})") from e
    if not isinstance(value, kind):
        raise DeltaError("invalid_metadata", f"metadata {key!r} must be a JSON {kind.__name__}")
    return value


def _labels(meta: Mapping[str, str]) -> list[str]:
    labels = _json_field(meta, "labels", list, None)
    if not labels:
        raise DeltaError("invalid_labels", "metadata 'labels' must be a non-empty JSON list of class names")
    if len(labels) > MAX_LABELS:
        raise DeltaError("too_many_labels", f"{len(labels)} labels; at most {MAX_LABELS} are allowed")
    if not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels):
        raise DeltaError(
            "invalid_labels", f"every label must be a string of 1 to {MAX_LABEL_CHARS} characters"
        )
    return labels


def _check_metadata(meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DeltaError("invalid_metadata", "the safetensors __metadata__ must map names to strings")
    missing = [k for k in _REQUIRED if not meta.get(k)]
    if missing:
        raise DeltaError("invalid_metadata", f"metadata is missing {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise DeltaError("unsupported_format", f"format is {meta['format'][:40]!r}, expected {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DeltaError(
            "unsupported_version",
            f"format_version {meta['format_version'][:20]!r} is not supported "
            f"(this build reads {FORMAT_VERSION})",
        )
    if meta["method"] not in METHODS:
        raise DeltaError(
            "invalid_metadata", f"method {meta['method'][:40]!r} does not fold; expected {METHODS}"
        )
    return meta


def parse_delta(data: bytes, max_bytes: int = MAX_DELTA_BYTES) -> Delta:
    """Read and check a delta on its own (format, metadata, names, dtypes, finiteness, labels)."""
    if len(data) > max_bytes:
        raise DeltaError("delta_too_large", f"delta is {len(data)} bytes; the limit is {max_bytes}")
    meta = _check_metadata(_header(data).get("__metadata__"))
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # the Rust parser's errors carry no stable type; all mean a broken file
        raise DeltaError("malformed_delta", f"unreadable safetensors data ({str(e)[:200]})") from e
    sites: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise DeltaError("invalid_dtype", f"tensor {name!r} has dtype {t.dtype}; expected a float type")
        if not torch.isfinite(t).all():
            raise DeltaError("non_finite", f"tensor {name!r} has NaN or infinite values")
        t = t.float()
        if name.startswith("sites.") and name.endswith((".scale", ".shift")):
            path, kind = name[len("sites.") :].rsplit(".", 1)
            if t.dim() != 1:
                raise DeltaError(
                    "invalid_shape", f"tensor {name!r} has shape {tuple(t.shape)}; expected (C,)"
                )
            sites.setdefault(path, {})[kind] = t
        elif name.startswith("head.") and len(name) > len("head."):
            head[name[len("head.") :]] = t
        else:
            raise DeltaError(
                "unexpected_tensor", f"tensor {name!r} is neither sites.<path>.scale|shift nor head.*"
            )
    pairs = {}
    for path, d in sites.items():
        if set(d) != {"scale", "shift"}:
            raise DeltaError("missing_site", f"site {path!r} needs both .scale and .shift")
        if d["scale"].shape != d["shift"].shape:
            raise DeltaError("invalid_shape", f"site {path!r}: scale and shift have different shapes")
        pairs[path] = (d["scale"], d["shift"])
    if not head:
        raise DeltaError("missing_head", "the delta has no head.* tensors")
    return Delta(
        task=meta["task"],
        backbone=meta["backbone"],
        backbone_fingerprint=meta["backbone_fingerprint"],
        site_scheme=meta["site_scheme"],
        method=meta["method"],
        labels=_labels(meta),
        sites=pairs,
        head=head,
        preprocess=_json_field(meta, "preprocess", dict, {}),
        metrics=_json_field(meta, "metrics", dict, {}),
        created_at=meta.get("created_at", ""),
    )


# -------------------------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class SiteLayout:
    """Where each site's channels sit in a packed delta: one layout per backbone, shared by all its tasks."""

    bounds: dict[str, tuple[int, int]]  # path -> (start, end) column, in the backbone's site order
    channels: int

    @classmethod
    def of(cls, sites: Sequence[Site]) -> SiteLayout:
        bounds, start = {}, 0
        for site in sites:
            bounds[site.path] = (start, start + site.channels)
            start += site.channels
        return cls(bounds, start)


class PackedSites(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """A delta's sites as one ``[2, channels]`` tensor (row 0 the scales, row 1 the shifts) in a shared
    ``SiteLayout``; reading a site gives views into it. A server holding thousands of tasks keeps two
    objects a task here instead of three a site: a full garbage collection walks every tracked object
    with the interpreter held, and each small tensor costs its own allocation besides its data."""

    __slots__ = ("flat", "layout")

    def __init__(self, layout: SiteLayout, flat: torch.Tensor) -> None:
        self.layout, self.flat = layout, flat

    def __getitem__(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.layout.bounds[path]
        return self.flat[0, start:end], self.flat[1, start:end]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.bounds)

    def __len__(self) -> int:
        return len(self.layout.bounds)


def packed(delta: Delta, spec: BackboneSpec) -> Delta:
    """``delta`` (checked against ``spec``) with its sites in one tensor (``PackedSites``); a head-only
    delta as it is. The values are the same, bit for bit."""
    if not delta.sites:
        return delta
    layout = spec.layout
    flat = torch.empty(2, layout.channels, dtype=next(iter(delta.sites.values()))[0].dtype)
    for path, (start, end) in layout.bounds.items():
        scale, shift = delta.sites[path]
        flat[0, start:end] = scale
        flat[1, start:end] = shift
    return replace(delta, sites=PackedSites(layout, flat))


# -------------------------------------------------------------------------------------- compatibility


@dataclass(frozen=True)
class BackboneSpec:
    """What a delta must match: the backbone's name, fingerprint, sites and head layout."""

    model: str
    fingerprint: str
    site_scheme: str
    sites: tuple[Site, ...]
    head_prefix: str
    classifier_key: str  # state_dict name of the classifier weight, whose first dim is the class count

    @classmethod
    def from_model(cls, model: nn.Module, name: str, site_scheme: str = "foldable") -> BackboneSpec:
        classifier = model.get_classifier()  # type: ignore[operator]
        key = next(n for n, m in model.named_modules() if m is classifier)
        return cls(
            model=name,
            fingerprint=fingerprint(model),
            site_scheme=site_scheme,
            sites=tuple(find_sites(model, site_scheme)),
            head_prefix=head_prefix(model),
            classifier_key=f"{key}.weight",
        )

    @cached_property
    def layout(self) -> SiteLayout:
        """Where each site sits in a packed delta (``packed``)."""
        return SiteLayout.of(self.sites)

    def head_shapes(self, num_classes: int) -> dict[str, tuple[int, ...]]:
        return _head_shapes(self.model, self.head_prefix, num_classes)


@lru_cache(maxsize=256)
def _head_shapes(model: str, prefix: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = timm.create_model(model, pretrained=False, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith(prefix + ".")}


def check_compatible(delta: Delta, spec: BackboneSpec) -> None:
    """Refuse a delta that the backbone described by ``spec`` cannot serve, naming the first problem."""
    if delta.backbone_fingerprint != spec.fingerprint:
        raise DeltaError(
            "fingerprint_mismatch",
            f"delta was trained on backbone {delta.backbone!r} with fingerprint "
            f"{delta.backbone_fingerprint[:23]}..., this server runs {spec.model!r} "
            f"with {spec.fingerprint[:23]}...",
        )
    _check_sites(delta, spec)
    expected = spec.head_shapes(delta.num_classes)
    if set(delta.head) != set(expected):
        missing, extra = sorted(set(expected) - set(delta.head)), sorted(set(delta.head) - set(expected))
        raise DeltaError(
            "invalid_head", f"head tensors do not match the model: missing {missing}, extra {extra}"
        )
    classifier = delta.head.get(spec.classifier_key)
    if classifier is not None and classifier.shape[0] != delta.num_classes:
        raise DeltaError(
            "labels_mismatch",
            f"the head has {classifier.shape[0]} classes but the delta lists {delta.num_classes} labels",
        )
    for name, shape in expected.items():
        if tuple(delta.head[name].shape) != shape:
            raise DeltaError(
                "invalid_shape",
                f"head tensor {name!r} has shape {tuple(delta.head[name].shape)}; expected {shape}",
            )


def _check_sites(delta: Delta, spec: BackboneSpec) -> None:
    if not delta.sites and delta.method == "linear":
        return  # a linear probe is head-only
    want = {s.path: s.channels for s in spec.sites}
    missing = [p for p in want if p not in delta.sites]
    extra = [p for p in delta.sites if p not in want]
    if extra:
        raise DeltaError(
            "unknown_site", f"delta has {len(extra)} sites this backbone lacks, e.g. {extra[0]!r}"
        )
    if missing:
        raise DeltaError(
            "missing_site", f"delta lacks {len(missing)} of the backbone's sites, e.g. {missing[0]!r}"
        )
    for path, (scale, _) in delta.sites.items():
        if scale.numel() != want[path]:
            raise DeltaError(
                "invalid_shape",
                f"site {path!r} has {scale.numel()} channels; the backbone's op has {want[path]}",
            )


def load_delta(
    source: bytes | str | Path, spec: BackboneSpec | None = None, max_bytes: int = MAX_DELTA_BYTES
) -> Delta:
    """Parse a delta from bytes or a path and, given a spec, check it against that backbone."""
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if path.stat().st_size > max_bytes:
            raise DeltaError(
                "delta_too_large", f"{path.name} is {path.stat().st_size} bytes; the limit is {max_bytes}"
            )
        data = path.read_bytes()
    delta = parse_delta(data, max_bytes)
    if spec is not None:
        check_compatible(delta, spec)
    return delta


def delta_from_model(
    model: nn.Module,
    *,
    task: str,
    backbone: str,
    backbone_fingerprint: str,
    site_scheme: str,
    labels: list[str],
    method: str = "ssf",
    preprocess: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    sites: Callable[[nn.Module], dict[str, tuple[torch.Tensor, torch.Tensor]]] = site_tensors,
) -> Delta:
    """Package a trained model's sites and head as a delta."""
    return Delta(
        task=task,
        backbone=backbone,
        backbone_fingerprint=backbone_fingerprint,
        site_scheme=site_scheme,
        method=method,
        labels=list(labels),
        sites={} if method == "linear" else sites(model),
        head=head_tensors(model),
        preprocess=preprocess or {},
        metrics=metrics or {},
    )
