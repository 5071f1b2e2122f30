"""``python deploy/topology.py`` (the manual way to run the topology): it comes up, serves through nginx,
and SIGTERM takes every process it started down with it."""

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

from deploy.topology import ROOT

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
