"""Backbone loading: local safetensors weights, clear refusals, a stable fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import ssf
from tests.helpers.models import make


def test_weights_round_trip_and_fingerprint(tmp_path: Path) -> None:
    model = make("vit")
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    loaded = ssf.create_backbone("test_vit", weights=path, num_classes=3)
    assert ssf.fingerprint(loaded) == ssf.fingerprint(model)  # head differs, fingerprint ignores it
    other = make("vit", seed=5)
    assert ssf.fingerprint(other) != ssf.fingerprint(model)
    ssf.inject_ssf(loaded)
    assert ssf.fingerprint(loaded) == ssf.fingerprint(model)  # attached sites are not the backbone


def test_fingerprint_covers_buffers_and_zero_dim_tensors() -> None:
    model = make("resnet")  # BatchNorm: running stats and the 0-dim num_batches_tracked
    before = ssf.fingerprint(model)
    model.bn1.running_mean.add_(1e-3)
    assert ssf.fingerprint(model) != before


def test_weights_for_another_model_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(make("resnet").state_dict(), str(path))
    with pytest.raises(ssf.BackboneError, match="another model"):
        ssf.create_backbone("test_vit", weights=path)


def test_wrong_shapes_and_bad_files_are_refused(tmp_path: Path) -> None:
    state = make("vit").state_dict()
    state["pos_embed"] = torch.zeros(1, 2, 2)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(ssf.BackboneError, match="pos_embed has shape"):
        ssf.create_backbone("test_vit", weights=path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ssf.BackboneError, match="not a readable safetensors"):
        ssf.create_backbone("test_vit", weights=tmp_path / "junk.safetensors")
    with pytest.raises(ssf.BackboneError, match="does not exist"):
        ssf.create_backbone("test_vit", weights=tmp_path / "missing.safetensors")


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ssf.BackboneError, match="does not know"):
        ssf.create_backbone("vit_gigantic_nonexistent")


def test_offline_pretrained_says_to_pass_weights() -> None:
    # a fresh process: huggingface_hub reads HF_HUB_OFFLINE at import, and offline it fails at once
    code = "import ssf\ntry:\n ssf.create_backbone('test_vit')\nexcept ssf.BackboneError as e:\n print(e)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "--weights" in out.stdout and "test_vit" in out.stdout
