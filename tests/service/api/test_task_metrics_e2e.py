"""Per-task metrics with bounded cardinality, through real HTTP: with SSF_METRICS_TOP_TASKS=2 and four busy
tasks, /metrics never holds more than two task series plus ``other``; requests, images, errors and latency
add up across the labels; unknown task names never get a series of their own; a deleted task's series go."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import Server, start, stop, upload

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("task-metrics")
    s = start(tmp, backbone_file("vit", tmp), metrics_top_tasks=2)
    yield s
    stop(s)


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one sample name."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_busiest_tasks_get_series_the_rest_are_other(server: Server) -> None:
    names = ["t0", "t1", "t2", "t3"]
    for i, name in enumerate(names):
        assert upload(server.url, task_delta(name, 30 + i)).status_code == 201
    image = encode("PNG", 9)
    sent = {"t0": 6, "t1": 4, "t2": 2, "t3": 1}
    for name, n in sent.items():
        for _ in range(n):
            r = httpx.post(f"{server.url}/tasks/{name}/predict", files={"image": ("a.png", image)})
            assert r.status_code == 200
    for i in range(5):  # unknown names: errors, never a series of their own
        r = httpx.post(f"{server.url}/tasks/nope{i}/predict", files={"image": ("a.png", image)})
        assert r.status_code == 404
    r = httpx.post(f"{server.url}/tasks/t0/predict", files={"image": ("a.png", b"not an image")})
    assert r.status_code == 400
    text = httpx.get(f"{server.url}/metrics").text
    requests = samples(text, "ssf_task_requests_total")
    tasks = {re.search(r'task="([^"]*)"', k).group(1) for k in requests}  # type: ignore[union-attr]
    named = tasks - {"other"}
    assert len(named) <= 2 and "other" in tasks, requests
    assert not any(t.startswith("nope") for t in tasks)
    assert sum(requests.values()) == sum(sent.values()) + 5 + 1
    images = samples(text, "ssf_task_images_total")
    assert sum(images.values()) == sum(sent.values()) + 5 + 1
    errors = samples(text, "ssf_task_errors_total")
    by_code: dict[str, float] = {}
    for labels, value in errors.items():
        code = re.search(r'code="([^"]*)"', labels).group(1)  # type: ignore[union-attr]
        by_code[code] = by_code.get(code, 0) + value
    assert by_code == {"task_not_found": 5.0, "bad_image": 1.0}
    counts = samples(text, "ssf_task_request_seconds_count")
    assert sum(counts.values()) == sum(requests.values())
    # the first two tasks to be seen took the two places
    assert named == {"t0", "t1"}
    # deleting a named task removes its series
    assert httpx.delete(f"{server.url}/tasks/t0", headers=AUTH).status_code == 204
    text = httpx.get(f"{server.url}/metrics").text
    assert 'task="t0"' not in "\n".join(line for line in text.splitlines() if line.startswith("ssf_task_"))
