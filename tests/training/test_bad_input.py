"""Every bad input to ``ssf-train`` is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.images import make_folder
from tests.helpers.models import MODEL, backbone_file
from training import cli


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("ssf-train: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    return errors[0]


def base(weights: Path, data: str, out: Path) -> list[str]:
    return ["--model", MODEL, "--weights", str(weights), "--data", data, "--out", str(out), "--no-plots"]


def test_missing_train_folder(capsys: pytest.CaptureFixture[str], weights: Path, tmp_path: Path) -> None:
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    msg = fails(capsys, *base(weights, f"imagefolder:{tmp_path / 'data'}", tmp_path / "o"))
    assert "train" in msg and "missing" in msg


def test_empty_split_folder(capsys: pytest.CaptureFixture[str], weights: Path, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"train": 2})
    (root / "val").mkdir()
    msg = fails(capsys, *base(weights, f"imagefolder:{root}", tmp_path / "o"))
    assert "val" in msg and "no class" in msg


def test_empty_class_folder(capsys: pytest.CaptureFixture[str], weights: Path, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"train": 2})
    (root / "train" / "zebra").mkdir()
    assert "zebra" in fails(capsys, *base(weights, f"imagefolder:{root}", tmp_path / "o"))


def test_single_class(capsys: pytest.CaptureFixture[str], weights: Path, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"train": 3}, classes=("only",))
    assert "single class" in fails(capsys, *base(weights, f"imagefolder:{root}", tmp_path / "o"))


def test_unreadable_image(capsys: pytest.CaptureFixture[str], weights: Path, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"train": 2, "val": 1})
    (root / "train" / "ant" / "broken.png").write_bytes(b"not a png at all")
    assert "broken.png" in fails(capsys, *base(weights, f"imagefolder:{root}", tmp_path / "o"))


def test_class_count_changes_on_resume(
    capsys: pytest.CaptureFixture[str], weights: Path, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    cli.main([*base(weights, f"imagefolder:{folder}", out), "--epochs", "1", "--batch-size", "6"])
    other = make_folder(tmp_path / "four", {"train": 2, "val": 1}, classes=("a", "b", "c", "d"))
    msg = fails(capsys, *base(weights, f"imagefolder:{other}", out), "--resume", "--epochs", "2")
    assert "class count changed" in msg and "3" in msg and "4" in msg


def test_unknown_model_and_unknown_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    msg = fails(capsys, "--model", "no_such_net", "--data", "digits", "--out", str(tmp_path / "o"))
    assert "no_such_net" in msg
    msg = fails(capsys, "--model", MODEL, "--data", "mnist", "--out", str(tmp_path / "o"))
    assert "mnist" in msg


def test_weights_for_another_model(capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path) -> None:
    path = backbone_file("convnext", tmp_path)
    msg = fails(capsys, *base(path, f"imagefolder:{folder}", tmp_path / "o"))
    assert "another model" in msg


def test_bad_task_name_and_numbers(
    capsys: pytest.CaptureFixture[str], weights: Path, folder: Path, tmp_path: Path
) -> None:
    args = base(weights, f"imagefolder:{folder}", tmp_path / "o")
    assert "task name" in fails(capsys, *args, "--task-name", "Bad Name!")
    assert "--epochs" in fails(capsys, *args, "--epochs", "0")


def test_console_error_has_no_traceback(tmp_path: Path) -> None:
    """The real process: one stderr line for a data folder that does not exist."""
    out = subprocess.run(
        [sys.executable, "-m", "training.cli", "--model", MODEL, "--data", f"imagefolder:{tmp_path / 'x'}"]
        + ["--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "does not exist" in out.stderr
