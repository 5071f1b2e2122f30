"""The mixed path's per-sample affine on CUDA, ``out = x * scale[row] + shift[row]``, as one Triton kernel.

On a GPU the affine of a site whose channels are the last axis (every ViT/Swin/Mixer token site, ConvNeXt's
channels-last blocks) is memory-bound: one read and one write of the activation. ``torch.addcmul`` with
``[B, 1, C]`` rows broadcast against ``[B, N, C]`` falls off PyTorch's vectorized elementwise path (an
operand is not contiguous) and ran at about a quarter of the bandwidth bound on an H200 (ViT-B/16 fp16,
batch 64: 74 calls, 4.3 ms against a 6.1 ms bare forward, bench/gpu_profile.py). This kernel reads each
sample's row of the site's scale and shift (a strided view of the gathered table, L2-resident) and streams
the activation once with vector loads along the channels, computing in float32.

Used by ``service.engine.fused.AffineSlot`` for contiguous CUDA outputs when Triton is installed (it ships
with PyTorch's CUDA wheels); everywhere else the slot keeps ``addcmul``. A launch that fails (an old GPU, a
Triton that cannot compile) turns the kernel off for the process with one warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger("ssf.engine")

interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # the CPU tests: the kernel runs on CPU tensors
triton: Any = None
if torch.cuda.is_available() or interpreting:  # else triton is not even imported
    try:
        import triton  # type: ignore[no-redef]
        import triton.language as tl
    except ImportError:  # a CUDA torch without triton: the slots keep addcmul
        triton = None
interpreting = interpreting and triton is not None
_enabled = triton is not None  # turned off for good by a launch that fails
EAGER_MIN = 1 << 22  # elements: below this an eager launch's host cost (~20 us) outweighs its saving


def available(x: torch.Tensor) -> bool:
    """Whether the kernel should run on ``x``: a contiguous CUDA tensor, either large or under a CUDA-graph
    capture (a replay costs no host time per kernel; eager, small batches are launch-bound and the
    kernel's Python launch costs more than addcmul's, measured on an H200 at batch 1-32)."""
    if not (_enabled and x.is_contiguous()):
        return False
    if interpreting:
        return True
    return x.is_cuda and (x.numel() >= EAGER_MIN or torch.cuda.is_current_stream_capturing())


if triton is not None:

    @triton.jit
    def _row_affine(
        x_ptr,
        out_ptr,
        s_ptr,
        t_ptr,
        row_stride,
        tokens,
        per_sample,
        channels,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < tokens)[:, None] & (c < channels)[None, :]
        offs = r.to(tl.int64)[:, None] * channels + c[None, :]
        rows = (r // per_sample).to(tl.int64)[:, None] * row_stride + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + rows, mask=mask).to(tl.float32)
        t = tl.load(t_ptr + rows, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, (x * s + t).to(out_ptr.dtype.element_ty), mask=mask)


def row_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x * scale[i] + shift[i]`` along ``x``'s last axis, where sample ``i`` of ``scale``'s
    ``n`` rows (``[n, C]``, unit stride along C, any row stride; ``n`` divides ``x.shape[0]``) covers the
    next ``x.numel() / (n * C)`` elements' tokens in batch-major order. ``out`` may be ``x``."""
    channels = x.shape[-1]
    tokens = x.numel() // channels
    n = scale.shape[0]
    block_c = min(triton.next_power_of_2(channels), 256)
    block_m = max(1, 4096 // block_c)
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(channels, block_c))
    _row_affine[grid](
        x, out, scale, shift, scale.stride(0) if n > 1 else 0, tokens, max(1, tokens // n), channels,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip


def apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> bool:
    """``row_affine``, or False (and the kernel off for good) when it cannot run here."""
    global _enabled
    try:
        row_affine(x, scale, shift, out)
    except Exception as e:  # noqa: BLE001 - any compile/launch failure: fall back to addcmul for good
        _enabled = False
        log.warning("triton row-affine kernel unavailable (%s); the mixed path uses addcmul", e)
        return False
    return True
