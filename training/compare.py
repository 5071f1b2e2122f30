"""``python -m training.compare``: all seven methods on the offline suite, a table shaped like Tables 3-4.

Every method trains with the same loop, data, epochs and seed on the committed demo backbone
(``assets/demo/backbone.safetensors``, ``ssf_demo_vit``), model selection on val, accuracy on test. The
table (top-1 test accuracy per task, the mean, trainable parameters, wall time) goes into BENCHMARKS.md
through ``bench.report``. Budget: about 12 minutes on 2 shared CPU cores, so the subsets are small
(``--per-class`` train images per class) and the epochs few; the numbers rank methods on this tiny
backbone and data, not on ViT-B/16 and VTAB.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from training import cli, methods

BACKBONE = Path("assets/demo/backbone.safetensors")
MODEL = "ssf_demo_vit"
TASKS = ("digits", "shape", "count")
# Per-method peak learning rates (the paper's habit: SSF/BitFit/VPT ~10-100x full fine-tuning's).
LR = {"full": 3e-4, "linear": 1e-2, "bias": 1e-2, "ssf": 1e-2, "adapter": 5e-3}
LR_VPT = 1e-2


def spec(task: str, per_class: int) -> str:
    return f"digits:{per_class}" if task == "digits" else f"procedural:{task}:{per_class}"


def run_one(task: str, method: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    out = root / f"{task}-{method}"
    lr = LR.get(method, LR_VPT)
    argv = ["--model", MODEL, "--weights", str(args.weights), "--data", spec(task, args.per_class)]
    argv += ["--out", str(out), "--method", method, "--epochs", str(args.epochs), "--lr", str(lr)]
    argv += [
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--no-plots",
        "--task-name",
        task,
    ]
    argv += ["--warmup-epochs", "1"]
    return cli.run(cli.parser().parse_args(argv))


def random_init(root: Path, seed: int) -> Path:
    """The demo architecture at its random init: the control that shows what pretraining gives SSF."""
    import safetensors.torch
    import timm

    import ssf

    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=0)
    path = root / "random_init.safetensors"
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ssf.backbone_state(model).items()}
    safetensors.torch.save_file(state, str(path))
    return path


def table(results: dict[str, dict[str, dict[str, Any]]], tasks: tuple[str, ...]) -> str:
    """Rows: methods; columns: tasks, mean, trainable params (mean over tasks: heads differ), wall time."""
    head = "| Method | " + " | ".join(tasks) + " | Mean | Params (K) | Wall (s) |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for method, by_task in results.items():
        accs = [100 * by_task[t]["test_acc"] for t in tasks]
        params = statistics.mean(by_task[t]["trainable_params"] for t in tasks) / 1e3
        wall = sum(by_task[t]["wall_seconds"] for t in tasks)
        cells = " | ".join(f"{a:.1f}" for a in accs)
        lines.append(f"| {method} | {cells} | **{statistics.mean(accs):.1f}** | {params:.1f} | {wall:.0f} |")
    return "\n".join(lines)


def markdown(results: dict, tasks: tuple[str, ...], args: argparse.Namespace, total_s: float) -> str:
    from bench.report import machine_line

    backbone_params = 2.7
    info = args.weights.with_name("pretrain.json")
    probe = ""
    if info.is_file():
        pre = json.loads(info.read_text())
        probe = (
            f" Backbone quality (`{info}`): logistic-regression probe on frozen features, digits test "
            f"accuracy {pre['digits_probe_acc_pretrained']:.3f} after {pre['minutes']} min of "
            f"pretraining vs {pre['digits_probe_acc_random_init']:.3f} at random init."
        )
    return f"""## Method comparison (offline suite)

{machine_line()}

`python -m training.compare` (`make compare`): {MODEL} ({backbone_params}M parameters, pretrained by
`python -m training.pretrain_demo` on procedural shapes and letters), one seed ({args.seed}), {args.epochs}
epochs, {args.per_class} train images per class, batch {args.batch_size}, AdamW + cosine with a 1-epoch
warm-up, model selection on val (digits: 20/class; procedural: half the train size), top-1 **test**
accuracy (%) (digits: 50 held-out real scans/class; procedural: 20 images/class). Peak lr:
{json.dumps(LR)}, VPT {LR_VPT}. Adapter bottleneck {methods.ADAPTER_DIM}; VPT-shallow
{methods.VPT_SHALLOW_PROMPTS} prompts, VPT-deep {methods.VPT_DEEP_PROMPTS} per block. Params: trainable
parameters including the head, averaged over tasks. Total wall time {total_s / 60:.1f} min. The row
`ssf (random init)` is the control: SSF on the same architecture at its random init (seed {args.seed}),
i.e. what the pretrained weights give SSF.{probe}

{table(results, tasks)}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=BACKBONE)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(methods.METHODS), choices=methods.METHODS)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="small: more steps for the same compute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("runs/compare"))
    p.add_argument("--no-control", dest="control", action="store_false", help="skip SSF at random init")
    p.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not args.weights.is_file():
        print(f"compare: error: backbone {str(args.weights)!r} not found", file=sys.stderr)
        raise SystemExit(2)
    start = time.monotonic()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for method in args.methods:
        for task in args.tasks:
            summary = run_one(task, method, args, args.work)
            results.setdefault(method, {})[task] = summary
            print(
                f"[compare] {task:8s} {method:12s} test {summary['test_acc']:.3f} "
                f"({summary['wall_seconds']:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    if args.control:
        weights = random_init(args.work, args.seed)
        for task in args.tasks:
            summary = run_one(
                task,
                "ssf",
                argparse.Namespace(**{**vars(args), "weights": weights}),
                args.work / "random-init",
            )
            results.setdefault("ssf (random init)", {})[task] = summary
            print(
                f"[compare] {task:8s} ssf-random   test {summary['test_acc']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    text = markdown(results, tuple(args.tasks), args, time.monotonic() - start)
    print(text)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_write:
        from bench.report import assemble, write_section

        write_section("20-method-comparison", text)
        assemble()


if __name__ == "__main__":
    main()
