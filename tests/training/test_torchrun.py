"""``ssf-train`` under torchrun (2 CPU ranks, gloo): the data is sharded and one rank writes the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ssf
from tests.helpers.models import MODEL

ROOT = Path(__file__).resolve().parents[2]


def test_two_ranks_shard_the_data_and_write_one_delta(weights: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "training.cli", "--model", MODEL, "--weights", str(weights), "--device", "cpu"]
    cmd += ["--data", f"imagefolder:{folder}", "--out", str(out), "--epochs", "1", "--batch-size", "2"]
    cmd += ["--no-plots", "--task-name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # 12 train images, batch 2: 6 batches on one process, 3 per rank when the sampler shards.
    assert record["train_batches"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 12 and 0.0 <= summary["test_acc"] <= 1.0
    assert ssf.load_delta(out / "delta.safetensors").task == "ddp"
