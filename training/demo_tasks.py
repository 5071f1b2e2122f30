"""``python -m training.demo_tasks``: the example task deltas shipped with the offline demo.

Trains SSF with ``ssf-train`` on the committed demo backbone for three tasks (real handwritten digits and
two procedural ones) and copies each ``delta.safetensors`` to ``assets/demo/tasks/<task>.safetensors``,
which the server's demo uploads. Run after ``python -m training.pretrain_demo`` (a new backbone has a new
fingerprint, so its deltas must be retrained).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from training import cli

TASKS = {"digits": "digits:30", "shapes": "procedural:shape:20", "count": "procedural:count:20"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("assets/demo"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("runs/demo_tasks"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    (args.demo / "tasks").mkdir(parents=True, exist_ok=True)
    report = {}
    for task, data in TASKS.items():
        out = args.work / task
        argv_ = ["--model", "ssf_demo_vit", "--weights", str(args.demo / "backbone.safetensors")]
        argv_ += ["--data", data, "--out", str(out), "--task-name", task, "--method", "ssf"]
        argv_ += ["--epochs", str(args.epochs), "--lr", "1e-2", "--seed", "0", "--no-plots"]
        summary = cli.run(cli.parser().parse_args(argv_))
        shutil.copyfile(out / "delta.safetensors", args.demo / "tasks" / f"{task}.safetensors")
        report[task] = {k: summary[k] for k in ("data", "val_acc", "test_acc", "epochs", "wall_seconds")}
        report[task]["trainable_params"] = summary["trainable_params"]
        print(f"[demo_tasks] {task}: test {summary['test_acc']:.3f}", flush=True)
    (args.demo / "tasks.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
