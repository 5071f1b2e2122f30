"""CUDA graphs of the mixed path's shared trunk, one per padded batch size.

On a GPU a small mixed batch is launch-bound: the trunk is a few hundred kernels (every op of the backbone
plus one gather-affine per site), each costing microseconds to launch whatever its size. A CUDA graph
replays the whole sequence with one launch. The graph is captured once per batch size in ``sizes``
(a batch is padded up to the next one with identity rows, row 0, and its results sliced back), on
static input buffers: each batch copies its images and row indices in and replays.

Exactness: a replay runs the same kernels on the same data as the eager trunk, so the outputs are the eager
path's (tested on the device against the folded reference). A graph reads the site tables by address, so a
table that grew (``SiteTables._grow`` reallocates) drops every graph; they are captured again on demand. A
capture that fails (an op that syncs with the host, say) leaves that size on the eager path for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("ssf.engine")

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    rows: torch.Tensor
    out: torch.Tensor


class GraphedTrunk:
    """``trunk(x, rows)`` through captured graphs; eager beyond the largest size or where capture failed."""

    def __init__(
        self,
        trunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        tables_key: Callable[[], tuple[int, ...]],
        sizes: tuple[int, ...] = DEFAULT_SIZES,
    ) -> None:
        self.trunk, self.tables_key = trunk, tables_key
        self.sizes = sorted(sizes)
        self.graphs: dict[int, _Graph] = {}
        self.failed: set[int] = set()
        self.key: tuple[int, ...] | None = None
        self.pool: Any = None  # one memory pool shared by every size's graph
        self.captures = 0

    def padded(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        size = self.padded(batch)
        if size is None or size in self.failed:
            return self.trunk(x, rows.to(x.device, non_blocking=True))
        key = self.tables_key()
        if key != self.key:  # the tables moved: every graph reads stale addresses
            self.graphs.clear()
            self.pool = None  # a fresh pool: capturing into one whose graphs died trips the allocator
            self.key = key
        g = self.graphs.get(size)
        if g is None:
            g = self._capture(size, x)
            if g is None:
                return self.trunk(x, rows.to(x.device, non_blocking=True))
        g.x[:batch].copy_(x, non_blocking=True)
        g.rows[:batch].copy_(rows, non_blocking=True)
        if batch < size:
            g.rows[batch:].zero_()  # identity rows for the padding; their outputs are dropped
        g.graph.replay()
        return g.out[:batch]

    def _capture(self, size: int, example: torch.Tensor) -> _Graph | None:
        device = example.device
        x = torch.zeros((size, *example.shape[1:]), dtype=example.dtype, device=device)
        x[: example.shape[0]].copy_(example)
        rows = torch.zeros(size, dtype=torch.long, device=device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture (lazy inits, cuDNN autotuning)
                for _ in range(2):
                    self.trunk(x, rows)
            torch.cuda.current_stream(device).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.trunk(x, rows)
        except Exception as e:  # noqa: BLE001 - any capture failure: this size stays eager
            log.warning("cuda graph capture at batch %d failed (%s); that size runs eagerly", size, e)
            self.failed.add(size)
            torch.cuda.synchronize(device)
            return None
        self.captures += 1
        self.graphs[size] = _Graph(graph, x, rows, out)
        return self.graphs[size]
