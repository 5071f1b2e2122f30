"""Where the mixed path's extra GPU time goes: the CUDA kernels of one bare and one mixed forward of a
model at one batch size, top kernels by device time (torch.profiler), printed side by side.

    python -m bench.gpu_profile --model vit_base_patch16_224 --batch 64 --dtype float16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import ssf
from bench.engine_bench import random_entry
from service.engine.metrics import EngineMetrics
from service.engine.torch_backend import TorchBackend


def kernels(fn: object, steps: int = 5) -> list[tuple[str, float, int]]:
    """(kernel, device ms per forward, calls per forward) for the top kernels of ``fn``."""
    for _ in range(3):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()  # type: ignore[operator]
        torch.cuda.synchronize()
    rows = [
        (e.key, e.device_time_total / 1e3 / steps, e.count // steps)
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    model = ssf.create_backbone(args.model, pretrained=False, num_classes=10).eval()
    spec = ssf.BackboneSpec.from_model(model, args.model)
    head = {k: v for k, v in model.state_dict().items() if k.startswith(spec.head_prefix + ".")}
    size = tuple(int(d) for d in ssf.sites.input_size(model))
    backend = TorchBackend(model, list(spec.sites), device, dtype, 1 << 36, EngineMetrics())
    entries = [random_entry(spec, head, f"task{i}", i) for i in range(args.batch)]
    for e in entries:
        backend.install(e)
    x = torch.randn(args.batch, *size).to(device=device, dtype=dtype)
    groups = [(e, 1) for e in entries]
    for name, fn in (("bare", lambda: backend.run_bare(x)), ("mixed", lambda: backend.run_mixed(x, groups))):
        rows = kernels(fn)
        total = sum(r[1] for r in rows)
        print(f"== {args.model} {name} b={args.batch} {args.dtype}: {total:.2f} ms of kernels per forward")
        for key, ms, calls in rows[: args.top]:
            print(f"{ms:8.3f} ms {calls:5d}x  {key[:110]}")


if __name__ == "__main__":
    main()
