"""Plots of a run: training curves, and the paper's Figure 4 analogue.

Figure 4 of the paper shows that after folding, the weights and biases of the tuned model keep the
pretrained distribution (SSF changes features mildly). ``fold_distribution`` overlays histograms of the
folded sites' weights and biases on the pretrained ones, so that claim can be checked for any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import ssf  # noqa: E402
from ssf.layers import CONTAINER  # noqa: E402


def curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation accuracy per epoch."""
    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(epochs, [r["train_loss"] for r in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss", title="training loss")
    b.plot(epochs, [r["val_acc"] for r in history], marker="o", color="tab:green")
    b.set(xlabel="epoch", ylabel="val accuracy", title="validation accuracy", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _site_tensors(state: dict[str, torch.Tensor], sites: list[ssf.Site]) -> tuple[torch.Tensor, ...]:
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    for site in sites:
        for suffix, bucket in ((".weight", weights), (".bias", biases)):
            t = state.get(site.path + suffix)
            if t is not None:
                bucket.append(t.detach().float().reshape(-1))
    return torch.cat(weights or [torch.zeros(0)]), torch.cat(biases or [torch.zeros(0)])


def fold_distribution(model: nn.Module, path: Path) -> None:
    """Histograms of site weights and biases before (pretrained) and after folding SSF in."""
    sites = [a.site for a in getattr(model, CONTAINER).values() if a.site.foldable]
    base = {k: v for k, v in model.state_dict().items() if not k.startswith(CONTAINER + ".")}
    merged = ssf.merge_model(model).state_dict()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, before, after, title in zip(
        axes, _site_tensors(base, sites), _site_tensors(merged, sites), ("weights", "biases"), strict=True
    ):
        if before.numel() == 0:
            ax.set_title(f"{title}: none")
            continue
        lo, hi = torch.quantile(torch.cat([before, after])[:1_000_000], torch.tensor([0.001, 0.999])).tolist()
        bins = torch.linspace(lo, hi, 80).tolist()
        ax.hist(before.numpy(), bins=bins, alpha=0.5, label="pretrained", density=True)
        ax.hist(after.numpy(), bins=bins, alpha=0.5, label="folded (SSF)", density=True)
        ax.set(title=f"site {title}", xlabel="value", ylabel="density")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
