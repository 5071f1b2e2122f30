"""Shadow traffic and two-version evaluation through real HTTP on both stores: with a staged version, every
live request (SSF_SHADOW_FRACTION=1) also runs on it; the answers come from the current version only, and
the agreement and drift the server reports equal an offline comparison (ssf core, timm preprocessing) on
the same requests. ``?version=`` scores the staged version beside the current one, both equal to offline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.evaluation import expected_scores, offline_logits, softmax
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import Server, metric, start, stop, store_of, upload

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("shadow-backbone"))


@pytest.fixture(scope="module", params=["local", "redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, weights: Path
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"shadow-{request.param}")
    with store_of(request.param, tmp) as store:
        s = start(tmp, weights, store, shadow_fraction=1.0, max_queue_delay_ms=20)
        try:
            yield s
        finally:
            stop(s)


def stage(url: str, data: bytes) -> httpx.Response:
    return httpx.post(
        url + "/tasks?stage=true", headers=AUTH, files={"delta": ("d.safetensors", data)}, timeout=30
    )


def test_shadow_agreement_and_drift_equal_an_offline_comparison(server: Server, weights: Path) -> None:
    current, staged = task_delta("ants", 21), task_delta("ants", 22)
    assert upload(server.url, current).status_code == 201
    before = httpx.get(f"{server.url}/tasks/ants").json()
    assert before["shadow"] is None  # nothing staged: no comparison
    r = stage(server.url, staged)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2
    sent: list[bytes] = []
    for i in range(6):  # requests of 1 to 3 images
        images = [encode("PNG", 500 + 10 * i + j, size=(48, 40)) for j in range(1 + i % 3)]
        sent += images
        files = [("image", (f"{j}.png", b)) for j, b in enumerate(images)]
        p = httpx.post(f"{server.url}/tasks/ants/predict", files=files, params={"top_k": 1})
        assert p.status_code == 200, p.text
        assert p.json()["version"] == 1  # the answer comes from the current version only
    p_cur = softmax(offline_logits(weights, current, sent))
    p_stg = softmax(offline_logits(weights, staged, sent))
    agreement = float((p_cur.argmax(1) == p_stg.argmax(1)).mean())
    drift = float((0.5 * np.abs(p_cur - p_stg).sum(1)).mean())
    assert drift > 0
    shadow = httpx.get(f"{server.url}/tasks/ants").json()["shadow"]
    assert shadow["version"] == 2 and shadow["requests"] == 6 and shadow["images"] == len(sent)
    assert shadow["agreement"] == pytest.approx(agreement, abs=1e-9)
    assert shadow["drift"] == pytest.approx(drift, abs=1e-4)
    assert metric(server.url, "ssf_task_shadow_agreement", 'task="ants"') == pytest.approx(agreement)
    assert metric(server.url, "ssf_task_shadow_images_total", 'task="ants"') == len(sent)
    listed = {t["name"]: t for t in httpx.get(f"{server.url}/tasks").json()["tasks"]}
    assert listed["ants"]["shadow"] == shadow

    # evaluate the staged version beside the current one, in the same batches
    truth = [int(k) for k in p_cur.argmax(1)]
    labels = [f"ants-class{t}" for t in truth]
    parts = [("image", (f"{i}.png", b)) for i, b in enumerate(sent)]
    parts += [("label", (None, label)) for label in labels]
    r = httpx.post(
        f"{server.url}/tasks/ants/evaluate", files=parts, params={"version": 2}, headers=AUTH, timeout=60
    )
    assert r.status_code == 200, r.text
    cur, stg = r.json()["results"]
    assert (cur["version"], cur["current"], stg["version"], stg["current"]) == (1, True, 2, False)
    assert cur["accuracy"] == 1.0  # labelled with the current version's own top-1
    names = [f"ants-class{i}" for i in range(4)]
    for result, delta in ((cur, current), (stg, staged)):
        want = expected_scores(offline_logits(weights, delta, sent), truth, names, 15)
        assert result["confusion_matrix"]["counts"] == want["confusion"]
        assert result["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
        assert result["mean_confidence"] == pytest.approx(want["mean_confidence"], abs=1e-4)
        assert result["calibration_error"] == pytest.approx(want["calibration_error"], abs=1e-4)
    assert stg["accuracy"] == pytest.approx(agreement, abs=1e-9)  # agreement with the current top-1
    # each version keeps its own result (the staged one's in its own TaskInfo)
    got = httpx.get(f"{server.url}/tasks/ants/versions/2", headers=AUTH)
    assert got.status_code == 200, got.text
    assert got.json()["metrics"]["eval"]["accuracy"] == stg["accuracy"]
    assert httpx.get(f"{server.url}/tasks/ants").json()["metrics"]["eval"]["accuracy"] == 1.0
    assert httpx.delete(f"{server.url}/tasks/ants", headers=AUTH).status_code == 204
