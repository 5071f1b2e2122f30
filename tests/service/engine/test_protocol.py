"""The engine's declared seams: the real Engine and the test engine implement every EngineAPI member alike,
both backends every Backend member, and startup failures are typed (reported without a traceback)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import pytest
import timm
import torch
from fastapi.testclient import TestClient

import ssf
from service.api.app import create_app
from service.engine.backend import Backend
from service.engine.engine import Engine
from service.engine.metrics import EngineMetrics
from service.engine.onnx_backend import OnnxBackend
from service.engine.protocol import BackboneUnusable, DeviceUnavailable, EngineAPI, StartupError
from service.engine.torch_backend import TorchBackend
from service.settings import EngineConfig, Settings
from tests.helpers.engines import FakeEngine
from tests.helpers.stores import MemoryStore


def members(protocol: type) -> set[str]:
    declared = {n for n in vars(protocol) if not n.startswith("_")}
    return declared | set(getattr(protocol, "__annotations__", {}))


def assert_implements(cls: type, protocol: type) -> None:
    for name in sorted(members(protocol)):
        want = inspect.getattr_static(protocol, name, None)
        if want is None:  # a data member (``ready``): set on instances, checked by isinstance below
            continue
        got = inspect.getattr_static(cls, name, None)
        assert got is not None, f"{cls.__name__} lacks {name}"
        if isinstance(want, property):
            assert isinstance(got, property), f"{cls.__name__}.{name} must be a property"
            continue
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), (cls.__name__, name)
        params = [(p.name, p.default) for p in inspect.signature(got).parameters.values()]
        wanted = [(p.name, p.default) for p in inspect.signature(want).parameters.values()]
        assert params == wanted, (cls.__name__, name, params, wanted)


@pytest.mark.parametrize("cls", [Engine, FakeEngine])
def test_both_engines_implement_every_member_of_the_protocol(cls: type) -> None:
    assert {"start", "stop", "metrics_registry", "ready", "predict", "onnx_model"} <= members(EngineAPI)
    assert_implements(cls, EngineAPI)


def test_engine_instances_satisfy_the_protocol() -> None:
    engine = Engine("test_vit", None, MemoryStore(), pretrained=False)
    assert isinstance(engine, EngineAPI) and isinstance(FakeEngine(), EngineAPI)
    assert not isinstance(object(), EngineAPI)


@pytest.mark.parametrize("cls", [TorchBackend, OnnxBackend])
def test_both_backends_implement_every_member_of_the_contract(cls: type) -> None:
    assert {"install", "adopt", "release", "run", "warmup", "export_onnx", "mixes"} <= members(Backend)
    assert_implements(cls, Backend)
    assert isinstance(cls.mixes, bool) and cls.single_task_path in ("merged", "onnx")


def test_a_torch_backend_instance_satisfies_the_contract() -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    backend = TorchBackend(
        model, ssf.find_sites(model), torch.device("cpu"), torch.float32, 1 << 20, EngineMetrics()
    )
    assert isinstance(backend, Backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_missing_device_is_a_typed_startup_error() -> None:
    engine = Engine("test_vit", None, MemoryStore(), config=EngineConfig(device="cuda"), pretrained=False)
    with pytest.raises(DeviceUnavailable, match="cuda"):
        asyncio.run(engine.start())
    asyncio.run(engine.stop())


class FailsToStart(FakeEngine):
    def __init__(self, error: Exception) -> None:
        super().__init__(ready=False)
        self.error = error

    async def start(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "traceback"),
    [(BackboneUnusable("weights do not fit"), False), (RuntimeError("a bug"), True)],
)
def test_startup_errors_are_reported_and_only_bugs_carry_a_traceback(
    error: Exception, traceback: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(Settings(model="m"), engine=FailsToStart(error))
    with caplog.at_level(logging.ERROR, logger="service.api"), TestClient(app) as c:
        assert c.get("/readyz").status_code == 503
    assert app.state.start_error == str(error)
    (record,) = [r for r in caplog.records if "failed to start" in r.getMessage()]
    assert (record.exc_info is not None) == traceback
    assert isinstance(error, StartupError) != traceback


def test_settings_are_the_engines_config_with_the_same_names() -> None:
    settings: Any = Settings(model="m", max_queue_size=7, max_images_per_request=7)
    assert isinstance(settings, EngineConfig)
    assert set(EngineConfig.model_fields) <= set(Settings.model_fields)
    with pytest.raises(ValueError, match="max_queue_size"):
        EngineConfig(max_queue_size=2, max_images_per_request=3)
