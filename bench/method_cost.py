"""The paper's Figure 3 on our code: training and inference cost of each method, relative to the backbone.

For each method on the same backbone and batch: the time of one training step (forward, backward, AdamW
step) and its peak memory, and the time and peak memory of one inference forward. Peak memory is measured in
a fresh process per method and mode: the high-water mark of the process's RSS (``VmHWM``, reset before the
steps) during the steps, minus its RSS after the model was built, i.e. the activations, gradients and
optimizer state that the step adds. The trainable state (parameters + gradients + AdamW moments) is also
reported as computed. SSF appears twice: unfolded (sites as hooks) and folded (``merge_model``: a plain timm
model, so it costs exactly what the bare backbone costs). Every number is a ratio to the bare backbone
measured in the same run, interleaved, median of repetitions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

import ssf
from bench.report import RESULTS, machine_line, write_section
from training import methods

MODEL = "ssf_demo_vit"
ROWS = ("backbone", "full", "linear", "bias", "adapter", "vpt-shallow", "vpt-deep", "ssf", "ssf-folded")


def build(row: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=num_classes)
    if row == "backbone":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)  # type: ignore[operator]
    elif row == "ssf-folded":
        methods.prepare(model, "ssf")
        model = ssf.merge_model(model)
    else:
        methods.prepare(model, row)
    return model


def timed(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        if opt is not None:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def state_bytes(model: nn.Module) -> int:
    """Trainable bytes held during training: parameter + gradient + AdamW's two moments."""
    return sum(4 * p.numel() * 4 for p in model.parameters() if p.requires_grad)


def peak_mb(row: str, mode: str, batch: int) -> float:
    """Peak memory a train step or an inference forward adds, in a fresh process (see the docstring)."""
    import json
    import subprocess
    import sys

    code = f"from bench.method_cost import _peak_child; _peak_child({row!r}, {mode!r}, {batch})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def _peak_child(row: str, mode: str, batch: int) -> None:
    import json

    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))
    model = build(row, 10)
    fn = train_step(model, x, y) if mode == "train" else infer(model, x)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: building is not the step
    before = _status_kib("VmRSS")
    for _ in range(3):
        fn()
    print(json.dumps({"peak_mb": max(0, _status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(ln for ln in status if ln.startswith(field + ":")).split()[1])


def measure(quick: bool) -> dict[str, dict[str, float]]:
    batch, reps = (8, 3) if quick else (32, 4)
    x, y = torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))
    models = {row: build(row, 10) for row in ROWS}
    results: dict[str, dict[str, list[float]]] = {r: {"train": [], "infer": []} for r in ROWS}
    for _ in range(2):  # interleave rows so drift from other load hits all of them alike
        for row, model in models.items():
            if row != "ssf-folded":
                results[row]["train"].append(timed(train_step(model, x, y), reps))
            results[row]["infer"].append(timed(infer(model, x), reps))
    # the fresh processes measure RSS, not time: two at once (2 cores), after the timed rounds
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (row, mode)
        for row in ROWS
        for mode in ("train", "infer")
        if not (row == "ssf-folded" and mode == "train")
    ]
    with ThreadPoolExecutor(2) as pool:
        peaks = dict(zip(jobs, pool.map(lambda j: peak_mb(j[0], j[1], batch), jobs), strict=True))
    base_train = min(results["backbone"]["train"])
    base_infer = min(results["backbone"]["infer"])
    out = {}
    for row in ROWS:
        train = min(results[row]["train"]) / base_train if results[row]["train"] else float("nan")
        out[row] = {
            "train_ratio": train,
            "infer_ratio": min(results[row]["infer"]) / base_infer,
            "trainable_mb": state_bytes(models[row]) / 2**20,
            "train_peak_mb": peaks.get((row, "train"), float("nan")),
            "infer_peak_mb": peaks[(row, "infer")],
        }
    return out


def plot(out: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(out)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [out[r]["train_ratio"] for r in rows], 0.4, label="train step")
    ax.bar([i + 0.2 for i in xs], [out[r]["infer_ratio"] for r in rows], 0.4, label="inference")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), rows, rotation=20)
    ax.set(ylabel="time / bare backbone", title=f"method cost on {MODEL} (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(quick: bool = False) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = measure(quick)
    plot(out, RESULTS / "30-method-cost.png")
    lines = [
        "| Method | Train step (x backbone) | Train peak memory MB (x backbone) | Inference (x backbone) "
        "| Inference peak memory MB (x backbone) | Trainable state (MB) |",
        "|---|---|---|---|---|---|",
    ]
    base = out["backbone"]
    for row, r in out.items():
        no_train = r["train_ratio"] != r["train_ratio"]
        train = "n/a (inference only)" if no_train else f"{r['train_ratio']:.2f}"
        tm, im = r["train_peak_mb"], r["infer_peak_mb"]
        train_mem = "n/a" if no_train else f"{tm:.0f} ({tm / base['train_peak_mb']:.2f})"
        infer_mem = f"{im:.0f} ({im / base['infer_peak_mb']:.2f})"
        cells = [row, train, train_mem, f"{r['infer_ratio']:.2f}", infer_mem, f"{r['trainable_mb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    write_section(
        "30-method-cost",
        f"""## Method cost (paper Figure 3 analogue)

{machine_line()}

`python -m bench.method_cost` ({"quick" if quick else "full"}): {MODEL}, batch {8 if quick else 32} at
64 px, median of repetitions, two interleaved rounds, best round. Train step = forward + backward +
AdamW step; the backbone row trains its head only. Peak memory: RSS high-water mark during 3 steps
in a fresh process minus its RSS after building the model (one process per method and mode, two
at a time).
Trainable state = parameters + gradients + AdamW
moments of the trainable tensors (fp32). VPT-shallow {methods.VPT_SHALLOW_PROMPTS} prompts, VPT-deep
{methods.VPT_DEEP_PROMPTS} per block, adapter bottleneck {methods.ADAPTER_DIM}. SSF folded is the
merged plain timm model: inference costs what the backbone costs, unlike adapters and prompts.

{chr(10).join(lines)}

![method cost](bench/results/30-method-cost.png)
""",
    )


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
