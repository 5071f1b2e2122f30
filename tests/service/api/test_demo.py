"""``python -m service.demo`` comes up, uploads its tasks through the API, classifies, and stops on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.ports import free_port
from tests.helpers.servers import ROOT


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.e2e
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "docker-stop"])
def test_demo_starts_uploads_and_stops(tmp_path: Path, stop: signal.Signals) -> None:
    """Started the way a non-interactive shell starts a background job (SIGINT ignored, inherited across
    exec: CI hung here once), the demo still stops on Ctrl-C, and on SIGTERM as `docker stop` sends."""
    out = tmp_path / "demo.log"
    port = free_port()
    cmd = [sys.executable, "-m", "service.demo", "--port", str(port), "--store", str(tmp_path / "s")]
    with out.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=ignore_sigint)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C to stop" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.3)
        text = out.read_text()
        # every example task uploaded with its recorded accuracy; every held-out real image right
        assert len(re.findall(r"test accuracy \d+\.\d% on held-out real images", text)) == 3, text
        counts = re.search(r"demo: (\d+) of (\d+) held-out real images classified correctly", text)
        assert counts and int(counts[2]) == 6 and int(counts[1]) >= 5, text  # patches (80 %) may miss one
        assert text.count(": correct") == int(counts[1]) and text.count(": WRONG") == 6 - int(counts[1])
        # the server's JSON access log goes to the file the demo names, not over the demo's lines
        log = Path(re.search(r"server log: (\S+)", text)[1])  # type: ignore[index]
        assert not [line for line in text.splitlines() if line.lstrip().startswith("{")], text
        assert "/predict" in log.read_text()
        # GET /tasks/{name} shows the accuracy each example task measured on held-out real images
        for name, floor in (("digits", 0.95), ("faces", 0.95), ("patches", 0.75)):
            info = httpx.get(f"http://127.0.0.1:{port}/tasks/{name}", timeout=10).json()
            assert info["metrics"]["test_acc"] >= floor and info["metrics"]["val_acc"] > 0, info
        proc.send_signal(stop)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # say where it hung: the demo's and ssf-serve's last lines
            pytest.fail(f"the demo did not stop within 60 s of {stop.name}:\n" + out.read_text()[-4000:])
        assert code in (0, 130), out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
