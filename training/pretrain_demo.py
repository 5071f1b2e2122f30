"""Pretrain the offline demo backbone: ``python -m training.pretrain_demo --out assets/demo``.

``ssf_demo_vit`` (ssf/models.py) is trained from scratch on the procedural ``upstream`` set (144 classes:
shape x colour x texture, rendered on the fly, so no image is ever seen twice) for a fixed wall-clock
budget on the CPU. It then proves it learned something transferable: a logistic-regression probe on its
pooled features classifies real handwritten digits (a domain it never saw) better than the same
architecture at its random init. The weights (fp32 safetensors, backbone only) and a ``pretrain.json``
with the recipe and the probe numbers are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
from torch import nn
from tqdm import tqdm

import ssf
from training import data, procedural

log = logging.getLogger(__name__)
MODEL = "ssf_demo_vit"


class Upstream(torch.utils.data.IterableDataset):
    """An endless stream of fresh upstream images (index = a counter, so every run is reproducible)."""

    def __init__(self, transform: Callable, seed: int) -> None:
        self.transform, self.seed = transform, seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        i = 0
        while True:
            img, label = procedural.render("upstream", i, self.seed)
            yield self.transform(img), label
            i += 1


@torch.no_grad()
def features(model: nn.Module, items: list, transform: Callable) -> np.ndarray:
    """Pooled pre-logit features of a list of (loader, label) items."""
    model.eval()
    ds = data.ImageList(items, transform)
    out = [
        model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=128)
    ]
    return torch.cat(out).numpy()


def probe_digits(model: nn.Module) -> float:
    """Test accuracy of a logistic-regression probe on frozen features of sklearn's digits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    splits = data.digits(per_class=30)
    _, evaluate = data.transforms(model, "vtab")
    assert splits.test is not None
    xtr, xte = features(model, splits.train, evaluate), features(model, splits.test, evaluate)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(xtr), [y for _, y in splits.train])
    return float(clf.score(scaler.transform(xte), [y for _, y in splits.test]))


def pretrain(minutes: float, batch_size: int, lr: float, seed: int) -> tuple[nn.Module, dict]:
    """Train from scratch for ``minutes`` of wall time with AdamW and a time-based cosine schedule."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=len(procedural.TASKS["upstream"]))
    before = probe_digits(model)
    log.info("digits probe at random init: %.3f", before)
    train_tf, _ = data.transforms(model, "vtab")
    stream = torch.utils.data.DataLoader(Upstream(train_tf, seed), batch_size=batch_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0}]
    )
    budget, start, step, seen, correct = minutes * 60, time.monotonic(), 0, 0, 0
    model.train()
    bar = tqdm(stream, desc="pretrain", unit="batch")
    for x, y in bar:
        frac = (time.monotonic() - start) / budget
        if frac >= 1:
            break
        warm = min(1.0, frac / 0.05)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, seen = step + 1, seen + len(y)
        correct = int((logits.argmax(1) == y).sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / len(y):.2f}")
    after = probe_digits(model)
    log.info("digits probe after pretraining: %.3f", after)
    report = {
        "model": MODEL,
        "upstream": "procedural:upstream (144 classes, fresh images every step)",
        "minutes": minutes,
        "steps": step,
        "images_seen": seen,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "last_batch_train_acc": correct / max(1, batch_size),
        "digits_probe_acc_random_init": before,
        "digits_probe_acc_pretrained": after,
    }
    return model, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/demo"))
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    model, report = pretrain(args.minutes, args.batch_size, args.lr, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ssf.backbone_state(model).items()}
    safetensors.torch.save_file(state, str(args.out / "backbone.safetensors"))
    model.reset_classifier(0)  # type: ignore[operator]
    report["fingerprint"] = ssf.fingerprint(model)
    (args.out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
