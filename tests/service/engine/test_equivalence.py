"""B10 in miniature: merged path, mixed path (batches of many tasks), ONNX (its mixed graph and its per-task
sessions) and the offline reference (the folded plain timm model from ssf.merge_model) agree for every
family: same top-1, scores within 1e-4."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import timm
import torch

import ssf
from service.engine.engine import Engine
from service.engine.metrics import EngineMetrics
from service.engine.onnx_backend import OnnxBackend
from service.engine.protocol import PredictionResult
from service.engine.residency import TaskEntry
from service.engine.torch_backend import TorchBackend
from service.settings import EngineConfig
from service.store.base import StoredTask
from tests.helpers.deltas import delta_bytes, make_task, reference_logits
from tests.helpers.images import images
from tests.helpers.models import MODELS, backbone_file
from tests.helpers.stores import MemoryStore

TASKS = 4  # task 3 is a head-only (linear-probe) delta: it runs on the identity row
FAMILIES = ["vit", "swin", "convnext", "resnet"]


def method(i: int) -> str:
    return "linear" if i == TASKS - 1 else "ssf"


def scores(result: PredictionResult) -> torch.Tensor:
    """All classes' scores in class order (predict is called with top_k = num_classes)."""
    return torch.tensor([[s.score for s in sorted(row, key=lambda s: s.index)] for row in result.predictions])


async def serve(engine: Engine, deltas: list[bytes], batch: list[bytes]) -> list[PredictionResult]:
    await engine.start()
    try:
        for i, data in enumerate(deltas):
            await engine.add_task(data, f"task-{i}", replace=False)
        # all tasks at once: the mixed engine must put many tasks in one batch
        return list(
            await asyncio.gather(*(engine.predict(f"task-{i}", batch, top_k=5) for i in range(TASKS)))
        )
    finally:
        await engine.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_mixed_onnx_and_reference_agree(family: str, weights_dir: Path) -> None:
    weights = backbone_file(family, weights_dir)
    models = [make_task(family, seed=i, method=method(i)) for i in range(TASKS)]
    deltas = [delta_bytes(family, m, f"task-{i}", method(i)) for i, m in enumerate(models)]
    batch = images(3, seed=7)

    def engine(backend: str = "torch", policy: str = "auto") -> Engine:
        config = EngineConfig(backend=backend, path_policy=policy, max_queue_delay_ms=200)  # type: ignore[arg-type]
        return Engine(MODELS[family], weights, MemoryStore(), config=config)

    engines = {
        "mixed": engine(policy="mixed"),
        "merged": engine(policy="merged"),
        "onnx": engine(backend="onnx", policy="mixed"),
        "onnx merged": engine(backend="onnx", policy="merged"),
    }
    results = {name: asyncio.run(serve(e, deltas, batch)) for name, e in engines.items()}

    # the mixed engines really put several tasks in one batch; the merged ones never did. Swin's windows
    # (k*B samples) leave the ONNX backend without a mixed graph: one task per batch there
    def sample(name: str, key: str, labels: dict[str, str] | None = None) -> float:
        return engines[name].metrics.registry.get_sample_value(key, labels or {}) or 0.0

    assert engines["onnx"].backend.mixes == (family != "swin")
    for name in ("mixed", "onnx") if family != "swin" else ("mixed",):
        tasks_per_batch = sample(name, "ssf_engine_tasks_per_batch_sum")
        assert tasks_per_batch > sample(name, "ssf_engine_tasks_per_batch_count")
    assert sample("merged", "ssf_engine_batches_total", {"path": "merged"}) == TASKS
    assert sample("onnx merged", "ssf_engine_batches_total", {"path": "onnx"}) == TASKS

    x = engines["mixed"].preprocess(batch)
    for i, model in enumerate(models):
        want = torch.softmax(reference_logits(model, x), dim=-1)
        assert (want - want.mean()).abs().max() > 1e-3  # the task's output is not degenerate
        for path, per_task in results.items():
            got = scores(per_task[i])
            assert per_task[i].version == 1 and per_task[i].task == f"task-{i}"
            assert got.shape == want.shape
            assert torch.equal(got.argmax(-1), want.argmax(-1)), (path, i)
            assert (got - want).abs().max() <= 1e-4, (path, i, float((got - want).abs().max()))
            labels = [row[0].label for row in per_task[i].predictions]
            assert labels == [f"task-{i}-class{int(k)}" for k in want.argmax(-1)]


def test_onnx_mapping_survives_equal_valued_weights() -> None:
    """A freshly initialised backbone has many equal tensors (LayerNorm ones, zero biases) that the exporter
    would merge into one initializer; every task's graph must still match its PyTorch merged copy."""
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, qkv_bias=False).eval()
    sites = ssf.find_sites(model)
    metrics = EngineMetrics()
    onnx = OnnxBackend(model, sites, 1 << 30, metrics)  # first: TorchBackend attaches its gather sites
    backend = TorchBackend(model, sites, torch.device("cpu"), torch.float32, 1 << 30, metrics)
    g = torch.Generator().manual_seed(0)
    tensors = {
        s.path: (1 + 0.3 * torch.randn(s.channels, generator=g), 0.3 * torch.randn(s.channels, generator=g))
        for s in sites
    }
    head = {k: torch.randn(v.shape, generator=g) for k, v in backend.base.items() if k.startswith("head.")}
    delta = ssf.Delta("t", "test_vit", "", "foldable", "ssf", ["a", "b", "c"], tensors, head)
    task = TaskEntry(stored=StoredTask("t", 1, "", 0, ""), delta=delta)
    backend.install(task)
    x = torch.randn(2, 3, 160, 160, generator=g)
    want = backend.run_merged(task, x)
    got = onnx.run("onnx", x, [(task, 2)]).outputs[0]
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert (
        onnx.graphs.created
    )  # qkv_bias=False: folding creates the qkv biases, carried by their own initializers


def test_onnx_model_export_serves_the_current_version(weights_dir: Path) -> None:
    """GET /tasks/{name}/model.onnx from a torch engine: input ``image``, output ``logits``, dynamic batch,
    the folded task (not the base), and a new graph after a replace."""
    import onnxruntime as ort

    weights = backbone_file("vit", weights_dir)
    v1, v2 = make_task("vit", seed=90), make_task("vit", seed=91)
    batch = images(3, seed=2)

    async def scenario() -> None:
        engine = Engine(MODELS["vit"], weights, MemoryStore())
        await engine.start()
        try:
            x = engine.preprocess(batch)
            for version, model in ((1, v1), (2, v2)):
                await engine.add_task(delta_bytes("vit", model, "edge"), None, replace=version == 2)
                session = ort.InferenceSession(
                    await engine.onnx_model("edge"), providers=["CPUExecutionProvider"]
                )
                assert [i.name for i in session.get_inputs()] == ["image"]
                assert [o.name for o in session.get_outputs()] == ["logits"]
                want = reference_logits(model, x)
                for n in (1, 3):
                    got = torch.from_numpy(session.run(["logits"], {"image": x[:n].numpy()})[0])
                    assert got.shape == (n, 5)
                    assert (got - want[:n]).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
        finally:
            await engine.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("family", ["resnet", "efficientnet", "mixer"])
def test_backend_paths_match_the_reference_for_more_families(family: str) -> None:
    """BatchNorm convs (ResNet), norm+act layers whose site is the inner ``drop`` (EfficientNet) and MLP
    mixers, straight on the backend (the engine's fingerprint check is exercised elsewhere)."""
    from ssf.layers import head_tensors, site_tensors
    from tests.helpers.models import make

    tuned = make(family)
    sites = ssf.inject_ssf(tuned)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for affine in tuned.ssf.values():
            affine.scale.copy_(1 + 0.3 * torch.randn(affine.scale.shape, generator=g))
            affine.shift.copy_(0.3 * torch.randn(affine.shift.shape, generator=g))
    metrics = EngineMetrics()
    backend = TorchBackend(make(family), sites, torch.device("cpu"), torch.float32, 1 << 30, metrics)
    tensors = site_tensors(tuned)
    entries = []
    for i, scale in enumerate((1.0, 0.5)):  # two tasks in one mixed batch: this one and a rescaled one
        sites_i = {p: (s * scale + (1 - scale), b * scale) for p, (s, b) in tensors.items()}
        delta = ssf.Delta(
            f"t{i}", family, "", "foldable", "ssf", [str(k) for k in range(7)], sites_i, head_tensors(tuned)
        )
        entries.append(TaskEntry(stored=StoredTask(f"t{i}", 1, "", 0, ""), delta=delta))
        backend.install(entries[-1])
    x = torch.randn(4, *ssf.sites.input_size(tuned), generator=g)
    with torch.no_grad():
        want = ssf.merge_model(tuned)(x)
    mixed = backend.run_mixed(torch.cat([x[:2], x]), [(entries[1], 2), (entries[0], 4)])[1]
    merged = backend.run_merged(entries[0], x)
    tol = 1e-4 * max(1.0, float(want.abs().max()))
    assert (mixed - want).abs().max() <= tol and (merged - want).abs().max() <= tol
