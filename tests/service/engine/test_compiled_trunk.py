"""``SSF_TORCH_COMPILE``: the mixed trunk through torch.compile answers what the folded reference answers
(1e-4, as the eager path), for all-distinct batches of several sizes and one-task batches, with the
BatchNorm-fused slots too; and the engine's warm-up compiles it before the first request."""

from __future__ import annotations

import pytest
import torch

import ssf
from service.engine.compiled import CompiledTrunk
from service.engine.metrics import EngineMetrics
from service.engine.torch_backend import TorchBackend
from tests.helpers.models import make
from tests.helpers.tuned import entry, tuned


@pytest.mark.parametrize("family", ["vit", "efficientnet"])
def test_compiled_mixed_trunk_matches_the_folded_reference(family: str) -> None:
    torch._dynamo.reset()
    models = [tuned(family, seed) for seed in range(3)]
    plain = make(family)
    backend = TorchBackend(
        plain, ssf.find_sites(plain), torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics()
    )
    backend.use_compile()
    entries = [entry(family, m, f"t{i}") for i, m in enumerate(models)]
    for e in entries:
        backend.install(e)
    size = ssf.sites.input_size(plain)
    backend.warmup(torch.zeros(2, *size))  # compiles batch 1 and the dynamic batch
    runner = backend.mixed.runner
    assert isinstance(runner, CompiledTrunk) and not runner.failed
    x = torch.randn(5, *size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = [ssf.merge_model(m)(x) for m in models]
    tol = 1e-4 * max(1.0, max(float(w.abs().max()) for w in want))
    groups = [(entries[2], 1), (entries[0], 2), (entries[1], 1), (entries[2], 1)]
    got = torch.cat(backend.run_mixed(x, groups))
    expected = torch.cat([want[2][:1], want[0][1:3], want[1][3:4], want[2][4:5]])
    assert (got - expected).abs().max() <= tol
    for n in (1, 3):  # other sizes, one task each: the same compiled trunk, its row gathered
        (got,) = backend.run_mixed(x[:n], [(entries[1], n)])
        assert (got - want[1][:n]).abs().max() <= tol
    assert not runner.failed
