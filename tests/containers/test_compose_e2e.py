"""docker-compose.yml for real: build the images, bring the stack up (podman-compose, or `docker compose`
where a Docker engine answers) and check the deployment through nginx on 127.0.0.1.

Runs in file order on one stack (module fixture): readiness and the image's HEALTHCHECK; uid 10001 on a
read-only root filesystem; an upload served by both replicas with the same scores; a replace seen
everywhere; `kill` of one replica under load; a Redis crash under uploads; `down` + `up` keeps every task;
`stop` (SIGTERM) drains. Every command is printed as it runs (deploy/README.md quotes them) and the measured
numbers go to $SSF_COMPOSE_E2E_REPORT (default: compose-e2e.json in the pytest tmp dir).

    make compose-e2e        # == SSF_COMPOSE_E2E=1 python -m pytest -q -s tests/containers
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy import images
from tests.helpers.deltas import task_delta
from tests.helpers.images import encode
from tests.helpers.models import MODEL, backbone_file
from tests.helpers.ports import free_port

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "ssf-e2e"
TOKEN = "compose-e2e-token-3b9d0c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPLICAS = ("ssf-1", "ssf-2")
GRACE_S = 40  # stop_grace_period of the replicas in docker-compose.yml
REPORT: dict[str, Any] = {"commands": []}


# ------------------------------------------------------------------------------------------- parts
PNG = encode("PNG", 11, size=(48, 40))


# ----------------------------------------------------------------------------------------- commands
def run(
    cmd: list[str], check: bool = True, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    line = shlex.join(cmd)
    print("+ " + line, file=sys.stderr, flush=True)
    REPORT["commands"].append(line)
    out = subprocess.run(
        cmd, text=True, capture_output=True, timeout=timeout, env=images.engine_env(), check=False, **kw
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{line} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@dataclass
class Stack:
    engine: str
    env: dict[str, str]
    base: str
    tmp: Path
    weights: Path
    uploaded: dict[str, int] = field(default_factory=dict)  # task -> acknowledged version

    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        cmd = ["docker", "compose"] if self.engine == "docker" else ["podman-compose"]
        cmd += ["-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args]
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items()) + " " + shlex.join(cmd)
        print("+ " + line, file=sys.stderr, flush=True)
        REPORT["commands"].append(line)
        out = subprocess.run(
            cmd,
            text=True,
            capture_output=True,
            timeout=timeout,
            env={**images.engine_env(), **self.env},
            cwd=ROOT,
            check=False,
        )
        if out.returncode != 0:
            raise AssertionError(f"{line} -> {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        return out

    def containers(self, service: str, check: bool = True) -> list[str]:
        """Ids of the compose project's containers for ``service`` (running or not)."""
        label = "label=com.docker.compose"
        cmd = [self.engine, "ps", "-a", "-q", "--filter", f"{label}.project={PROJECT}"]
        cmd += ["--filter", f"{label}.service={service}"]
        return run(cmd, check=check).stdout.split()

    def container(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str, fmt: str) -> str:
        return run([self.engine, "inspect", "--format", fmt, self.container(service)]).stdout.strip()

    def in_replica(
        self, service: str, path: str, method: str = "GET", body: bytes | None = None
    ) -> tuple[int, Any]:
        """A request from inside the replica's container to its own port (no port is published)."""
        code = (
            "import base64, httpx\n"
            f"body = base64.b64decode({base64.b64encode(body or b'').decode()!r})\n"
            "files = {'image': ('x.png', body)} if body else None\n"
            f"r = httpx.request({method!r}, 'http://127.0.0.1:8000{path}', files=files, timeout=30)\n"
            "print(r.status_code); print(r.text)\n"
        )
        out = run([self.engine, "exec", self.container(service), "python", "-c", code])
        status, _, text = out.stdout.partition("\n")
        try:
            return int(status), json.loads(text)
        except json.JSONDecodeError:
            return int(status), text

    def wait_ready(self, timeout_s: float = 300) -> float:
        """Seconds until /readyz through nginx answers 200 and both replicas are ready (bounded)."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=3).status_code == 200 and all(
                    self.replica_ready(s) for s in REPLICAS
                ):
                    return time.monotonic() - start
            except (httpx.HTTPError, AssertionError):
                pass
            time.sleep(1)
        raise AssertionError(f"not ready within {timeout_s} s\n{self.logs()}")

    def replica_ready(self, service: str) -> bool:
        try:
            return self.in_replica(service, "/readyz")[0] == 200
        except AssertionError:
            return False

    def wait_replica_ready(self, service: str, timeout_s: float = 300) -> float:
        start = time.monotonic()
        while time.monotonic() < start + timeout_s:
            if self.replica_ready(service):
                return time.monotonic() - start
            time.sleep(1)
        raise AssertionError(f"{service} not ready within {timeout_s} s\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for s in ("redis", *REPLICAS, "nginx"):
            try:
                r = subprocess.run(
                    [self.engine, "logs", "--tail", "30", self.container(s)],
                    text=True,
                    capture_output=True,
                    env=images.engine_env(),
                    timeout=30,
                    check=False,
                )
                out.append(f"--- {s}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
            except (AssertionError, subprocess.TimeoutExpired) as e:
                out.append(f"--- {s}: {e}")
        return "\n".join(out)

    def upload(self, task: str, seed: int, replace: bool = False) -> httpx.Response:
        r = httpx.post(
            f"{self.base}/tasks",
            files={"delta": ("delta.safetensors", task_delta(task, seed))},
            params={"replace": "true"} if replace else None,
            headers=AUTH,
            timeout=30,
        )
        if r.status_code in (200, 201):
            self.uploaded[task] = r.json()["version"]
        return r

    def predict(self, task: str, http: httpx.Client | None = None) -> httpx.Response:
        client = http or httpx
        return client.post(  # type: ignore[no-any-return, attr-defined]
            f"{self.base}/tasks/{task}/predict",
            files={"image": ("x.png", PNG)},
            params={"top_k": 4},
            timeout=30,
        )


def scores(body: dict[str, Any]) -> list[tuple[int, float]]:
    return [(p["index"], round(p["score"], 5)) for p in body["predictions"][0]]


class Load:
    """Client threads predicting through nginx until stopped (bounded by max_s); every answer is kept."""

    def __init__(self, stack: Stack, tasks: list[str], max_s: float = 120):
        self.stack, self.max_s = stack, max_s
        self.answers: list[tuple[float, float, str, int]] = []  # start, end, task, status (0: no answer)
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in tasks]

    def _run(self, task: str) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set() and time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    status = self.stack.predict(task, http).status_code
                except httpx.HTTPError:
                    status = 0
                with self.lock:
                    self.answers.append((t0, time.monotonic(), task, status))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def failed(self) -> list[tuple[float, float, str, int]]:
        with self.lock:
            return [a for a in self.answers if a[3] != 200]


# ------------------------------------------------------------------------------------------ fixture
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("compose-e2e")
    eng = images.engine()
    bases = images.bases(eng)
    REPORT["engine"] = eng
    REPORT["bases"] = bases
    REPORT["build_cpu_s"] = round(images.build_ssf(eng, "cpu", bases["PYTHON_IMAGE"]), 1)
    REPORT["image_bytes"] = {
        img: int(run([eng, "image", "inspect", "--format", "{{.Size}}", img]).stdout.strip())
        for img in ("ssf-serve:cpu", bases["PYTHON_IMAGE"], bases["REDIS_IMAGE"], bases["NGINX_IMAGE"])
    }
    models = tmp / "models"
    models.mkdir(mode=0o755)
    weights = models / "backbone.safetensors"  # the name docker-compose.yml mounts
    shutil.copyfile(backbone_file("vit", tmp), weights)
    weights.chmod(0o644)  # the container's uid 10001 reads it
    env_file = tmp / "serve.env"
    env_file.write_text(
        f"SSF_ADMIN_TOKEN={TOKEN}\nSSF_LOG_LEVEL=info\nSSF_MAX_QUEUE_DELAY_MS=1\nSSF_DRAIN_DELAY_S=1\n"
        "SSF_GRACEFUL_TIMEOUT_S=10\n"
    )
    port = free_port()
    env = {
        "IMAGE_VARIANT": "cpu",
        "SSF_MODEL": MODEL,
        "MODELS_DIR": str(models),
        "SERVE_ENV_FILE": str(env_file),
        "NGINX_HOST_PORT": str(port),
        **bases,
    }
    s = Stack(eng, env, f"http://127.0.0.1:{port}", tmp, weights)
    report_path = Path(os.environ.get("SSF_COMPOSE_E2E_REPORT", tmp / "compose-e2e.json"))
    try:
        s.compose("down", "-v", timeout=300)  # a stack left over by an interrupted run
        t0 = time.monotonic()
        s.compose("up", "-d")
        s.wait_ready()
        REPORT["up_to_ready_s"] = round(time.monotonic() - t0, 1)
        yield s
    finally:
        try:
            if os.environ.get("SSF_COMPOSE_E2E_KEEP") != "1":
                s.compose("down", "-v", timeout=300)
        finally:
            report_path.write_text(json.dumps(REPORT, indent=2))
            print(f"compose e2e report: {report_path}", file=sys.stderr)


# -------------------------------------------------------------------------------------------- tests
def test_healthcheck_turns_healthy(stack: Stack) -> None:
    for service in REPLICAS:
        cid = stack.container(service)
        # podman runs HEALTHCHECK from systemd timers; without systemd `healthcheck run` is the scheduler
        if stack.engine == "podman":
            out = run(["podman", "healthcheck", "run", cid], check=False)
            assert out.returncode == 0 and "unhealthy" not in out.stdout, out.stdout + out.stderr
            status = stack.inspect(service, "{{.State.Healthcheck.Status}}")
        else:
            deadline = time.monotonic() + 180
            while (status := stack.inspect(service, "{{.State.Health.Status}}")) != "healthy":
                assert time.monotonic() < deadline, status
                time.sleep(2)
        assert status == "healthy"
    REPORT["healthcheck"] = "healthy (both replicas)"


def test_runs_as_uid_10001_on_a_read_only_root(stack: Stack) -> None:
    for service in REPLICAS:
        cid = stack.container(service)
        assert stack.inspect(service, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        status = run([stack.engine, "exec", cid, "cat", "/proc/1/status"]).stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {"10001"}, uids
        write = run([stack.engine, "exec", cid, "sh", "-c", "touch /opt/venv/x"], check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
        # the tmpfs compose gives it is the only writable place besides mounted volumes
        assert run([stack.engine, "exec", cid, "sh", "-c", "touch /tmp/x && rm /tmp/x"]).returncode == 0
    cid = stack.container(REPLICAS[0])
    hygiene = run(
        [
            stack.engine,
            "exec",
            cid,
            "sh",
            "-c",
            "for c in gcc cc g++ c++ make pip pip3; do command -v $c; done; "
            "ls /opt/venv/bin | grep -x 'pip.*'; "
            "ls -d /src /root/.cache/pip /home/ssf/.cache/pip 2>/dev/null; "
            "find / -xdev -path /proc -prune -o -type d -name tests -path '*site-packages/tests' -print "
            "2>/dev/null",
        ],
        check=False,
    )
    assert hygiene.stdout.strip() == "", f"compilers, pip, caches or tests in the image:\n{hygiene.stdout}"
    REPORT["uid_readonly"] = "uid/euid/suid/fsuid 10001, ReadonlyRootfs true, write to /opt/venv refused"


def test_upload_then_both_replicas_serve_the_same_scores(stack: Stack) -> None:
    tasks = [f"e2e-task-{i}" for i in range(6)]
    for i, task in enumerate(tasks):
        r = stack.upload(task, seed=i)
        assert r.status_code in (200, 201), r.text
    for task in tasks:
        via_nginx = stack.predict(task)
        assert via_nginx.status_code == 200, via_nginx.text
        expected = scores(via_nginx.json())
        for service in REPLICAS:
            deadline = time.monotonic() + 15  # a replica follows an upload within the reconcile interval
            while True:
                status, body = stack.in_replica(service, f"/tasks/{task}/predict?top_k=4", "POST", PNG)
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert status == 200, body
            assert body["version"] == 1 and scores(body) == expected, (service, body, expected)
    REPORT["both_replicas_same_scores"] = f"{len(tasks)} tasks x 2 replicas, scores equal to nginx's answer"


def test_replace_is_visible_everywhere(stack: Stack) -> None:
    task = "e2e-task-0"
    before = scores(stack.predict(task).json())
    r = stack.upload(task, seed=100, replace=True)
    assert r.status_code in (200, 201) and r.json()["version"] == 2, r.text
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    answers: dict[str, list[tuple[int, float]]] = {}
    while len(seen) < len(REPLICAS) and time.monotonic() < t0 + 15:
        for service in REPLICAS:
            if service not in seen:
                status, body = stack.in_replica(service, f"/tasks/{task}/predict?top_k=4", "POST", PNG)
                if status == 200 and body["version"] == 2:
                    seen[service] = time.monotonic() - t0
                    answers[service] = scores(body)
    assert set(seen) == set(REPLICAS), seen
    via_nginx = stack.predict(task).json()
    assert via_nginx["version"] == 2 and scores(via_nginx) != before
    assert all(a == scores(via_nginx) for a in answers.values())
    REPORT["replace_visible_s"] = {k: round(v, 2) for k, v in seen.items()}


def test_kill_one_replica_under_load_loses_at_most_the_in_flight(stack: Stack) -> None:
    tasks = [f"e2e-task-{i}" for i in range(1, 6)]
    victim = stack.container("ssf-1")
    with Load(stack, tasks) as load:
        time.sleep(5)
        killed_at = time.monotonic()
        run([stack.engine, "kill", victim])
        time.sleep(10)
    in_flight = [a for a in load.answers if a[0] <= killed_at <= a[1]]
    failed = load.failed()
    REPORT["kill_replica"] = {
        "requests": len(load.answers),
        "failed": len(failed),
        "in_flight_at_kill": len(in_flight),
    }
    assert len(load.answers) > 50
    assert len(failed) <= len(in_flight) <= len(tasks), failed
    # the survivor serves every task with the scores it had before
    for task in tasks:
        assert stack.predict(task).status_code == 200
    # bring it back (restart: unless-stopped may already have)
    if stack.inspect("ssf-1", "{{.State.Running}}") != "true":
        run([stack.engine, "start", victim])
    REPORT["kill_replica"]["restart_to_ready_s"] = round(stack.wait_replica_ready("ssf-1"), 1)


def test_redis_crash_loses_no_acknowledged_upload(stack: Stack) -> None:
    redis = stack.container("redis")
    acked: dict[str, int] = {}
    statuses: list[int] = []
    stop = threading.Event()

    def uploader() -> None:
        for i in range(400):
            if stop.is_set():
                return
            task = f"e2e-redis-{i}"
            try:
                r = stack.upload(task, seed=1000 + i)
                statuses.append(r.status_code)
                if r.status_code in (200, 201):
                    acked[task] = r.json()["version"]
            except httpx.HTTPError:
                statuses.append(0)
            time.sleep(0.05)

    thread = threading.Thread(target=uploader, daemon=True)
    thread.start()
    time.sleep(5)
    run([stack.engine, "kill", redis])  # SIGKILL: no shutdown save, only the AOF
    time.sleep(3)
    if stack.inspect("redis", "{{.State.Running}}") != "true":
        run([stack.engine, "start", redis])
    time.sleep(8)
    stop.set()
    thread.join(120)
    assert acked, statuses
    missing = []
    deadline = time.monotonic() + 30
    for task, version in acked.items():
        while True:
            r = httpx.get(f"{stack.base}/tasks/{task}", timeout=10)
            if r.status_code == 200 and r.json()["version"] == version or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if r.status_code != 200 or r.json()["version"] != version:
            missing.append((task, r.status_code))
    REPORT["redis_crash"] = {
        "acknowledged": len(acked),
        "lost": len(missing),
        "not_acknowledged": sum(s not in (200, 201) for s in statuses),
    }
    assert not missing, missing


def test_down_then_up_keeps_every_task(stack: Stack) -> None:
    before = {t["name"]: t["version"] for t in httpx.get(f"{stack.base}/tasks", timeout=10).json()["tasks"]}
    assert set(stack.uploaded) <= set(before)
    expected = scores(stack.predict("e2e-task-1").json())
    stack.compose("down")  # no -v: the redis-data volume stays
    t0 = time.monotonic()
    stack.compose("up", "-d")
    ready = stack.wait_ready()
    REPORT["down_up"] = {"up_to_ready_s": round(time.monotonic() - t0, 1), "ready_wait_s": round(ready, 1)}
    # the first answers after ready are recorded: one run's first GET /tasks here was not JSON
    early: list[str] = []
    deadline = time.monotonic() + 30
    listing: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{stack.base}/tasks", timeout=10)
        try:
            listing = r.json() if r.status_code == 200 else {}
        except ValueError:
            listing = {}
        if "tasks" in listing:
            break
        early.append(f"{r.status_code} {dict(r.headers)} {r.text[:200]!r}")
        time.sleep(1)
    REPORT["down_up"]["answers_before_the_first_listing"] = early
    after = {t["name"]: t["version"] for t in listing["tasks"]}
    assert after == before
    r = stack.predict("e2e-task-1")
    assert r.status_code == 200 and scores(r.json()) == expected
    REPORT["down_up"]["tasks_kept"] = f"{len(after)}/{len(before)}"


def test_sigterm_drains_within_the_grace_period(stack: Stack) -> None:
    tasks = [f"e2e-task-{i}" for i in range(1, 6)]
    victim = stack.container("ssf-2")
    with Load(stack, tasks) as load:
        time.sleep(5)
        t0 = time.monotonic()
        run([stack.engine, "stop", "-t", str(GRACE_S), victim], timeout=GRACE_S + 30)
        stopped_s = time.monotonic() - t0
        time.sleep(3)
    exit_code = stack.inspect("ssf-2", "{{.State.ExitCode}}")
    failed = load.failed()
    REPORT["sigterm_drain"] = {
        "stop_s": round(stopped_s, 2),
        "exit_code": exit_code,
        "requests": len(load.answers),
        "failed": len(failed),
    }
    assert stopped_s < GRACE_S, "SIGKILL after the grace period: the drain did not finish"
    assert exit_code == "0", exit_code  # 137 would mean SIGKILL
    assert not failed, failed[:5]
    run([stack.engine, "start", victim])
    REPORT["sigterm_drain"]["restart_to_ready_s"] = round(stack.wait_replica_ready("ssf-2"), 1)


def test_demo_profile_serves_the_example_tasks(stack: Stack) -> None:
    """`--profile demo`: the Dockerfile's demo target serves assets/demo's tasks on the real backbone."""
    REPORT["build_demo_s"] = round(
        images.build_ssf(stack.engine, "cpu", stack.env["PYTHON_IMAGE"], demo=True), 1
    )
    port = free_port()
    stack.env["DEMO_HOST_PORT"] = str(port)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        stack.compose("--profile", "demo", "up", "-d", "demo")
        tasks: list[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{base}/tasks", timeout=5)
                tasks = [t["name"] for t in r.json()["tasks"]] if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError):
                tasks = []
            if tasks and httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
            time.sleep(2)
        assert tasks, f"the demo served no tasks within 300 s\n{stack.logs()}"
        ready_s = time.monotonic() - t0
        samples = ROOT / "assets" / "demo" / "samples"
        answers = {}
        for task in tasks:
            sample = next(iter(sorted(samples.glob(f"{task}-*.png"))), None)
            image = sample.read_bytes() if sample else PNG
            r = httpx.post(f"{base}/tasks/{task}/predict", files={"image": ("x.png", image)}, timeout=60)
            assert r.status_code == 200, r.text
            answers[task] = r.json()["predictions"][0][0]["label"]
        REPORT["demo"] = {"up_to_serving_s": round(ready_s, 1), "tasks": tasks, "top1": answers}
    finally:
        cid = stack.containers("demo", check=False)
        if cid:
            run([stack.engine, "rm", "-f", *cid], check=False)
