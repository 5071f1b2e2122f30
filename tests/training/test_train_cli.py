"""``ssf-train`` end to end on a tiny model: every method trains; folding methods write deltas that fold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ssf
from tests.helpers.deltas import model_from_delta
from tests.helpers.images import CLASSES
from tests.helpers.models import MODEL
from training import cli, methods


def train(weights: Path, data: str, out: Path, *extra: str) -> dict:
    cli.main(
        ["--model", MODEL, "--weights", str(weights), "--data", data, "--out", str(out), "--epochs", "1"]
        + ["--batch-size", "6", "--no-plots", *extra]
    )
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", methods.METHODS)
def test_every_method_trains_and_writes_the_documented_files(
    method: str, weights: Path, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    summary = train(weights, f"imagefolder:{folder}", out, "--method", method)
    for key in ("method", "trainable_params", "val_acc", "test_acc", "epochs", "wall_seconds"):
        assert key in summary
    assert summary["method"] == method and summary["epochs"] == 1
    assert 0.0 <= summary["val_acc"] <= 1.0 and 0.0 <= summary["test_acc"] <= 1.0
    assert (out / "delta.safetensors").is_file() == (method in methods.FOLDING)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    total = summary["trainable_params"]
    head = summary["head_params"]
    assert head == 64 * len(CLASSES) + len(CLASSES)
    assert (total == head) == (method == "linear")


@pytest.mark.parametrize("method", ["ssf", "bias", "linear"])
def test_delta_loads_in_the_core_and_folds(method: str, weights: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(weights, f"imagefolder:{folder}", out, "--method", method, "--task-name", "tiny")
    backbone = ssf.create_backbone(MODEL, weights, len(CLASSES))
    spec = ssf.BackboneSpec.from_model(backbone, MODEL, "foldable")
    delta = ssf.load_delta(out / "delta.safetensors", spec)
    assert delta.task == "tiny" and delta.method == method and delta.labels == list(CLASSES)
    assert delta.preprocess["input_size"] == [3, 160, 160]
    assert delta.metrics["val_acc"] == summary["val_acc"]
    if method == "bias":
        assert all(torch.equal(scale, torch.ones_like(scale)) for scale, _ in delta.sites.values())
        assert any(shift.abs().sum() > 0 for _, shift in delta.sites.values())
    assert (not delta.sites) == (method == "linear")
    model = model_from_delta(MODEL, weights, delta)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        unfolded = model(x)
        folded = ssf.merge_model(model)(x) if delta.sites else unfolded
    assert torch.allclose(unfolded, folded, atol=1e-4)


def test_selects_on_val_and_learns(weights: Path, folder: Path, tmp_path: Path) -> None:
    """Three epochs on a colour task: the kept weights are the best val epoch's, not the last."""
    out = tmp_path / "run"
    summary = train(weights, f"imagefolder:{folder}", out, "--epochs", "3", "--lr", "0.05")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    best = max(history, key=lambda r: r["val_acc"])
    assert summary["val_acc"] == best["val_acc"] and summary["best_epoch"] == best["epoch"]
    assert summary["val_acc"] > 1 / len(CLASSES)


def test_plots_are_written(weights: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli.main(
        ["--model", MODEL, "--weights", str(weights), "--data", f"imagefolder:{folder}"]
        + ["--out", str(out), "--epochs", "1", "--batch-size", "6"]
    )
    for name in ("curves.png", "fold.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_from_the_checkpoint(weights: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(weights, f"imagefolder:{folder}", out)
    train(weights, f"imagefolder:{folder}", out, "--resume", "--epochs", "2")
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_dry_run_needs_no_data_or_weights(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["--dry-run", "--model", MODEL, "--num-classes", "5", "--method", "bias"])
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 5 and report["sites"] > 0
    assert report["trainable_params"] == report["site_params"] + report["head_params"]
    assert report["site_params"] * 2 == json.loads(_dry(capsys, "ssf"))["site_params"]


def _dry(capsys: pytest.CaptureFixture[str], method: str) -> str:
    cli.main(["--dry-run", "--model", MODEL, "--num-classes", "5", "--method", method])
    return capsys.readouterr().out
