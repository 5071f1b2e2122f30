"""The mixed path's shared trunk through ``torch.compile`` (``SSF_TORCH_COMPILE``).

Eagerly, every SSF site is an ``addcmul`` after the op that produced it and one more Python call (a
Linear's or Conv2d's in place of its bias add; a LayerNorm's in a mixed batch, one more pass over the
activation), which a small model at a small batch feels. Inductor fuses each site's
gather-affine into the neighbouring elementwise kernels (the bias add, GELU, the residual add,
LayerNorm). Measured on CPU (BENCHMARKS.md, torch.compile section; one run on a 2-core host):
ssf_demo_vit's compiled mixed path 0.85-0.98x the eager bare backbone at batch 1-64, against 0.96-1.08x
eager (the bare backbone compiled: 0.78-1.01x).

One compile with dynamic batch size (``dynamic=True``), done by the warm-up before the server is ready:
batch 1 (which torch specialises) and batch 2 (the dynamic graph), about 10-30 s each on 2 CPU cores.
Tables that grow (doubling, ``SiteTables._grow``) are new tensors, so the next batch compiles again.
A compile that fails (no C++ compiler, say) logs one warning and leaves the trunk eager for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("ssf.engine")


class CompiledTrunk:
    """``trunk(x, rows)`` compiled once for every batch size; eager after a failed compile."""

    def __init__(self, trunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.trunk = trunk
        self.compiled: Any = torch.compile(trunk, dynamic=True)
        self.failed = False

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(x.device, non_blocking=True)
        if not self.failed:
            try:
                return self.compiled(x, rows)  # type: ignore[no-any-return]
            except Exception as e:  # noqa: BLE001 - any compile failure: the eager trunk, for good
                self.failed = True
                log.warning("torch.compile of the mixed trunk failed (%s); it runs eagerly", e)
        return self.trunk(x, rows)
