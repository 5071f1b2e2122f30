"""`ssf-train --dry-run` reports the paper's budgets from the command line (architecture only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def dry_run(*args: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "training.cli", "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    ("model", "classes", "expected"),
    [
        (
            "vit_base_patch16_224",
            100,
            {"trainable_params": 282_724, "site_params": 205_824, "head_params": 76_900, "sites": 74},
        ),
        ("vit_base_patch16_224", 1000, {"trainable_params": 974_824}),
        ("swin_base_patch4_window7_224", 100, {"trainable_params": 369_764}),
        ("convnext_base", 100, {"trainable_params": 359_780}),
    ],
)
def test_dry_run_reproduces_paper_counts(model: str, classes: int, expected: dict[str, int]) -> None:
    report = dry_run("--model", model, "--num-classes", str(classes), "--sites", "paper")
    assert report["num_classes"] == classes
    assert {k: report[k] for k in expected} == expected


def test_dry_run_unknown_model_is_one_line_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training.cli", "--dry-run", "--model", "no_such_model", "--num-classes", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "no_such_model" in out.stderr
