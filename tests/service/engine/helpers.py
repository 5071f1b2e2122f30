"""Engine test kit: an in-memory TaskStore, backbones with random weights on disk, deltas made with the
ssf core (random scale/shift with std 0.3 and random heads), and real images encoded by Pillow."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.models import register_model
from torch import nn

import ssf
from service.store.base import StoredTask, TaskExists, TaskNotFound
from tests.ssf.models import make


@register_model
def engine_test_swin(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A small Swin (timm has no test_swin): 64 px, window 4, so window batches are k*B."""
    args: dict[str, Any] = dict(
        embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2), img_size=64, window_size=4
    )
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **dict(args, **kwargs))


FAMILY_VIT = "vit"
MODELS = {"vit": "test_vit", "convnext": "test_convnext", "resnet": "test_resnet", "swin": "engine_test_swin"}


class MemoryStore:
    """The smallest TaskStore: versions immutable, replace makes n+1 atomically."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, StoredTask] = {}
        self._bytes: dict[tuple[str, int], bytes] = {}
        self._callbacks: list[Callable[[str], None]] = []

    def put(self, name: str, data: bytes, info: dict[str, Any], *, replace: bool = False) -> StoredTask:
        with self._lock:
            current = self._tasks.get(name)
            if current is not None and not replace:
                raise TaskExists(name)
            version = 1 if current is None else current.version + 1
            stored = StoredTask(
                name=name,
                version=version,
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                info=dict(info),
            )
            self._tasks[name] = stored
            self._bytes[(name, version)] = data
            return stored

    def get(self, name: str) -> StoredTask:
        with self._lock:
            if name not in self._tasks:
                raise TaskNotFound(name)
            return self._tasks[name]

    def read(self, name: str, version: int) -> bytes:
        with self._lock:
            if (name, version) not in self._bytes:
                raise TaskNotFound(name)
            return self._bytes[(name, version)]

    def delete(self, name: str) -> None:
        with self._lock:
            if self._tasks.pop(name, None) is None:
                raise TaskNotFound(name)

    def list(self) -> list[StoredTask]:
        with self._lock:
            return [self._tasks[n] for n in sorted(self._tasks)]

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {n: t.version for n, t in self._tasks.items()}

    def watch(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        pass


def backbone_file(family: str, directory: Path) -> Path:
    """Random (seeded) backbone weights for one family, as a safetensors state_dict."""
    path = directory / f"{family}.safetensors"
    if not path.exists():
        model = make_backbone(family)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_backbone(family: str) -> nn.Module:
    if family == "swin":
        torch.manual_seed(0)
        model = timm.create_model(MODELS["swin"], num_classes=7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn_like(p) * (0.1 if name.endswith("bias") or p.dim() < 2 else 0.02))
        return model.eval()
    return make(family)


def make_task(
    family: str, seed: int, num_classes: int = 5, method: str = "ssf", std: float = 0.3
) -> nn.Module:
    """A backbone with SSF sites of random scale/shift and a random head of ``num_classes``."""
    model = make_backbone(family)
    model.reset_classifier(num_classes)
    g = torch.Generator().manual_seed(1000 + seed)
    ssf.inject_ssf(model, "foldable")
    with torch.no_grad():
        for affine in model.ssf.values():
            if method == "ssf":
                affine.scale.copy_(1 + std * torch.randn(affine.scale.shape, generator=g))
                affine.shift.copy_(std * torch.randn(affine.shift.shape, generator=g))
            else:
                affine.scale.fill_(1)
                affine.shift.fill_(0)
        for name, p in model.named_parameters():
            if name.startswith(ssf.head_prefix(model) + "."):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1))
    return model.eval()


def delta_bytes(family: str, model: nn.Module, task: str, method: str = "ssf") -> bytes:
    delta = ssf.delta_from_model(
        model,
        task=task,
        backbone=MODELS[family],
        backbone_fingerprint=ssf.fingerprint(model),
        site_scheme="foldable",
        labels=[f"{task}-class{i}" for i in range(model.num_classes)],
        method=method,
    )
    return ssf.delta_to_bytes(delta)


def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Offline reference: the folded plain timm model (ssf.merge_model)."""
    with torch.no_grad():
        return ssf.merge_model(model)(x)


def encode(fmt: str, seed: int, size: tuple[int, int] = (80, 60), **save: Any) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format=fmt, **save)
    return out.getvalue()


def images(n: int, seed: int = 0) -> list[bytes]:
    formats = ["JPEG", "PNG", "WEBP", "BMP"]
    return [encode(formats[i % 4], seed * 100 + i) for i in range(n)]
