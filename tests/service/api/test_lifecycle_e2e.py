"""The task lifecycle through real HTTP on both stores, each with two ssf-serve replicas sharing it (a
directory both processes lock, or a real redis-server): version history kept and bounded, staged versions
that never answer live traffic, gated promotion, rollback under load, and every admin action exactly once
in the audit log as each replica reads it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.api import AUTH, TOKEN, assert_error
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.load import Load
from tests.helpers.models import backbone_file
from tests.helpers.servers import Server, start, stop, store_of, upload

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

KEEP = 3
INTERVAL_S = 0.5  # SSF_RECONCILE_INTERVAL_S: the propagation bound without hints (local store)
BOUND_S = 2 * INTERVAL_S + 1.0  # a change reaches the other replica within this (plus a load)
IMG = encode("PNG", 11)


@dataclass
class Pair:
    a: Server
    b: Server
    kind: str

    @property
    def urls(self) -> list[str]:
        return [self.a.url, self.b.url]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("lifecycle-backbone"))


@pytest.fixture(scope="module", params=["local", "redis"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, weights: Path
) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp(f"lifecycle-{request.param}")
    settings = {"keep_versions": KEEP, "reconcile_interval_s": INTERVAL_S, "shadow_fraction": 0}
    with store_of(request.param, tmp, str(tmp / "store")) as store:
        a = start(tmp, weights, store, **settings)
        b = start(tmp, weights, store, **settings)
        try:
            yield Pair(a, b, request.param)
        finally:
            stop(a)
            stop(b)


def stage(url: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/tasks?stage=true", headers=AUTH, files={"delta": ("d.safetensors", data)}, timeout=30
    )


def promote(url: str, task: str, version: int, **gate: object) -> httpx.Response:
    return httpx.post(f"{url}/tasks/{task}/versions/{version}/promote", params=gate, headers=AUTH, timeout=30)


def predict(url: str, task: str, headers: dict[str, str] | None = None, **params: object) -> httpx.Response:
    return httpx.post(
        f"{url}/tasks/{task}/predict",
        files={"image": ("x.png", IMG)},
        params={"top_k": 4, **params},
        headers=headers or {},
        timeout=30,
    )


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def audit(url: str, task: str) -> list[dict]:
    r = httpx.get(f"{url}/audit", params={"task": task, "limit": 1000}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["records"]


def test_history_is_kept_bounded_and_readable_on_both_replicas(pair: Pair) -> None:
    task = f"hist-{pair.kind}"
    deltas = {v: task_delta(task, 100 + v) for v in range(1, 7)}
    assert upload(pair.a.url, deltas[1]).status_code == 201
    for v in range(2, 7):
        r = upload(pair.urls[v % 2], deltas[v], replace=True)
        assert r.status_code == 201 and r.json()["version"] == v, r.text
    for url in pair.urls:
        body = httpx.get(f"{url}/tasks/{task}/versions").json()
        assert (body["current_version"], body["staged_version"], body["keep_versions"]) == (6, None, KEEP)
        assert [v["version"] for v in body["versions"]] == [6, 5, 4]  # the newest KEEP, newest first
        for v in (4, 5, 6):
            info = httpx.get(f"{url}/tasks/{task}/versions/{v}").json()
            assert info["version"] == v and info["name"] == task
            assert info["sha256"] == next(x["sha256"] for x in body["versions"] if x["version"] == v)
        for v in (1, 3, 99):
            assert_error(httpx.get(f"{url}/tasks/{task}/versions/{v}"), 404, "version_not_found")
            assert_error(promote(url, task, v), 404, "version_not_found")
    assert httpx.delete(f"{pair.b.url}/tasks/{task}", headers=AUTH).status_code == 204
    for url in pair.urls:  # deleting the task deleted its history
        assert_error(httpx.get(f"{url}/tasks/{task}/versions"), 404, "task_not_found")
        assert_error(httpx.get(f"{url}/tasks/{task}/versions/6"), 404, "task_not_found")
        assert_error(promote(url, task, 6), 404, "task_not_found")  # promoting a deleted task


def test_staged_version_never_answers_live_traffic(pair: Pair) -> None:
    task = f"stg-{pair.kind}"
    v1, v2 = task_delta(task, 201), task_delta(task, 202)
    assert upload(pair.a.url, v1).status_code == 201
    r = stage(pair.a.url, v2)
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    for url in pair.urls:
        assert eventually(lambda u=url: httpx.get(f"{u}/tasks/{task}").json()["staged_version"] == 2)
        answers = [predict(url, task) for _ in range(20)]
        assert all(a.status_code == 200 and a.json()["version"] == 1 for a in answers)
        # an admin asks for the staged version explicitly: it is resident on every replica
        assert eventually(lambda u=url: predict(u, task, AUTH, version=2).status_code == 200)
        staged = predict(url, task, AUTH, version=2).json()
        assert staged["version"] == 2 and staged["predictions"] != answers[0].json()["predictions"]
        by_header = predict(url, task, {**AUTH, "X-SSF-Version": "2"}).json()
        assert by_header == staged
        assert predict(url, task, AUTH, version=1).json()["version"] == 1
        assert_error(predict(url, task, version=2), 401, "missing_token")  # not without the admin token
        assert_error(predict(url, task, {"Authorization": "Bearer nope"}, version=2), 403)
        assert_error(predict(url, task, AUTH, version=7), 404, "version_not_found")
        assert_error(predict(url, task, {**AUTH, "X-SSF-Version": "x"}), 422, "invalid_parameter")
    # a task that starts staged has no live traffic at all, but an admin may try it
    fresh = f"fresh-{pair.kind}"
    assert stage(pair.b.url, task_delta(fresh, 203)).status_code == 201
    for url in pair.urls:
        assert_error(predict(url, fresh), 404, "task_not_found")
        assert_error(httpx.get(f"{url}/tasks/{fresh}"), 404, "task_not_found")
        listed = [t["name"] for t in httpx.get(f"{url}/tasks").json()["tasks"]]
        assert fresh not in listed
        assert eventually(lambda u=url: predict(u, fresh, AUTH, version=1).status_code == 200)
        assert httpx.get(f"{url}/tasks/{fresh}/versions").json()["staged_version"] == 1
    assert promote(pair.a.url, fresh, 1).status_code == 200
    for url in pair.urls:
        assert eventually(lambda u=url: predict(u, fresh).status_code == 200)
    for name in (task, fresh):
        assert httpx.delete(f"{pair.a.url}/tasks/{name}", headers=AUTH).status_code == 204


def test_failed_gate_leaves_the_current_version_serving(pair: Pair) -> None:
    task = f"gate-{pair.kind}"
    assert upload(pair.a.url, task_delta(task, 301)).status_code == 201
    assert stage(pair.a.url, task_delta(task, 302)).status_code == 201
    missing = assert_error(promote(pair.a.url, task, 2, min_accuracy=0.5), 409, "gate_metric_missing")
    assert "accuracy is missing" in missing["message"]
    missing = assert_error(promote(pair.a.url, task, 2, min_agreement=0.5), 409, "gate_metric_missing")
    assert "agreement is missing" in missing["message"]
    # evaluate the staged version on 4 images, labelled with the current version's answers
    images = [encode("PNG", 40 + i) for i in range(4)]
    labels = []
    for img in images:
        r = httpx.post(
            f"{pair.a.url}/tasks/{task}/predict", files={"image": ("x.png", img)}, params={"top_k": 1}
        )
        labels.append(r.json()["predictions"][0][0]["label"])
    parts = [("image", (f"{i}.png", b)) for i, b in enumerate(images)]
    parts += [("label", (None, label)) for label in labels]
    r = httpx.post(
        f"{pair.a.url}/tasks/{task}/evaluate", files=parts, params={"version": 2}, headers=AUTH, timeout=60
    )
    assert r.status_code == 200, r.text
    accuracy = r.json()["results"][1]["accuracy"]
    stored = httpx.get(f"{pair.b.url}/tasks/{task}/versions/2").json()["metrics"]["eval"]
    assert stored["accuracy"] == accuracy and stored["images"] == 4  # on the other replica too
    refused = assert_error(promote(pair.b.url, task, 2, min_accuracy=0, min_images=5), 409, "gate_failed")
    assert "eval_images 4 < 5" in refused["message"]
    if accuracy < 1:
        refused = assert_error(promote(pair.b.url, task, 2, min_accuracy=1), 409, "gate_failed")
        assert f"accuracy {accuracy} < 1" in refused["message"]
    for url in pair.urls:  # the refusals changed nothing
        assert [predict(url, task).json()["version"] for _ in range(5)] == [1] * 5
        assert httpx.get(f"{url}/tasks/{task}").json()["staged_version"] == 2
    r = promote(pair.b.url, task, 2, min_accuracy=0, min_images=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["action"], body["previous_version"], body["task"]["version"]) == ("promote", 1, 2)
    assert body["gate"]["accuracy"] == accuracy and body["gate"]["eval_images"] == 4
    assert body["task"]["staged_version"] is None
    for url in pair.urls:
        assert eventually(lambda u=url: predict(u, task).json()["version"] == 2)
    assert httpx.delete(f"{pair.a.url}/tasks/{task}", headers=AUTH).status_code == 204


def test_bad_gate_and_version_values_are_422(pair: Pair) -> None:
    task = f"bad-{pair.kind}"
    assert upload(pair.a.url, task_delta(task, 401)).status_code == 201
    for gate in ({"min_accuracy": 2}, {"min_accuracy": -0.1}, {"min_agreement": "x"}, {"min_images": 0}):
        assert_error(promote(pair.a.url, task, 1, **gate), 422, "invalid_parameter")
    for path in (f"/tasks/{task}/versions/0", f"/tasks/{task}/versions/x", f"/tasks/{task}/versions/-1"):
        assert_error(httpx.get(pair.a.url + path), 422, "invalid_parameter")
    assert_error(predict(pair.a.url, task, AUTH, version=0), 422, "invalid_parameter")
    assert_error(httpx.post(f"{pair.a.url}/tasks/{task}/versions/1/promote"), 401, "missing_token")
    assert_error(httpx.get(f"{pair.a.url}/audit"), 401, "missing_token")
    assert_error(httpx.get(f"{pair.a.url}/audit", params={"limit": 0}, headers=AUTH), 422)
    assert_error(httpx.get(f"{pair.a.url}/audit", params={"task": "../x"}, headers=AUTH), 422)
    assert predict(pair.a.url, task).json()["version"] == 1  # nothing changed
    assert httpx.delete(f"{pair.a.url}/tasks/{task}", headers=AUTH).status_code == 204


def test_rollback_is_atomic_under_load(pair: Pair) -> None:
    """Promotions back and forth through both replicas while both serve: every answer names a version
    that was current while its request was in flight (on the other replica: within the propagation
    bound), the staged version never answers, and each version always answers the same way."""
    task = f"roll-{pair.kind}"
    for v in (1, 2, 3):
        r = upload(pair.a.url, task_delta(task, 500 + v), replace=v > 1)
        assert r.status_code == 201 and r.json()["version"] == v
    assert stage(pair.a.url, task_delta(task, 504)).json()["version"] == 4  # staged: must never answer
    for url in pair.urls:
        assert eventually(lambda u=url: predict(u, task).json()["version"] == 3)
    plan = [2, 3, 2, 3, 2, 3, 2]  # rollbacks 3 -> 2 and promotions 2 -> 3 (KEEP = 3: 2, 3 and staged 4)
    changes: list[tuple[float, float, int, str]] = [(0.0, 0.0, 3, "")]  # (sent, acked, version, via)
    with Load([(u, task) for u in pair.urls for _ in range(2)], max_s=120) as load:
        time.sleep(0.5)
        for i, v in enumerate(plan):
            via = pair.urls[i % 2]
            sent = time.monotonic()
            r = promote(via, task, v)
            assert r.status_code == 200, r.text
            assert r.json()["action"] == ("rollback" if v < changes[-1][2] else "promote")
            changes.append((sent, time.monotonic(), v, via))
            time.sleep(0.7)
        time.sleep(BOUND_S)
    answers = load.snapshot()
    assert len(answers) > 50 and all(a.status == 200 for a in answers), {a.status for a in answers}
    assert 4 not in {a.version for a in answers}
    bad = []
    for a in answers:
        allowed = set()
        for i, (sent, _acked, v, _via) in enumerate(changes):
            until = changes[i + 1][1] if i + 1 < len(changes) else float("inf")  # the next acknowledgement
            if i + 1 < len(changes) and changes[i + 1][3] != a.source:
                until += BOUND_S  # the other replica learns of the next change within the bound
            if sent <= a.ended and a.started <= until:
                allowed.add(v)
        if a.version not in allowed:  # the last change acknowledged before it started, and how long before
            last = max((c for c in changes if c[1] <= a.started), key=lambda c: c[1])
            where = "this replica" if last[3] == a.source else "the other replica"
            late = f"{a.started - last[1]:.3f} s after v{last[2]} was acknowledged by {where}"
            bad.append((a.source, a.version, sorted(allowed), late))
    assert not bad, f"{len(bad)} answers named a version not current while in flight: {bad[:5]}"
    # the replica that promoted answers with the new version from the acknowledgement on
    for _sent, acked, v, via in changes[1:]:
        after = [a for a in answers if a.source == via and a.started > acked]
        first = min(after, key=lambda a: a.started, default=None)
        assert first is not None and first.version == v, (v, via, first)
    ways: dict[int, set[tuple]] = {}
    for a in answers:
        ways.setdefault(a.version, set()).add(tuple((i, round(s, 4)) for i, s in a.scores))
    assert all(len(w) == 1 for w in ways.values()), {v: len(w) for v, w in ways.items()}
    for url in pair.urls:
        assert predict(url, task).json()["version"] == plan[-1]
    assert httpx.delete(f"{pair.a.url}/tasks/{task}", headers=AUTH).status_code == 204


def test_every_admin_action_is_in_the_audit_log_once_on_every_replica(pair: Pair) -> None:
    task = f"aud-{pair.kind}"
    d1, d2, d3 = (task_delta(task, 600 + i) for i in range(3))
    assert upload(pair.a.url, d1).status_code == 201  # upload v1
    assert upload(pair.b.url, d2, replace=True).status_code == 201  # upload v2 (a replace)
    assert stage(pair.a.url, d3).status_code == 201  # stage v3
    label = predict(pair.a.url, task).json()["predictions"][0][0]["label"]
    parts = [("image", ("x.png", IMG)), ("label", (None, label))]
    url = f"{pair.b.url}/tasks/{task}/evaluate"
    r = httpx.post(url, files=parts, params={"version": 3}, headers=AUTH, timeout=60)  # evaluate v2 and v3
    assert r.status_code == 200, r.text
    assert promote(pair.b.url, task, 3).status_code == 200  # promote 2 -> 3
    assert_error(promote(pair.a.url, task, 9), 404)  # refused: recorded with its code
    assert promote(pair.a.url, task, 1).status_code == 200  # rollback 3 -> 1
    assert httpx.delete(f"{pair.b.url}/tasks/{task}", headers=AUTH).status_code == 204
    want = [
        ("upload", None, 1, "ok", 201),
        ("upload", 1, 2, "ok", 201),
        ("stage", 2, 3, "ok", 201),
        ("evaluate", 2, 3, "ok", 200),
        ("promote", 2, 3, "ok", 200),
        ("promote", 3, 9, "version_not_found", 404),
        ("rollback", 3, 1, "ok", 200),
        ("delete", 1, None, "ok", 204),
    ]
    views = [audit(url, task) for url in pair.urls]
    assert views[0] == views[1]  # one log, the same on every replica
    got = [(r["action"], r["from_version"], r["to_version"], r["outcome"], r["status"]) for r in views[0]]
    assert got == want
    sha = {v: hashlib.sha256(d).hexdigest() for v, d in ((1, d1), (2, d2), (3, d3))}
    for record in views[0]:
        assert record["task"] == task and record["principal"] == "operator"
        assert record["token_id"] == "admin-token"
        if record["outcome"] == "ok" and record["action"] in ("upload", "stage", "promote", "rollback"):
            assert record["sha256"] == sha[record["to_version"]]
    assert TOKEN not in httpx.get(f"{pair.a.url}/audit", params={"limit": 10_000}, headers=AUTH).text


def test_the_python_client_runs_the_whole_flow(pair: Pair) -> None:
    """The README's flow with service.client: stage a retrained delta, evaluate it against the current
    one, promote it through a gate, roll back."""
    from service.client import Client, SSFError

    task = f"cli-{pair.kind}"
    with Client(pair.a.url, token=TOKEN) as c, Client(pair.b.url, token=TOKEN) as other:
        assert c.upload(task_delta(task, 701))["version"] == 1
        assert c.stage(task_delta(task, 702))["version"] == 2
        assert c.versions(task)["staged_version"] == 2 and c.get(task)["staged_version"] == 2
        assert c.predict(task, [IMG])["version"] == 1
        assert c.predict_version(task, [IMG], version=2)["version"] == 2
        label = c.predict(task, [IMG], top_k=1)["predictions"][0][0]["label"]
        report = c.evaluate(task, [IMG], [label], version=2)
        assert [r["version"] for r in report["results"]] == [1, 2]
        assert c.version(task, 2)["metrics"]["eval"]["images"] == 1
        try:
            c.promote(task, 2, min_images=2)
            raise AssertionError("the gate should have refused")
        except SSFError as e:
            assert (e.status, e.code) == (409, "gate_failed")
        promoted = c.promote(task, 2, min_accuracy=0, min_images=1)
        assert (promoted["action"], promoted["task"]["version"]) == ("promote", 2)
        assert eventually(lambda: other.predict(task, [IMG])["version"] == 2)
        back = other.rollback(task)
        assert (back["action"], back["previous_version"], back["task"]["version"]) == ("rollback", 2, 1)
        assert eventually(lambda: c.predict(task, [IMG])["version"] == 1)
        actions = [r["action"] for r in c.audit(task=task)]
        assert actions == ["upload", "stage", "evaluate", "promote", "promote", "rollback"]
        c.delete(task)


def test_hostile_lifecycle_requests_are_4xx_and_change_nothing(pair: Pair) -> None:
    from tests.reliability.corpus import hostile_lifecycle

    task, gone = f"hostile-{pair.kind}", f"gone-{pair.kind}"
    assert upload(pair.a.url, task_delta(task, 801)).status_code == 201
    assert upload(pair.a.url, task_delta(task, 802), replace=True).status_code == 201
    assert upload(pair.a.url, task_delta(gone, 803)).status_code == 201
    assert httpx.delete(f"{pair.a.url}/tasks/{gone}", headers=AUTH).status_code == 204
    # the cases probe a task whose current version is 2 on both replicas: b follows within the propagation
    # bound, and a case sent to it before then (an older version asked for, 404) would meet version 1 still
    assert eventually(lambda: all(predict(url, task).json()["version"] == 2 for url in pair.urls))
    assert eventually(lambda: all(predict(url, gone).status_code == 404 for url in pair.urls))
    before = [httpx.get(f"{url}/tasks/{task}/versions").json() for url in pair.urls]
    cases = list(hostile_lifecycle())
    assert len(cases) > 40
    with httpx.Client(timeout=30) as http:
        for i, case in enumerate(cases):
            url = pair.urls[i % 2]
            headers = dict(case.headers) | (AUTH if case.admin else {})
            path = case.path.replace("{task}", task).replace("{gone}", gone)
            kwargs = {"files": {"image": ("x.png", IMG)}} if path.endswith("/predict") else {}
            r = http.request(case.method, url + path, params=case.params, headers=headers, **kwargs)
            assert_error(r, case.status, case.code)
    after = [httpx.get(f"{url}/tasks/{task}/versions").json() for url in pair.urls]
    assert after == before  # nothing changed: same current version, same history, nothing staged
    for url in pair.urls:
        assert predict(url, task).json()["version"] == 2
    assert httpx.delete(f"{pair.a.url}/tasks/{task}", headers=AUTH).status_code == 204
