"""The GPU set (marker ``gpu``; skipped without CUDA): the merged, mixed and ONNX Runtime CUDA-provider paths
agree with the folded reference on the device.

- float32: within 1e-4 of the reference's scores (the CPU tests' bound), with TF32 off, which is how the
  engine runs float32 on CUDA (``TorchBackend`` turns cuDNN/cuBLAS TF32 off: TF32 keeps 10 mantissa bits, so
  it would break the exactness the float32 path promises).
- float16 / bfloat16: the relative error of the logits, ``||out - ref|| / ||ref||`` against a float64
  reference, stays under 1e-2 (fp16, 10 mantissa bits) and 4e-2 (bf16, 7 bits); top-1 agrees wherever the
  reference's margin between its two best classes is above 5 % of the logit scale.

Every measured error is appended to ``$SSF_GPU_REPORT`` (JSON lines) when that variable is set, so the run
on a lent GPU can be recorded in BENCHMARKS.md with the numbers, not just "passed".
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import ssf
from tests.helpers.models import MODELS, backbone_file, make
from tests.helpers.tuned import entry
from tests.helpers.tuned import tuned as tuned_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
FAMILIES = ["vit", "swin", "convnext", "resnet", "efficientnet", "mixer"]
REL_TOL = {"float16": 1e-2, "bfloat16": 4e-2}


def record(**row: Any) -> None:
    path = os.environ.get("SSF_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def entries_for(family: str, tuned: list[torch.nn.Module]) -> list[Any]:
    return [entry(family, model, f"t{i}") for i, model in enumerate(tuned)]


def reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The folded plain model in float64 on the CPU: the yardstick for every device and dtype."""
    with torch.no_grad():
        return ssf.merge_model(model).double()(x.double()).float()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double() - want.double()).norm() / want.double().norm())


def check(family: str, dtype: str, path: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = rel_err(got, want)
    abs_err = float((torch.softmax(got, -1) - torch.softmax(want, -1)).abs().max())
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * want.abs().max()
    agree = bool((got.argmax(-1) == want.argmax(-1))[clear].all())
    record(test="paths", family=family, dtype=dtype, path=path, rel_err=err, score_abs_err=abs_err)
    assert agree, (family, dtype, path)
    if dtype == "float32":
        assert abs_err <= 1e-4, (family, path, abs_err)
    else:
        assert err <= REL_TOL[dtype], (family, dtype, path, err)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_and_merged_match_the_folded_reference_on_cuda(family: str, dtype: str) -> None:
    from service.engine.metrics import EngineMetrics
    from service.engine.torch_backend import TorchBackend

    tuned = [tuned_model(family, seed) for seed in (1, 2)]
    sites = ssf.find_sites(make(family))
    backend = TorchBackend(make(family), sites, CUDA, getattr(torch, dtype), 1 << 32, EngineMetrics())
    entries = entries_for(family, tuned)
    for e in entries:
        backend.install(e)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, *ssf.sites.input_size(tuned[0]), generator=g)
    want = [reference(m, x) for m in tuned]
    # one mixed batch of both tasks (task 1 first, on two of the images), then each task's merged copy
    mixed = backend.run_mixed(torch.cat([x[:2], x]), [(entries[1], 2), (entries[0], 4)])
    check(family, dtype, "mixed", mixed[0], want[1][:2])
    check(family, dtype, "mixed", mixed[1], want[0])
    for e, w in zip(entries, want, strict=True):
        check(family, dtype, "merged", backend.run_merged(e, x), w)


def test_engine_serves_on_cuda_end_to_end(tmp_path: Path) -> None:
    """The whole engine (scheduler, batching, both paths) with ``device='cuda'``: answers equal the CPU
    reference, and the batches really ran on the device."""
    from service.engine.engine import Engine
    from service.settings import EngineConfig
    from tests.helpers.deltas import delta_bytes, make_task
    from tests.helpers.images import images
    from tests.helpers.stores import MemoryStore

    weights = backbone_file("vit", tmp_path)
    models = [make_task("vit", seed=i) for i in range(3)]
    batch = images(3, seed=7)

    async def scenario(policy: str) -> list[Any]:
        config = EngineConfig(device="cuda", path_policy=policy, max_queue_delay_ms=200)  # type: ignore[arg-type]
        engine = Engine(MODELS["vit"], weights, MemoryStore(), config=config)
        await engine.start()
        try:
            for i, m in enumerate(models):
                await engine.add_task(delta_bytes("vit", m, f"task-{i}"), f"task-{i}", replace=False)
            assert engine.backend.device.type == "cuda"
            x = engine.preprocess(batch)
            results = await asyncio.gather(*(engine.predict(f"task-{i}", batch, top_k=5) for i in range(3)))
            return [(x, r) for r in results]
        finally:
            await engine.stop()

    for policy in ("mixed", "merged"):
        for i, (x, result) in enumerate(asyncio.run(scenario(policy))):
            want = torch.softmax(reference(models[i], x), -1)
            got = torch.tensor(
                [[s.score for s in sorted(row, key=lambda s: s.index)] for row in result.predictions]
            )
            err = float((got - want).abs().max())
            record(test="engine", policy=policy, task=i, score_abs_err=err)
            assert torch.equal(got.argmax(-1), want.argmax(-1)) and err <= 1e-4, (policy, i, err)


@pytest.mark.parametrize("family", ["vit", "convnext", "resnet", "efficientnet"])
def test_onnx_runtime_cuda_provider_matches_the_reference(family: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install the gpu extra)")
    from service.engine.merged import meta_skeleton
    from service.engine.onnx_graph import OnnxGraphs, new_session

    (tuned,) = [tuned_model(family, 3)]
    base = make(family)
    graphs = OnnxGraphs(
        meta_skeleton(base), base.state_dict(), [s for s in ssf.find_sites(base) if s.foldable]
    )
    (entry,) = entries_for(family, [tuned])
    session = new_session(graphs.merged_bytes(entry.delta), device="cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    x = torch.randn(3, *ssf.sites.input_size(tuned), generator=torch.Generator().manual_seed(9))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    check(family, "float32", "onnx-cuda", got, reference(tuned, x))


@pytest.mark.parametrize("family", ["vit", "efficientnet", "swin"])
def test_cuda_graph_replays_equal_the_eager_mixed_path(family: str) -> None:
    """Padded sizes (3 -> 4), several batches through one graph, and a table that grows between replays
    (its graphs are dropped and captured again): every answer equals the folded reference."""
    from service.engine.metrics import EngineMetrics
    from service.engine.torch_backend import TorchBackend

    tuned = [tuned_model(family, seed) for seed in range(12)]
    backend = TorchBackend(
        make(family), ssf.find_sites(make(family)), CUDA, torch.float32, 1 << 32, EngineMetrics()
    )
    backend.use_cuda_graphs(8)
    graphed = backend.mixed.runner
    entries = entries_for(family, tuned)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, *ssf.sites.input_size(tuned[0]), generator=g)
    for e in entries[:6]:  # capacity 8: 6 rows + the identity fit; the next installs grow the table
        backend.install(e)
    for first, second in ((0, 1), (2, 3), (4, 5)):
        out = backend.run_mixed(x, [(entries[first], 1), (entries[second], 2)])
        check(family, "float32", "mixed-graph", out[0], reference(tuned[first], x[:1]))
        check(family, "float32", "mixed-graph", out[1], reference(tuned[second], x[1:]))
    assert graphed.captures == 1 and 4 in graphed.graphs and not graphed.failed
    for e in entries[6:]:
        backend.install(e)  # the table doubles: new addresses
    out = backend.run_mixed(x, [(entries[11], 3)])
    check(family, "float32", "mixed-graph", out[0], reference(tuned[11], x))
    assert graphed.captures == 2
    record(test="graph", family=family, captures=graphed.captures)
