"""The committed offline demo: a backbone within budget and example deltas that load and fold on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import ssf
from ssf.layers import ScaleShift

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"


def test_backbone_is_small_and_fp32() -> None:
    path = DEMO / "backbone.safetensors"
    assert path.stat().st_size <= 20 * 2**20
    model = ssf.create_backbone("ssf_demo_vit", path, num_classes=3)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    report = json.loads((DEMO / "pretrain.json").read_text())
    assert report["fingerprint"] == ssf.fingerprint(model)


def test_example_deltas_load_and_fold_on_the_backbone() -> None:
    tasks = sorted((DEMO / "tasks").glob("*.safetensors"))
    assert len(tasks) >= 3 and "digits.safetensors" in [t.name for t in tasks]
    for path in tasks:
        delta = ssf.load_delta(path)
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", delta.task) and delta.task == path.stem
        model = ssf.create_backbone("ssf_demo_vit", DEMO / "backbone.safetensors", delta.num_classes)
        ssf.load_delta(path, ssf.BackboneSpec.from_model(model, "ssf_demo_vit", delta.site_scheme))
        ssf.inject_ssf(model, delta.site_scheme)
        container = model.get_submodule("ssf")
        assert isinstance(container, torch.nn.ModuleDict)
        for key, affine in container.items():
            assert isinstance(affine, ScaleShift)
            affine.scale.data.copy_(delta.sites[key.replace("/", ".")][0])
            affine.shift.data.copy_(delta.sites[key.replace("/", ".")][1])
        model.load_state_dict(delta.head, strict=False)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(model.eval()(x), ssf.merge_model(model)(x), atol=1e-4)
        assert delta.preprocess["input_size"] == [3, 64, 64]
