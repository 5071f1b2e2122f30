"""One batch on the model thread: requests grouped by task (contiguous runs), one forward, answers split back
in request order; and the top-k scores each answer is made of."""

from __future__ import annotations

import torch

from service.engine.backend import Backend, BatchPath, BatchRun
from service.engine.protocol import Scored
from service.engine.scheduler import Pending


def run_batch(backend: Backend, path: BatchPath, items: list[Pending]) -> BatchRun:
    """On the model thread: run one batch; one logits tensor per request, and the merge time spent."""
    order: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(items):
        order.setdefault(p.entry.key, []).append(i)
    ranked = [i for idx in order.values() for i in idx]
    x = torch.cat([items[i].x for i in ranked]) if len(ranked) > 1 else items[0].x
    groups = [(items[idx[0]].entry, sum(items[i].n for i in idx)) for idx in order.values()]
    run = backend.run(path, x, groups)
    answers: list[torch.Tensor] = [torch.empty(0)] * len(items)
    # one output per task group: its own width (tasks may differ in class count), split back per request
    for idx, logits in zip(order.values(), run.outputs, strict=True):
        start = 0
        for i in idx:
            answers[i] = logits[start : start + items[i].n]
            start += items[i].n
    return BatchRun(answers, run.merge_s)


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
