"""Backbone loading: local safetensors weights, clear refusals, a stable fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import ssf
from tests.ssf.models import make


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


def test_unknown_model_and_offline_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ssf.BackboneError, match="does not know"):
        ssf.create_backbone("vit_gigantic_nonexistent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ssf.BackboneError, match="--weights"):
        ssf.create_backbone("test_vit")
