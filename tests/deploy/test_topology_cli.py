"""``python deploy/topology.py`` (the manual way to run the topology): it comes up, serves through nginx,
and SIGTERM takes every process it started down with it; a failed start and a plain interpreter exit leave
no server behind either."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.topology import ROOT, Topology

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.timeout(180)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cli_serves_and_sigterm_stops_everything(tmp_path: Path, weights: Path) -> None:
    cmd = [sys.executable, "deploy/topology.py", "--weights", str(weights), "--workdir", str(tmp_path)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SSF_")}, "SSF_ADMIN_TOKEN": "cli-t"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once everything is ready
        m = re.match(r"nginx: (http://127\.0\.0\.1:\d+)", line)
        assert m, line + proc.stdout.read()[-2000:] if proc.poll() is not None else line
        assert httpx.get(m.group(1) + "/readyz", timeout=5).status_code == 200
        # every process it started is its child (each in its own session, so not in its group)
        children = child_processes(proc.pid)
        names = sorted(children.values())
        assert sum("ssf-serve" in n or "service.cli" in n for n in names) == 2, names
        assert any("redis-server" in n for n in names) and any("nginx" in n for n in names), names
        pids = list(children)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def child_processes(parent: int) -> dict[int, str]:
    """pid -> command line of the direct children of ``parent`` (from /proc; Linux only)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out[int(stat.parent.name)] = cmdline
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_failed_start_leaves_nothing_behind(tmp_path: Path) -> None:
    # a replica that cannot start (no weights file): Topology raises with its log and stops Redis too
    topo = Topology(tmp_path, tmp_path / "missing.safetensors", ready_timeout_s=90)
    with pytest.raises(RuntimeError, match="ssf-1"), topo:
        pytest.fail("the topology must not come up without weights")
    procs = [topo.redis, *topo.servers, topo.nginx]
    assert topo.redis.popen is not None, "Redis was started before the replicas"
    assert not [p.name for p in procs if p.running], "processes left behind"


def test_interpreter_exit_stops_a_topology_nobody_stopped(tmp_path: Path, weights: Path) -> None:
    # no context manager, no stop(): the atexit hook still takes the server down (it runs in its own
    # session, so nothing else would)
    script = (
        "import sys; from pathlib import Path; from deploy.topology import Topology\n"
        f"t = Topology(Path({str(tmp_path)!r}), Path({str(weights)!r}))\n"
        "t.start_redis(); print(t.redis.popen.pid, flush=True); sys.exit(0)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "redis-server outlived the interpreter that started it"
