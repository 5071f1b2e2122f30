"""The mixed path's Triton row-affine kernel (CUDA), checked on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, read when triton is imported, hence a subprocess): the kernel alone against
float64 arithmetic, and the fused mixed path with the kernel against the folded reference, with a count
proving the kernel ran at every channels-last site. The same kernel on a real GPU: tests/gpu."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

KERNEL = """
import torch
from service.engine import triton_affine as ta
assert ta.interpreting and ta._enabled
g = torch.Generator().manual_seed(0)
cases = [
    ((4, 5, 24), 4, 40, 3, torch.float32),    # one row per sample, a site in the middle of the table
    ((6, 7, 300), 2, 310, 5, torch.float32),  # 3 outputs per sample (Swin's windows), C over one block
    ((3, 9, 16), 1, 16, 0, torch.float16),    # one task's row broadcast over the batch
    ((2, 3, 4, 33), 2, 40, 7, torch.float32), # rank 4, channels last
]
for shape, n, width, off, dtype in cases:
    x = torch.randn(*shape, generator=g).to(dtype)
    c = shape[-1]
    table_s = torch.randn(n, width, generator=g).to(dtype)
    table_t = torch.randn(n, width, generator=g).to(dtype)
    s, t = table_s[:, off:off + c], table_t[:, off:off + c]
    k = shape[0] // n
    view = (shape[0],) + (1,) * (len(shape) - 2) + (c,)
    per = lambda rows: rows.double().repeat_interleave(k, 0).view(view)
    want = x.double() * per(s) + per(t)
    out = torch.empty_like(x)
    ta.row_affine(x, s, t, out)
    err = (out.double() - want).abs().max().item()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, want.abs().max().item()), (shape, err)
    ta.row_affine(x, s, t, x)  # in place
    assert torch.equal(x, out)
print("ok")
"""

MIXED = """
import torch
import ssf
from service.engine import triton_affine as ta
from service.engine.metrics import EngineMetrics
from service.engine.torch_backend import TorchBackend
from tests.helpers.models import make
from tests.helpers.tuned import entry, tuned

calls, fallbacks = [], []
kernel, addcmul = ta.row_affine, torch.addcmul
ta.row_affine = lambda *a: calls.append(1) or kernel(*a)
torch.addcmul = lambda *a, **k: fallbacks.append(1) or addcmul(*a, **k)
for family in ("vit", "swin"):
    models = [tuned(family, seed) for seed in range(3)]
    plain = make(family)
    sites = ssf.find_sites(plain)
    backend = TorchBackend(plain, sites, torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics())
    entries = [entry(family, m, f"t{i}") for i, m in enumerate(models)]
    for e in entries:
        backend.install(e)
    x = torch.randn(4, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = [ssf.merge_model(m)(x) for m in models]
    tol = 1e-4 * max(1.0, max(float(w.abs().max()) for w in want))
    before, before_fallbacks = len(calls), len(fallbacks)
    got = torch.cat(backend.run_mixed(x, [(entries[2], 1), (entries[0], 2), (entries[1], 1)]))
    expected = torch.cat([want[2][:1], want[0][1:3], want[1][3:4]])
    assert (got - expected).abs().max() <= tol, family
    ran, fell_back = len(calls) - before, len(fallbacks) - before_fallbacks
    # every site ran once, through the kernel unless its channels are not the last axis (patch embedding)
    assert ran + fell_back == len(backend.mixed.tables.sites), (family, ran, fell_back)
    assert ran > 3 * fell_back, (family, ran, fell_back)
    (got,) = backend.run_mixed(x, [(entries[1], 4)])  # one task: its row broadcast
    assert (got - want[1]).abs().max() <= tol, family
print("ok")
"""


@pytest.mark.parametrize("script", [KERNEL, MIXED], ids=["kernel", "mixed-path"])
def test_row_affine_kernel_under_the_triton_interpreter(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
