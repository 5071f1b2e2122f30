"""The offline side of evaluation and shadow tests: a task's logits computed with the ssf core and timm's
own preprocessing (not the server's code), and the scores computed independently with numpy."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

import ssf
from tests.helpers.deltas import model_from_delta
from tests.helpers.models import MODEL


def offline_logits(weights: Path, delta_data: bytes, images: list[bytes]) -> np.ndarray:
    """The delta folded into the backbone by the ssf core, run on timm's eval transform of each image."""
    delta = ssf.parse_delta(delta_data)
    model = ssf.merge_model(model_from_delta(MODEL, weights, delta))
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    x = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():
        return model(x).double().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def expected_scores(logits: np.ndarray, truth: list[int], labels: list[str], bins: int) -> dict[str, object]:
    """Accuracy, per-class accuracy, confusion, mean confidence and ECE, written out the long way."""
    p = softmax(logits)
    pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    t = np.array(truth)
    k = len(labels)
    confusion = [[int(((t == i) & (pred == j)).sum()) for j in range(k)] for i in range(k)]
    per_class = {labels[i]: (float((pred[t == i] == i).mean()) if (t == i).any() else None) for i in range(k)}
    ece = 0.0
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        members = (conf > lo) & (conf <= hi)
        if members.any():
            ece += members.mean() * abs((pred[members] == t[members]).mean() - conf[members].mean())
    return {
        "accuracy": float((pred == t).mean()),
        "per_class_accuracy": per_class,
        "confusion": confusion,
        "mean_confidence": float(conf.mean()),
        "calibration_error": float(ece),
    }


def image_folder_zip(entries: list[tuple[str, bytes]]) -> bytes:
    """A zip holding ``entries`` (archive path, bytes), deflated."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return out.getvalue()
