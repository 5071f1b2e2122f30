"""Everything ``ssf-train`` writes under ``--out``, and reading it back for ``--resume``.

The checkpoint holds only the trainable tensors (the backbone is frozen and named by its fingerprint) plus
metadata saying which method, epoch and labels they belong to, so a resume that would silently change the
task (another class list, another method) is refused. The optimizer state is not kept: a resumed run
restarts AdamW's moments (said here because it changes the trajectory slightly).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

import ssf
from training.loop import trainable_state, write_jsonl

CHECKPOINT = "checkpoint.safetensors"


class ResumeError(ValueError):
    """The checkpoint in --out does not belong to this run."""


class Outputs:
    """The files of one run in ``root``; only the main process (rank 0) writes."""

    def __init__(self, root: Path, method: str, labels: list[str], main: bool = True) -> None:
        self.root, self.method, self.labels, self.main = root, method, labels, main
        self.epoch = 0

    def fresh(self) -> int:
        if self.main:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "metrics.jsonl").unlink(missing_ok=True)
        return 0

    def resume(self, model: nn.Module) -> int:
        """Load the last checkpoint into ``model``; returns the number of epochs already done."""
        path = self.root / CHECKPOINT
        if not path.is_file():
            raise ResumeError(f"--resume but {str(path)!r} does not exist")
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
        labels = json.loads(meta.get("labels", "[]"))
        if len(labels) != len(self.labels):
            raise ResumeError(
                f"the class count changed on resume: the checkpoint has {len(labels)} classes, "
                f"the data has {len(self.labels)}"
            )
        if labels != self.labels or meta.get("method") != self.method:
            raise ResumeError(
                f"the checkpoint is for method {meta.get('method')!r} with labels {labels[:4]}, "
                f"not {self.method!r} with {self.labels[:4]}"
            )
        params = dict(model.named_parameters())
        if set(tensors) != {n for n, p in params.items() if p.requires_grad}:
            raise ResumeError("the checkpoint's tensors do not match this model and method")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        self.epoch = int(meta.get("epoch", "0"))
        return self.epoch

    def epoch_hook(self, model: nn.Module) -> Callable[[dict[str, Any]], None]:
        """Called after every epoch: append to metrics.jsonl and refresh the checkpoint."""

        def hook(record: dict[str, Any]) -> None:
            if not self.main:
                return
            write_jsonl(self.root / "metrics.jsonl", record)
            meta = {"method": self.method, "labels": json.dumps(self.labels), "epoch": str(record["epoch"])}
            state = {k: v.cpu().contiguous() for k, v in trainable_state(model).items()}
            safetensors.torch.save_file(state, str(self.root / CHECKPOINT), metadata=meta)

        return hook

    def write_delta(
        self,
        model: nn.Module,
        task: str,
        backbone: str,
        backbone_fingerprint: str,
        scheme: str,
        preprocess: dict[str, Any],
        metrics: dict[str, Any],
    ) -> Path:
        """The delta, checked against the backbone it was trained on before it is written."""
        delta = ssf.delta_from_model(
            model,
            task=task,
            backbone=backbone,
            backbone_fingerprint=backbone_fingerprint,
            site_scheme=scheme,
            labels=self.labels,
            method=self.method,
            preprocess=preprocess,
            metrics=metrics,
        )
        path = self.root / "delta.safetensors"
        ssf.save_delta(delta, path)
        ssf.load_delta(path, ssf.BackboneSpec.from_model(model, backbone, scheme))
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def write_plots(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        from training import plots  # matplotlib is slow to import; only runs that plot pay for it

        plots.curves(history, self.root / "curves.png")
        if self.method in ("ssf", "bias") and hasattr(model, ssf.layers.CONTAINER):
            plots.fold_distribution(model, self.root / "fold.png")
