"""Evaluation through real HTTP (``python -m service.cli`` in a subprocess) on both stores: the numbers equal
an offline computation with the ssf core on the same images; results are stored with the version
(``metrics.eval``); long evaluations run as a job; bad input is a 4xx naming the problem and changes
nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.api import AUTH, assert_error
from tests.helpers.deltas import task_delta
from tests.helpers.evaluation import expected_scores, image_folder_zip, offline_logits, softmax
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import Server, start, stop, store_of, upload
from tests.reliability.corpus import ARCHIVE_UNPACKED_LIMIT, hostile_archives

pytestmark = [pytest.mark.e2e]

LABELS = [f"cats-class{i}" for i in range(4)]
BINS = 15


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("eval-backbone"))


@pytest.fixture(scope="module", params=["local", "redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, weights: Path
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"eval-{request.param}")
    with store_of(request.param, tmp) as store:
        s = start(
            tmp,
            weights,
            store,
            eval_sync_max_images=12,
            max_batch_size=8,
            eval_max_unpacked_bytes=ARCHIVE_UNPACKED_LIMIT,
        )
        try:
            yield s
        finally:
            stop(s)


def images(n: int, seed: int) -> list[bytes]:
    formats = ["PNG", "JPEG", "WEBP", "BMP"]
    return [encode(formats[i % 4], seed * 1000 + i, size=(40 + i % 7, 36)) for i in range(n)]


def labelled(weights: Path, delta: bytes, imgs: list[bytes]) -> tuple[list[int], np.ndarray]:
    """Labels that make accuracy neither 0 nor 1: every other image labelled with the offline top-1."""
    logits = offline_logits(weights, delta, imgs)
    pred = softmax(logits).argmax(axis=1)
    truth = [int(pred[i]) if i % 2 == 0 else (int(pred[i]) + 1 + i % 3) % 4 for i in range(len(imgs))]
    return truth, logits


def post_pairs(url: str, task: str, imgs: list[bytes], labels: list[str], **params: object) -> httpx.Response:
    files = [("image", (f"{i}.img", b)) for i, b in enumerate(imgs)]
    data = {"label": labels}
    return httpx.post(
        f"{url}/tasks/{task}/evaluate", files=files, data=data, params=params, headers=AUTH, timeout=120
    )


def check_result(result: dict, expected: dict, version: int) -> None:
    assert result["version"] == version
    assert result["images"] == sum(map(sum, expected["confusion"]))
    assert result["confusion_matrix"] == {"labels": LABELS, "counts": expected["confusion"]}
    assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert result["per_class_accuracy"] == pytest.approx(expected["per_class_accuracy"], abs=1e-9)
    assert result["mean_confidence"] == pytest.approx(expected["mean_confidence"], abs=1e-4)
    assert result["calibration_error"] == pytest.approx(expected["calibration_error"], abs=1e-4)
    assert result["calibration_bins"] == BINS


def test_evaluation_equals_the_offline_computation_and_is_stored(server: Server, weights: Path) -> None:
    delta = task_delta("cats", 11)
    assert upload(server.url, delta).status_code == 201
    imgs = images(10, seed=1)
    truth, logits = labelled(weights, delta, imgs)
    expected = expected_scores(logits, truth, LABELS, BINS)
    assert 0 < expected["accuracy"] < 1  # type: ignore[operator]
    r = post_pairs(server.url, "cats", imgs, [LABELS[t] for t in truth])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "cats" and body["images"] == 10
    (result,) = body["results"]
    assert result["current"] is True
    check_result(result, expected, version=1)
    # stored with the version, shown in TaskInfo
    info = httpx.get(f"{server.url}/tasks/cats").json()
    stored = info["metrics"]["eval"]
    assert stored["accuracy"] == result["accuracy"] and stored["images"] == 10
    assert stored["confusion_matrix"]["counts"] == expected["confusion"]
    # and in the metrics
    text = httpx.get(f"{server.url}/metrics").text
    assert f'ssf_task_eval_accuracy{{task="cats",version="1"}} {result["accuracy"]}' in text
    httpx.delete(f"{server.url}/tasks/cats", headers=AUTH)


def test_an_archive_scores_like_the_same_pairs_and_a_long_one_runs_as_a_job(
    server: Server, weights: Path
) -> None:
    delta = task_delta("dogs", 12)
    assert upload(server.url, delta).status_code == 201
    labels = [f"dogs-class{i}" for i in range(4)]
    imgs = images(14, seed=2)  # over eval_sync_max_images=12: a job
    truth, logits = labelled(weights, delta, imgs)
    expected = expected_scores(logits, truth, labels, BINS)
    # the ImageFolder layout inside one top-level folder; sorted per class by the archive, so the
    # server's order differs from ours: the scores do not depend on order
    entries = [(f"set/{labels[t]}/{i:03d}.img", b) for i, (t, b) in enumerate(zip(truth, imgs, strict=True))]
    entries.append(("__MACOSX/set/._x", b"junk"))
    r = httpx.post(
        f"{server.url}/tasks/dogs/evaluate",
        files={"archive": ("set.zip", image_folder_zip(entries))},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["status_url"] == f"/tasks/dogs/evaluations/{job['id']}"
    deadline = time.monotonic() + 60
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = httpx.get(server.url + job["status_url"], headers=AUTH).json()
    assert job["state"] == "done", job
    assert job["done_images"] == 14
    (result,) = job["result"]["results"]
    assert result["confusion_matrix"] == {"labels": labels, "counts": expected["confusion"]}
    assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert result["mean_confidence"] == pytest.approx(expected["mean_confidence"], abs=1e-4)
    assert result["calibration_error"] == pytest.approx(expected["calibration_error"], abs=1e-4)
    assert httpx.get(f"{server.url}/tasks/dogs").json()["metrics"]["eval"]["images"] == 14
    # the status route needs the admin token, and names unknown jobs
    assert_error(httpx.get(server.url + job["status_url"]), 401)
    assert_error(
        httpx.get(f"{server.url}/tasks/dogs/evaluations/{'0' * 16}", headers=AUTH), 404, "job_not_found"
    )
    httpx.delete(f"{server.url}/tasks/dogs", headers=AUTH)


def test_evaluating_with_version_equal_to_the_current_one(server: Server, weights: Path) -> None:
    delta = task_delta("owls", 13)
    assert upload(server.url, delta).status_code == 201
    labels = [f"owls-class{i}" for i in range(4)]
    imgs = images(5, seed=3)
    r = post_pairs(server.url, "owls", imgs, [labels[i % 4] for i in range(5)], version=1)
    assert r.status_code == 200, r.text
    assert [res["version"] for res in r.json()["results"]] == [1]
    httpx.delete(f"{server.url}/tasks/owls", headers=AUTH)


def snapshot(url: str) -> list[dict]:
    return httpx.get(f"{url}/tasks").json()["tasks"]


def test_bad_input_is_a_4xx_naming_the_problem_and_changes_nothing(server: Server) -> None:
    assert upload(server.url, task_delta("bees", 14)).status_code == 201
    image = encode("PNG", 5)
    before = snapshot(server.url)
    refused: list[tuple[str, int, str]] = []
    for case in hostile_archives(image, "bees-class1"):
        r = httpx.post(
            f"{server.url}/tasks/bees/evaluate",
            files={"archive": ("a.zip", case.data)},
            headers=AUTH,
            timeout=60,
        )
        err = assert_error(r, case.status, case.code)
        refused.append((case.name, r.status_code, err["message"]))
    names = {name: message for name, _, message in refused}
    assert "'../evil.png'" in names["traversal-'../evil.png'"]
    assert "symbolic link" in names["symlink"] and "zebra" in names["unknown-label"]
    assert "bomb.png" in names["bomb-ratio"] and "bees-class1/bad.png" in names["undecodable-image"]
    pairs = [
        (2, ["bees-class0", "zebra"], {}, 422, "unknown_label", "zebra"),
        (2, ["bees-class0"], {}, 422, "label_count_mismatch", "2 images but 1 labels"),
        (0, ["bees-class0"], {}, 422, "no_images", "at least one"),
        (1, ["bees-class0"], {"version": 7}, 404, "version_not_found", "version 7"),
        (1, ["bees-class0"], {"version": 0}, 422, "invalid_parameter", "version"),
    ]
    for n, labels, params, status, code, text in pairs:
        parts = [("image", (f"{i}.png", image)) for i in range(n)]
        parts += [("label", (None, label)) for label in labels]  # text fields
        r = httpx.post(f"{server.url}/tasks/bees/evaluate", files=parts, params=params, headers=AUTH)
        err = assert_error(r, status, code)
        assert text in err["message"], err
    # no archive and pairs together; not multipart
    r = httpx.post(
        f"{server.url}/tasks/bees/evaluate",
        files=[("archive", ("a.zip", b"PK")), ("image", ("0.png", image))],
        data={"label": "bees-class0"},
        headers=AUTH,
    )
    assert_error(r, 422, "invalid_parameter")
    assert_error(httpx.post(f"{server.url}/tasks/bees/evaluate", json={}, headers=AUTH), 415)
    assert snapshot(server.url) == before  # nothing stored by any refusal
    assert "eval" not in httpx.get(f"{server.url}/tasks/bees").json()["metrics"]
    # a deleted task
    assert httpx.delete(f"{server.url}/tasks/bees", headers=AUTH).status_code == 204
    r = post_pairs(server.url, "bees", [image], ["bees-class0"])
    assert_error(r, 404, "task_not_found")
    assert all(t["name"] != "bees" for t in snapshot(server.url))


def test_a_kept_older_version_is_scored_beside_the_current_one(server: Server, weights: Path) -> None:
    """A version of the history (not resident: installed for the evaluation only, then released)."""
    old, new = task_delta("moths", 15), task_delta("moths", 16)
    assert upload(server.url, old).status_code == 201
    assert upload(server.url, new, replace=True).status_code == 201
    labels = [f"moths-class{i}" for i in range(4)]
    imgs = images(9, seed=4)
    truth, _ = labelled(weights, new, imgs)
    r = post_pairs(server.url, "moths", imgs, [labels[t] for t in truth], version=1)
    assert r.status_code == 200, r.text
    cur, kept = r.json()["results"]
    assert (cur["version"], cur["current"], kept["version"], kept["current"]) == (2, True, 1, False)
    for result, delta in ((cur, new), (kept, old)):
        want = expected_scores(offline_logits(weights, delta, imgs), truth, labels, BINS)
        assert result["confusion_matrix"]["counts"] == want["confusion"]
        assert result["mean_confidence"] == pytest.approx(want["mean_confidence"], abs=1e-4)
    # each result is stored with its own version; the current one still answers predictions
    got = httpx.get(f"{server.url}/tasks/moths/versions/1", headers=AUTH)
    assert got.status_code == 200 and got.json()["metrics"]["eval"]["accuracy"] == kept["accuracy"]
    p = httpx.post(f"{server.url}/tasks/moths/predict", files={"image": ("a.png", imgs[0])})
    assert p.status_code == 200 and p.json()["version"] == 2
    httpx.delete(f"{server.url}/tasks/moths", headers=AUTH)
