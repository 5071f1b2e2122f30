"""One batch on the model thread: requests grouped by task (contiguous runs), one forward, answers split back
in request order; and the top-k scores each answer is made of."""

from __future__ import annotations

from typing import Any

import torch

from service.engine.protocol import Scored
from service.engine.scheduler import Path, Pending
from service.engine.torch_backend import TorchBackend


def run_batch(
    backend: TorchBackend, onnx: Any, path: Path, items: list[Pending]
) -> tuple[list[torch.Tensor], float]:
    """On the model thread: run one batch, return each request's logits and the merge time spent."""
    order: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(items):
        order.setdefault(p.entry.key, []).append(i)
    ranked = [i for idx in order.values() for i in idx]
    x = torch.cat([items[i].x for i in ranked]) if len(ranked) > 1 else items[0].x
    groups = [(items[idx[0]].entry, sum(items[i].n for i in idx)) for idx in order.values()]
    merge_s = 0.0
    if path == "mixed":
        outs = backend.run_mixed(x, groups)
    elif path == "merged":
        ((entry, _),) = groups
        outs = [backend.run_merged(entry, x)]
        merge_s = backend.last_merge_s
    else:
        ((entry, _),) = groups
        outs = [onnx.run(entry, x)]
        merge_s = onnx.last_merge_s
    logits = torch.cat(outs) if len(outs) > 1 else outs[0]
    answers: list[torch.Tensor] = [torch.empty(0)] * len(items)
    start = 0
    for i in ranked:
        answers[i] = logits[start : start + items[i].n]
        start += items[i].n
    return answers, merge_s


def top_scores(logits: torch.Tensor, labels: list[str], top_k: int) -> list[list[Scored]]:
    probs = torch.softmax(logits.float(), dim=-1)
    scores, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [
            Scored(label=labels[i], index=i, score=float(s))
            for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True)
        ]
        for row_s, row_i in zip(scores, indices, strict=True)
    ]
