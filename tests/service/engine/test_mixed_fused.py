"""The fused mixed path (one op per site, BatchNorms fused with the conv that feeds them, no hooks) answers
what the folded reference answers, for one task per batch (broadcast row) and for all-distinct batches."""

from __future__ import annotations

import pytest
import torch

import ssf
from service.engine.metrics import EngineMetrics
from service.engine.residency import TaskEntry
from service.engine.torch_backend import TorchBackend
from service.store.base import StoredTask
from tests.helpers.models import make
from tests.helpers.tuned import entry, tuned


@pytest.mark.parametrize("family", ["vit", "efficientnet", "resnet", "convnext", "swin"])
def test_fused_mixed_path_matches_the_folded_reference(family: str) -> None:
    models = [tuned(family, seed) for seed in range(3)]
    plain = make(family)
    backend = TorchBackend(
        plain, ssf.find_sites(plain), torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics()
    )
    entries = [entry(family, m, f"t{i}") for i, m in enumerate(models)]
    for e in entries:
        backend.install(e)
    model = backend.mixed.model
    assert not any(m._forward_hooks for m in model.modules())  # no hook: Module.__call__'s fast path
    if family in ("efficientnet", "resnet"):  # every BatchNorm site runs fused
        norms = [s for s in backend.sites if isinstance(model.get_submodule(s.path), torch.nn.BatchNorm2d)]
        assert norms and backend.mixed.fused_norms == len(norms)
    x = torch.randn(5, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = [ssf.merge_model(m)(x) for m in models]
    tol = 1e-4 * max(1.0, max(float(w.abs().max()) for w in want))
    for i, e in enumerate(entries):  # one task in the whole batch: its row broadcast, nothing gathered
        (got,) = backend.run_mixed(x, [(e, 5)])
        assert (got - want[i]).abs().max() <= tol
    groups = [(entries[2], 1), (entries[0], 2), (entries[1], 1), (entries[2], 1)]  # mixed, in runs
    got = torch.cat(backend.run_mixed(x, groups))
    expected = torch.cat([want[2][:1], want[0][1:3], want[1][3:4], want[2][4:5]])
    assert (got - expected).abs().max() <= tol
    merged = backend.run_merged(entries[1], x)
    assert (merged - want[1]).abs().max() <= tol


def test_released_row_answers_as_the_bare_backbone_on_fused_norms() -> None:
    """A freed row is the identity again in the fused norms' tables too (their identity is the norm's own
    affine, not 1 and 0), and a table that grows keeps every task's fused rows."""
    plain = make("efficientnet")
    backend = TorchBackend(
        plain, ssf.find_sites(plain), torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics()
    )
    models = [tuned("efficientnet", seed) for seed in range(10)]  # capacity 8: the tables grow
    entries = [entry("efficientnet", m, f"t{i}") for i, m in enumerate(models)]
    for e in entries:
        backend.install(e)
    assert backend.tables.capacity == 16
    x = torch.randn(2, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ssf.merge_model(models[0])(x)
        bare = backend.run_bare(x)
    (got,) = backend.run_mixed(x, [(entries[0], 2)])
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    row = entries[3].row
    backend.release(entries[3])
    identity = TaskEntry(stored=StoredTask("id", 1, "", 0, ""), delta=entries[3].delta)
    identity.row, identity.head = row, {k: v for k, v in backend.base.items() if k.startswith("classifier.")}
    (got,) = backend.run_mixed(x, [(identity, 1), (entries[0], 1)])[:1]
    assert (got - bare[:1]).abs().max() <= 1e-4 * max(1.0, float(bare.abs().max()))


def test_linear_and_conv_sites_run_without_their_bias_which_the_shift_columns_hold() -> None:
    """A plain Linear or Conv2d site runs its op without the bias, and its shift column holds
    ``scale*bias + shift``: the bias add the bare op makes becomes the site's multiply-add instead of one
    more pass over the activation. The identity row (and a released one) holds the bias itself."""
    from torch.profiler import ProfilerActivity, profile

    plain = make("vit")
    backend = TorchBackend(
        plain, ssf.find_sites(plain), torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics()
    )
    model = tuned("vit", 0)
    e = entry("vit", model, "t0")
    backend.install(e)
    tables = backend.tables
    biased = [
        s for s in tables.sites if type(plain.get_submodule(s.path)) in (torch.nn.Linear, torch.nn.Conv2d)
    ]
    assert {type(plain.get_submodule(s.path)) for s in biased} == {torch.nn.Linear, torch.nn.Conv2d}
    for s in biased:
        bias = plain.get_submodule(s.path).bias
        scale, shift = (t.reshape(-1) for t in e.delta.sites[s.path])
        assert torch.allclose(tables.shift[s.path][0], bias)
        assert torch.allclose(tables.shift[s.path][e.row], scale * bias + shift, atol=1e-6)
        assert torch.equal(tables.scale[s.path][e.row], scale)
    x = torch.randn(3, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (got,) = backend.run_mixed(x, [(e, 3)])
    counts = {ev.key: ev.count for ev in prof.key_averages()}
    assert counts.get("aten::addmm", 0) == 1  # the task's head; every Linear site ran as a plain product
    with torch.no_grad():
        want = ssf.merge_model(model)(x)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    row = e.row
    backend.release(e)
    for s in biased:
        assert torch.equal(tables.shift[s.path][row], tables.shift[s.path][0])
