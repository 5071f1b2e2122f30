"""One training loop for every method: AdamW, per-step cosine with linear warm-up, model selection on val.

Choices, and where they differ from the authors' timm 0.6.5 ``train.py``:

- The schedule is stepped per optimizer step, warm-up counted inside the cosine, and it has **no** hidden
  cooldown: timm 0.6.5 silently appends 10 epochs at ``min_lr`` (its scheduler returns
  ``epochs + cooldown_epochs``); ``--epochs N`` here means N epochs.
- No weight decay on 1-D tensors (scales, shifts, biases, norms, prompts' rows are 2-D and do decay).
- The best epoch is chosen on **validation**; the authors pick the best epoch on the test set.
- AMP (bf16 autocast) only on CUDA; optional EMA (timm's ModelEmaV3), whose weights are then the ones
  evaluated and kept, as in the authors' runs; gradient accumulation; torchrun DDP when WORLD_SIZE > 1.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a run, with its default in one place (recorded in summary.json)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-3
    min_lr: float = 1e-8
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    accum_steps: int = 1
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float | None = None
    seed: int = 42
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, those with fewer than 2 dims exempt from weight decay (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min_lr`` at ``total``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: str) -> float:
    """Top-1 accuracy over a loader (summed across ranks under DDP)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([correct, total], device=device)
        torch.distributed.all_reduce(t)
        correct, total = int(t[0]), int(t[1])
    return correct / max(1, total)


def _autocast(device: str) -> contextlib.AbstractContextManager:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def trainable_state(model: nn.Module, source: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Copies of ``model``'s trainable tensors (the only ones that change), read from ``source``.

    ``source`` is the EMA copy when there is one: its parameters are frozen, so the names come from
    ``model``.
    """
    values = dict((source or model).named_parameters())
    return {n: values[n].detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _mixer(cfg: TrainConfig, num_classes: int) -> Mixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if y.dim() == 2:  # soft targets from mixup/cutmix (smoothing already folded in)
        return torch.sum(-y * torch.log_softmax(logits, dim=-1), dim=-1).mean()
    return nn.functional.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)


@dataclass
class Run:
    """What the loop hands back: per-epoch records, the best val epoch and its accuracy."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_val_acc: float
    wall_seconds: float


def train(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    cfg: TrainConfig,
    num_classes: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    start_epoch: int = 0,
) -> Run:
    """Train ``model`` in place; at the end its trainable tensors are those of the best val epoch."""
    start = time.monotonic()
    device = cfg.device
    net = _maybe_ddp(model, device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.accum_steps))
    total, warmup = steps_per_epoch * cfg.epochs, int(steps_per_epoch * cfg.warmup_epochs)
    mixer = _mixer(cfg, num_classes)
    history: list[dict[str, Any]] = []
    best = (-1.0, -1, trainable_state(model))
    for epoch in range(start_epoch, cfg.epochs):
        loss = _epoch(
            net, opt, ema, train_loader, cfg, mixer, epoch, (epoch * steps_per_epoch, total, warmup)
        )
        judged = ema.module if ema is not None else model
        val_acc = evaluate(judged, val_loader, device)
        record = {"epoch": epoch + 1, "train_loss": loss, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"]}
        record["train_batches"] = len(train_loader)  # per rank: shows the sharding under torchrun
        record["elapsed_s"] = round(time.monotonic() - start, 2)
        history.append(record)
        log.info(json.dumps(record))
        if val_acc > best[0]:
            best = (val_acc, epoch + 1, trainable_state(model, judged))
        if on_epoch is not None:
            on_epoch(record)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in best[2].items():
            params[name].copy_(value)
    return Run(history, best[1], best[0], time.monotonic() - start)


def _epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    ema: ModelEmaV3 | None,
    loader: Any,
    cfg: TrainConfig,
    mixer: Mixup | None,
    epoch: int,
    sched: tuple[int, int, int],
) -> float:
    """One pass over the data; returns the mean training loss."""
    net.train()
    freeze_norm_statistics(net)
    step, total, warmup = sched
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(epoch)  # a new shuffle per epoch on every rank
    losses: list[float] = []
    bar = tqdm(_batches(loader, cfg.device), total=len(loader), desc=f"epoch {epoch + 1}", leave=False)
    for i, (x, y) in enumerate(bar):
        if mixer is not None and len(x) % 2 == 0:
            x, y = mixer(x, y)
        with _autocast(cfg.device):
            loss = _loss(net(x), y, cfg)
        (loss / cfg.accum_steps).backward()
        losses.append(loss.item())
        if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(loader):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(net.module if hasattr(net, "module") else net)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return sum(losses) / max(1, len(losses))


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put every normalisation layer with running statistics whose own parameters are frozen back in eval
    mode: a frozen backbone must stay bit-identical (its BatchNorm buffers included) while the tuned parts
    train, or the delta no longer fits the backbone it is served on. ``full`` fine-tuning trains the norms,
    so their statistics update as usual."""
    for module in model.modules():
        frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats and frozen:
            module.eval()


def _batches(loader: Any, device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def init_distributed(device: str) -> None:
    """Join the torchrun process group before any loader exists, so loaders shard with a
    DistributedSampler (built later, each rank would train on the whole set), and pin each rank to its own
    GPU (otherwise every rank's ``.to("cuda")`` lands on cuda:0)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def _maybe_ddp(model: nn.Module, device: str) -> nn.Module:
    """Wrap in DDP under torchrun (WORLD_SIZE > 1); a single process trains the model directly."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return model
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    ids = [int(os.environ.get("LOCAL_RANK", "0"))] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return copy.deepcopy(asdict(cfg))


def write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
