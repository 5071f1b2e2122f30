"""deploy/grafana/ssf.json: a valid dashboard whose every metric exists in the /metrics output of a running
server (``python -m service.cli`` in a subprocess), so a renamed metric breaks this test, not the
dashboard."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.api import AUTH
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import backbone_file
from tests.helpers.servers import ROOT, Server, start, stop, upload

DASHBOARD = ROOT / "deploy" / "grafana" / "ssf.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def dashboard() -> dict:
    data: dict = json.loads(DASHBOARD.read_text())
    return data


def expressions() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bssf_[a-z0-9_]+", expr))


def exposed(text: str) -> set[str]:
    """Every sample name and every family named by a TYPE line (a labelled family with no sample yet
    still has its TYPE line)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("grafana")
    s = start(tmp, backbone_file("vit", tmp))
    yield s
    stop(s)


def test_the_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert data["uid"] and data["title"] and data["schemaVersion"] >= 30
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    assert len(expressions()) >= 20
    for expr in expressions():
        assert expr.count("(") == expr.count(")"), expr
        assert metric_names(expr), f"a query that names no ssf_ metric: {expr}"


def test_every_metric_of_the_dashboard_is_served(server: Server) -> None:
    # some traffic, so per-task families have samples too (TYPE lines alone would do)
    assert upload(server.url, task_delta("cats", 1)).status_code == 201
    r = httpx.post(f"{server.url}/tasks/cats/predict", files={"image": ("a.png", encode("PNG", 1))})
    assert r.status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    served = exposed(text)
    families = {family(n) for n in served}
    named = {n for expr in expressions() for n in metric_names(expr)}
    missing = sorted(n for n in named if n not in served and family(n) not in families)
    assert not missing, f"deploy/grafana/ssf.json names metrics /metrics does not serve: {missing}"
    # the per-task families, with their bounded label
    assert 'ssf_task_requests_total{task="cats"} 1.0' in text
    httpx.delete(f"{server.url}/tasks/cats", headers=AUTH)


def test_a_misspelt_metric_would_be_caught(server: Server) -> None:
    """The check itself: a name that is not served is reported."""
    served = exposed(httpx.get(f"{server.url}/metrics").text)
    assert "ssf_engine_batches_total" in served or "ssf_engine_batches" in {family(n) for n in served}
    assert "ssf_engine_batchez_total" not in served
    assert family("ssf_engine_batchez_total") not in {family(n) for n in served}
