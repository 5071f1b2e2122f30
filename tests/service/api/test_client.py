"""The Python client against the app (through TestClient's transport): results and typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.client import Client, SSFError
from service.engine import protocol as p
from tests.helpers.api import TOKEN
from tests.helpers.engines import FakeEngine, fake_delta
from tests.helpers.images import png


def test_client_round_trip(client: TestClient, engine: FakeEngine, tmp_path: Path) -> None:
    c = Client(token=TOKEN, http=client)
    assert c.health() and c.ready()
    assert c.backbone()["model"] == "test_vit"
    path = tmp_path / "cats.safetensors"
    path.write_bytes(fake_delta("cats"))
    assert c.upload(path)["version"] == 1
    assert c.upload(fake_delta("cats"), replace=True)["version"] == 2
    assert c.upload(fake_delta("cats"), name="dogs")["name"] == "dogs"
    assert [t["name"] for t in c.list()] == ["cats", "dogs"]
    assert c.get("cats")["version"] == 2
    img = tmp_path / "a.png"
    img.write_bytes(png())
    out = c.predict("cats", [img, png()], top_k=2)
    assert out["version"] == 2 and len(out["predictions"]) == 2 and len(out["predictions"][0]) == 2
    assert c.onnx_model("cats") == b"ONNX:cats"
    c.delete("cats")
    with pytest.raises(SSFError) as e:
        c.get("cats")
    assert e.value.status == 404 and e.value.code == "task_not_found"


def test_client_errors(client: TestClient, engine: FakeEngine) -> None:
    with pytest.raises(SSFError) as e:
        Client(http=client).upload(fake_delta())
    assert (e.value.status, e.value.code) == (401, "missing_token")
    with pytest.raises(SSFError) as e:
        Client(token="nope", http=client).delete("x")
    assert e.value.status == 403
    engine.fail_with = p.Overloaded("busy", retry_after_s=3)
    with pytest.raises(SSFError) as e:
        Client(http=client).list()
    assert (e.value.status, e.value.code, e.value.retry_after_s) == (429, "overloaded", 3.0)
