"""``ssf-export``: the merged ONNX graph matches PyTorch in ONNX Runtime; the timm file loads strictly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import timm
import torch

import ssf
from tests.helpers.deltas import model_from_delta
from tests.helpers.images import CLASSES
from tests.helpers.models import MODEL, backbone_file
from training import cli, export_cli


@pytest.fixture(scope="module")
def delta(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.images import make_folder

    root = tmp_path_factory.mktemp("export")
    folder = make_folder(root / "data", {"train": 3, "val": 1})
    out = root / "run"
    cli.main(
        ["--model", MODEL, "--weights", str(weights), "--data", f"imagefolder:{folder}", "--out", str(out)]
        + ["--epochs", "1", "--batch-size", "6", "--no-plots", "--lr", "0.05"]
    )
    return out / "delta.safetensors"


def _run(weights: Path, delta: Path, fmt: str, out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    export_cli.main(
        [
            "--model",
            MODEL,
            "--weights",
            str(weights),
            "--delta",
            str(delta),
            "--format",
            fmt,
            "--out",
            str(out),
        ]
    )
    return json.loads(capsys.readouterr().out)


def test_onnx_matches_pytorch_with_a_dynamic_batch(
    weights: Path, delta: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(weights, delta, "onnx", tmp_path / "task.onnx", capsys)
    assert report["max_abs_logit_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "task.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = torch.randn(3, 3, 160, 160)
    (got,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        want = model_from_delta(MODEL, weights, ssf.load_delta(delta))(x).numpy()
    assert got.shape == (3, len(CLASSES)) and np.abs(got - want).max() <= 1e-4


def test_timm_file_loads_strictly_and_matches(
    weights: Path, delta: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(weights, delta, "timm", tmp_path / "task.safetensors", capsys)
    assert report["created_biases"] == []
    plain = timm.create_model(MODEL, num_classes=len(CLASSES))
    plain.load_state_dict(safetensors.torch.load_file(str(tmp_path / "task.safetensors")), strict=True)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        want = model_from_delta(MODEL, weights, ssf.load_delta(delta))(x)
        assert torch.allclose(plain.eval()(x), want, atol=1e-4)


def test_delta_for_other_weights_is_refused(
    delta: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = backbone_file("vit", tmp_path, seed=1)
    with pytest.raises(SystemExit) as exc:
        export_cli.main(
            ["--model", MODEL, "--weights", str(other), "--delta", str(delta), "--format", "onnx"]
            + ["--out", str(tmp_path / "x.onnx")]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and "fingerprint" in err[0]
    assert not (tmp_path / "x.onnx").exists()


def test_not_a_delta_is_one_line(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(SystemExit):
        _run(weights, bad, "timm", tmp_path / "x.safetensors", capsys)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0]
