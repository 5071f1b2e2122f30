"""Merges into an evicted copy's tensors: bit for bit the fresh merge, in the memory the copy already had."""

from __future__ import annotations

import pytest
import torch

import ssf
from service.engine.metrics import EngineMetrics
from service.engine.residency import TaskEntry
from service.engine.torch_backend import TorchBackend
from service.store.base import StoredTask
from tests.helpers.models import make


def random_entry(backend: TorchBackend, name: str, seed: int, sites: list[ssf.Site]) -> TaskEntry:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        s.path: (1 + 0.3 * torch.randn(s.channels, generator=g), 0.3 * torch.randn(s.channels, generator=g))
        for s in sites
    }
    prefix = ssf.head_prefix(backend.bare) + "."
    head = {k: torch.randn(v.shape, generator=g) for k, v in backend.base.items() if k.startswith(prefix)}
    delta = ssf.Delta(name, "m", "", "foldable", "ssf", [str(i) for i in range(7)], tensors, head)
    entry = TaskEntry(stored=StoredTask(name, 1, "", 0, ""), delta=delta)
    backend.install(entry)
    return entry


@pytest.mark.parametrize("family", ["vit", "efficientnet", "convnext"])
def test_a_merge_into_an_evicted_copy_equals_a_fresh_merge_bit_for_bit(family: str) -> None:
    plain = make(family)
    sites = ssf.find_sites(plain)
    backend = TorchBackend(plain, sites, torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics())
    a, b = random_entry(backend, "a", 1, sites), random_entry(backend, "b", 2, sites)
    partial = random_entry(backend, "c", 3, sites[::2])  # a delta with half the sites: the rest is the base
    builder = backend.builder
    for entry in (b, partial):
        fresh, owned_fresh, _ = builder.build(entry.delta.sites, entry.head)
        old, _, _ = builder.build(a.delta.sites, a.head)
        old_ptrs = {t.data_ptr() for t in old.state_dict().values()}
        reused, owned, _ = builder.build(entry.delta.sites, entry.head, reuse=old)
        assert reused is old and owned == owned_fresh
        want, got = fresh.state_dict(), reused.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
        folded = [f"{s.path}.weight" for s in sites if s.path in entry.delta.sites and s.fold != "alpha_beta"]
        assert folded and all(got[k].data_ptr() in old_ptrs for k in folded)  # written in place, not new
        x = torch.randn(2, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert torch.equal(fresh(x), reused(x))


def test_the_lru_builds_into_the_copy_it_evicts() -> None:
    plain = make("vit")
    sites = ssf.find_sites(plain)
    probe = TorchBackend(make("vit"), sites, torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics())
    _, owned, _ = probe.builder.build(
        *(lambda e: (e.delta.sites, e.head))(random_entry(probe, "p", 0, sites))
    )
    backend = TorchBackend(plain, sites, torch.device("cpu"), torch.float32, owned, EngineMetrics())  # 1 copy
    entries = [random_entry(backend, f"t{i}", i, sites) for i in range(3)]
    x = torch.randn(2, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(5))
    first, _ = backend.merged_model(entries[0])
    want = [probe.builder.build(e.delta.sites, e.head)[0] for e in entries]
    for i in (1, 2, 0):
        model, merge_s = backend.merged_model(entries[i])
        assert merge_s > 0 and model is first  # the evicted copy, refolded
        assert backend.cache.keys() == [entries[i].key]
        with torch.no_grad():
            assert torch.equal(backend.run_merged(entries[i], x), want[i](x))


def test_an_evicted_copy_with_a_bias_the_new_task_lacks_is_not_reused() -> None:
    """Folding a site into a bias-free op (qkv without bias) creates a bias; a task that does not fold
    that site has no such key, so the old copy's module layout does not fit: the build is fresh."""
    plain = make("vit_noqkvbias_avgpool")
    sites = ssf.find_sites(plain)
    backend = TorchBackend(plain, sites, torch.device("cpu"), torch.float32, 1 << 30, EngineMetrics())
    every = random_entry(backend, "every", 1, sites)
    no_qkv = random_entry(backend, "no-qkv", 2, [s for s in sites if not s.path.endswith("qkv")])
    old, _, _ = backend.builder.build(every.delta.sites, every.head)
    assert any(k.endswith("qkv.bias") for k in old.state_dict())
    built, _, _ = backend.builder.build(no_qkv.delta.sites, no_qkv.head, reuse=old)
    fresh, _, _ = backend.builder.build(no_qkv.delta.sites, no_qkv.head)
    assert built is not old and not any(k.endswith("qkv.bias") for k in built.state_dict())
    x = torch.randn(2, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(built(x), fresh(x))
