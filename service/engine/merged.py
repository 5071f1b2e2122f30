"""Merged copies: a task folded into the pristine base weights, a plain timm model with no hooks.

A merged copy is exactly the bare backbone (zero overhead). It is built from the untouched base state dict
with ``ssf.fold_state_dict`` into a meta-device skeleton, never by "unmerging" another copy; tensors the fold
leaves alone are shared with the base, so a copy costs only the bytes of what folding replaced. Copies live
in an LRU bounded in bytes, keyed by (task, version), with one build at a time per key.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

import torch
from torch import nn

import ssf
from service.engine.metrics import EngineMetrics
from ssf.fold import fold_site

V = TypeVar("V")
Key = tuple[str, int]


class ByteLRU(Generic[V]):
    """An LRU cache bounded by the bytes of its values; ``get_or_build`` builds each key once at a time."""

    def __init__(self, name: str, max_bytes: int, metrics: EngineMetrics) -> None:
        self.name, self.max_bytes, self.metrics = name, max_bytes, metrics
        self._items: OrderedDict[Key, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Key, threading.Lock] = {}
        self.bytes = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def keys(self) -> list[Key]:
        return list(self._items)

    def get(self, key: Key) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def get_or_build(self, key: Key, build: Callable[[], tuple[V, int]]) -> tuple[V, bool]:
        """(value, built): a hit, or a build under the key's lock (concurrent callers wait for it)."""
        value = self.get(key)
        if value is not None:
            self.metrics.cache_hits.labels(self.name).inc()
            return value, False
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            value = self.get(key)
            if value is not None:
                self.metrics.cache_hits.labels(self.name).inc()
                return value, False
            self.metrics.cache_misses.labels(self.name).inc()
            value, nbytes = build()
            self.put(key, value, nbytes)
        with self._lock:
            self._key_locks.pop(key, None)
        return value, True

    def put(self, key: Key, value: V, nbytes: int) -> None:
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if nbytes > self.max_bytes:
                return  # larger than the whole cache: used once, never kept
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.bytes -= evicted
                self.metrics.cache_evictions.labels(self.name).inc()
            self.metrics.cache_bytes.labels(self.name).set(self.bytes)

    def make_room(self, nbytes: int) -> list[V]:
        """Evict least-recently-used values until ``nbytes`` more fit; returns them (oldest first), so a
        build can write into an evicted value's memory instead of allocating (and page-faulting) anew."""
        evicted: list[V] = []
        with self._lock:
            while self._items and self.bytes + nbytes > self.max_bytes:
                _, (value, size) = self._items.popitem(last=False)
                self.bytes -= size
                evicted.append(value)
                self.metrics.cache_evictions.labels(self.name).inc()
            self.metrics.cache_bytes.labels(self.name).set(self.bytes)
        return evicted

    def discard(self, key: Key) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.bytes -= item[1]
                self.metrics.cache_bytes.labels(self.name).set(self.bytes)


def meta_skeleton(plain: nn.Module) -> nn.Module:
    """A copy of ``plain`` whose state-dict tensors are on the meta device (non-persistent buffers, such as
    Swin's relative position index, stay real: they are not in the state dict and folding never touches them).
    """
    names = set(plain.state_dict())
    memo: dict[int, object] = {}
    for name, t in [*plain.named_parameters(), *plain.named_buffers()]:
        if name in names:
            memo[id(t)] = (
                t.to("meta")
                if not isinstance(t, nn.Parameter)
                else nn.Parameter(t.detach().to("meta"), requires_grad=False)
            )
    return copy.deepcopy(plain, memo)


def assign_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], expected: set[str] | None = None
) -> None:
    """Make ``state``'s tensors the model's own (no copy), including head tensors of another class count.
    ``expected``: the model's state-dict keys, when the caller has them (``state_dict()`` costs ms)."""
    if expected is None:
        ssf.add_created_biases(model, state)
        expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"merged state does not fit the model: missing {missing[:3]}, extra {extra[:3]}")
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor
    classifier = model.get_classifier()  # type: ignore[operator]
    weight = getattr(classifier, "weight", None)
    if isinstance(classifier, nn.Linear) and isinstance(weight, torch.Tensor):
        classifier.out_features = weight.shape[0]


def build_plain(skeleton: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(skeleton)
    assign_state(model, state)
    return model.eval().requires_grad_(False)


class MergedBuilder:
    """Builds merged copies from the pristine base (held as tensors on the device)."""

    def __init__(self, skeleton: nn.Module, base: dict[str, torch.Tensor], sites: list[ssf.Site]) -> None:
        self.skeleton, self.base, self.sites = skeleton, base, sites
        self._base_ptrs = {t.data_ptr() for t in base.values()}

    def merged_state(
        self, sites: Mapping[str, tuple[torch.Tensor, torch.Tensor]], head: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        any_base = next(iter(self.base.values()))
        tensors = {p: (s.to(any_base.device), b.to(any_base.device)) for p, (s, b) in sites.items()}
        folded = [s for s in self.sites if s.path in tensors]
        return ssf.fold_state_dict(self.base, folded, tensors, dict(head))

    def refolded_state(
        self,
        current: Mapping[str, torch.Tensor],
        sites: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        head: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``merged_state``, writing each folded weight into ``model``'s own tensor of that name when it has
        one of the right shape and dtype that is not the base's (float32: the fresh path's very op).
        ``current``: that model's state dict."""
        own = {k: t for k, t in current.items() if t.data_ptr() not in self._base_ptrs}
        any_base = next(iter(self.base.values()))
        state = dict(self.base)

        def put(key: str, value: torch.Tensor) -> None:
            target = own.get(key)
            if target is not None and target.shape == value.shape and target.dtype == value.dtype:
                state[key] = target.copy_(value)
            else:
                state[key] = value

        for site in self.sites:
            if site.path not in sites:
                continue
            scale, shift = (t.to(any_base.device) for t in sites[site.path])
            p = site.path
            w, buf = self.base.get(f"{p}.weight"), own.get(f"{p}.weight")
            if not (
                site.fold in ("weight_out", "affine")
                and w is not None
                and buf is not None
                and buf.shape == w.shape
                and w.dtype == buf.dtype == scale.dtype == shift.dtype == torch.float32
            ):
                for key, value in fold_site(self.base, site, scale, shift).items():
                    put(key, value)
                continue
            # ssf.fold_site's arithmetic for float32, into the tensors the copy already owns
            state[f"{p}.weight"] = torch.mul(w, scale.view((-1,) + (1,) * (w.dim() - 1)), out=buf)
            b = self.base.get(f"{p}.bias")
            put(f"{p}.bias", shift.clone() if b is None else b * scale + shift)
        state.update(head)
        return state

    def build(
        self,
        sites: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        head: Mapping[str, torch.Tensor],
        reuse: nn.Module | None = None,
    ) -> tuple[nn.Module, int, float]:
        """(plain model, bytes it owns beyond the base, seconds). ``reuse``: a merged copy nobody uses any
        more (the LRU's evicted one): the new copy is that module, its folded tensors overwritten in place
        (the same values, bit for bit, as a fresh build: the same ops, written with ``out=``)."""
        start = time.perf_counter()
        state = None
        if reuse is not None:
            current = reuse.state_dict()
            state = self.refolded_state(current, sites, head)
            if set(state) == set(current):
                assign_state(reuse, state, expected=set(current))
                model = reuse
            else:  # e.g. the old copy has a bias folding created that this task does not fold: fresh
                state = None
        if state is None:
            state = self.merged_state(sites, head)
            model = build_plain(self.skeleton, state)
        if next(iter(self.base.values())).is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        owned = sum(t.nbytes for t in state.values() if t.data_ptr() not in self._base_ptrs)
        return model, owned, seconds
