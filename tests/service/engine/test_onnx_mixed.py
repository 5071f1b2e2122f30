"""The ONNX backend's mixed graph (one session, the batch's scale/shift rows as inputs) answers what the
folded reference answers for batches that mix tasks; a backbone it cannot be exported for keeps the
per-task sessions; an ONNX engine puts many tasks in one batch."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch

import ssf
from service.engine import onnx_mixed
from service.engine.engine import Engine
from service.engine.metrics import EngineMetrics
from service.engine.onnx_backend import OnnxBackend
from service.settings import EngineConfig
from tests.helpers.deltas import delta_bytes, make_task
from tests.helpers.images import images
from tests.helpers.models import MODELS, backbone_file, make
from tests.helpers.stores import MemoryStore
from tests.helpers.tuned import entry, tuned


@pytest.mark.parametrize("family", ["vit", "efficientnet", "resnet", "convnext"])
def test_the_mixed_graph_matches_the_folded_reference(family: str) -> None:
    models = [tuned(family, seed) for seed in range(3)]
    plain = make(family)
    backend = OnnxBackend(plain, ssf.find_sites(plain), 1 << 30, EngineMetrics())
    assert backend.mixes and backend.mixed is not None
    # the export left the model as it was: no patched forward, every module still in eval mode
    assert not any("forward" in vars(m) for m in plain.modules())
    assert not any(m.training for m in plain.modules())
    if family in ("efficientnet", "resnet"):  # every BatchNorm runs fused with its conv: x * A + C
        norms = [
            s for s in ssf.find_sites(plain) if isinstance(plain.get_submodule(s.path), torch.nn.BatchNorm2d)
        ]
        assert backend.mixed.norms is not None and len(backend.mixed.norms.paths) == len(norms) > 0
    entries = [entry(family, m, f"t{i}") for i, m in enumerate(models)]
    for e in entries:
        backend.install(e)
    assert [e.row for e in entries] == [1, 2, 3] and not backend.sessions.keys()  # rows, no sessions
    x = torch.randn(5, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = [ssf.merge_model(m)(x) for m in models]
    tol = 1e-4 * max(1.0, max(float(w.abs().max()) for w in want))
    groups = [(entries[2], 1), (entries[0], 2), (entries[1], 1), (entries[2], 1)]  # mixed, in runs
    got = torch.cat(backend.run("mixed", x, groups).outputs)
    expected = torch.cat([want[2][:1], want[0][1:3], want[1][3:4], want[2][4:5]])
    assert (got - expected).abs().max() <= tol
    (one,) = backend.run("onnx", x, [(entries[1], 5)]).outputs  # a one-task batch: its merged session
    assert (one - want[1]).abs().max() <= tol and backend.merged_cached(entries[1])
    backend.release(entries[0])  # the row is the identity again, and is the next one given out
    assert entries[0].row == 0 and backend.mixed.tables.rows_used == 2


def test_the_mixed_graph_runs_linear_and_conv_sites_without_their_bias() -> None:
    """As in the torch mixed path, a plain Linear or Conv2d site's op is exported without its bias (no bias in
    the graph) and its shift column holds it: the identity row is the bias, and answers the bare model."""
    import onnx

    plain = make("vit")
    sites = ssf.find_sites(plain)
    biased = [s for s in sites if type(plain.get_submodule(s.path)) in (torch.nn.Linear, torch.nn.Conv2d)]
    mixed = onnx_mixed.MixedSession(plain, sites)
    for s in biased:
        assert torch.equal(mixed.tables.shift[s.path][0], plain.get_submodule(s.path).bias.detach())
    graph = onnx.load_from_string(
        onnx_mixed.export_mixed(plain, mixed.tables.sites, {}, True, onnx_mixed.bias_free_ops(plain, sites))
    ).graph
    initializers = {i.name for i in graph.initializer}  # the exporter names them after the trunk's modules
    assert "model.blocks.0.norm1.bias" in initializers  # a LayerNorm keeps its bias
    assert not [n for s in biased if (n := f"model.{s.path}.bias") in initializers]
    x = torch.randn(2, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = plain.forward_head(plain.forward_features(x), pre_logits=True)
    got = torch.from_numpy(onnx_mixed.run(mixed.session, *mixed._inputs(x, torch.zeros(2, dtype=torch.long))))
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_a_backbone_the_mixed_graph_cannot_be_exported_for_keeps_per_task_sessions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Swin's attention runs on k*B windows: its sites' per-sample rows do not broadcast, the export fails,
    and the backend says so once and serves one task per batch as before."""
    plain = make("swin")
    with caplog.at_level(logging.WARNING, logger="ssf.engine"):
        backend = OnnxBackend(plain, ssf.find_sites(plain), 1 << 30, EngineMetrics())
    assert not backend.mixes and backend.mixed is None
    assert "no mixed ONNX graph" in caplog.text
    assert not any("forward" in vars(m) for m in plain.modules())
    model = tuned("swin", 0)
    e = entry("swin", model, "t0")
    backend.install(e)
    assert e.prebuilt is not None  # without the mixed graph the session is built when installed
    x = torch.randn(2, *ssf.sites.input_size(plain), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ssf.merge_model(model)(x)
    (got,) = backend.run("onnx", x, [(e, 2)]).outputs
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_an_export_that_disagrees_with_torch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exported graph is checked against its torch forward: a slot that traced differently (here: the
    exporter sees a shift it does not add) fails that check instead of serving wrong scores."""
    real = onnx_mixed._Slot.__call__
    exporting = {"on": False}
    original_export = torch.onnx.export

    def export(*args: object, **kwargs: object) -> object:
        exporting["on"] = True
        try:
            return original_export(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            exporting["on"] = False

    def skewed(self: onnx_mixed._Slot, *args: object, **kwargs: object) -> torch.Tensor:
        y = real(self, *args, **kwargs)
        return y + 1.0 if exporting["on"] else y

    monkeypatch.setattr(onnx_mixed._Slot, "__call__", skewed)
    monkeypatch.setattr(torch.onnx, "export", export)
    plain = make("vit")
    with pytest.raises(onnx_mixed.OnnxExportError, match="differs from its torch forward"):
        onnx_mixed.export_mixed(plain, ssf.find_sites(plain), {}, pre_logits=True)
    assert not any("forward" in vars(m) for m in plain.modules())


def test_an_onnx_engine_mixes_tasks_in_one_batch(weights_dir: Path) -> None:
    family = "vit"
    models = [make_task(family, seed=40 + i) for i in range(4)]
    config = EngineConfig(backend="onnx", max_queue_delay_ms=200)
    engine = Engine(MODELS[family], backbone_file(family, weights_dir), MemoryStore(), config=config)
    batch = images(2, seed=4)

    async def scenario() -> list[torch.Tensor]:
        await engine.start()
        try:
            for i, m in enumerate(models):
                await engine.add_task(delta_bytes(family, m, f"task-{i}"), None, replace=False)
            results = await asyncio.gather(*(engine.predict(f"task-{i}", batch, top_k=5) for i in range(4)))
            return [
                torch.tensor([[s.score for s in sorted(row, key=lambda s: s.index)] for row in r.predictions])
                for r in results
            ]
        finally:
            await engine.stop()

    got = asyncio.run(scenario())
    sample = engine.metrics.registry.get_sample_value
    assert sample("ssf_engine_batches_total", {"path": "mixed"}) >= 1
    assert sample("ssf_engine_tasks_per_batch_sum") > sample("ssf_engine_tasks_per_batch_count")
    x = engine.preprocess(batch)
    for m, scores in zip(models, got, strict=True):
        with torch.no_grad():
            want = torch.softmax(ssf.merge_model(m)(x), dim=-1)
        assert (scores - want).abs().max() <= 1e-4
