"""``python -m service.demo``: the whole product on one machine, offline, in one command.

Starts ``ssf-serve --model ssf_demo_vit --weights assets/demo/backbone.safetensors`` on 127.0.0.1:8000
with a fresh store, uploads every ``assets/demo/tasks/*.safetensors`` through the HTTP API, classifies one
image, and keeps serving until Ctrl-C. Without the shipped assets it falls back to a random-weight
backbone and random deltas made with the ssf core (and says so: their predictions mean nothing).
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.client import Client, SSFError

MODEL = "ssf_demo_vit"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"


def shipped_assets() -> tuple[Path, list[Path]] | None:
    backbone, tasks = ASSETS / "backbone.safetensors", sorted((ASSETS / "tasks").glob("*.safetensors"))
    return (backbone, tasks) if backbone.is_file() and tasks else None


def random_assets(directory: Path, num_tasks: int = 2) -> tuple[Path, list[Path]]:
    """A seeded random ``ssf_demo_vit`` backbone and ``num_tasks`` random SSF deltas for it."""
    import safetensors.torch
    import timm
    import torch

    import ssf

    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False).eval()
    backbone = directory / "backbone.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(backbone))
    fingerprint = ssf.fingerprint(base)
    tasks = []
    for i in range(num_tasks):
        labels = [f"class-{j}" for j in range(3 + i)]
        model = timm.create_model(MODEL, pretrained=False, num_classes=len(labels))
        model.load_state_dict(
            {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}, strict=False
        )
        ssf.inject_ssf(model, "foldable")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for affine in model.modules():
                if isinstance(affine, ssf.ScaleShift):
                    affine.scale.copy_(1 + 0.2 * torch.randn(affine.scale.shape, generator=g))
                    affine.shift.copy_(0.2 * torch.randn(affine.shift.shape, generator=g))
            for name, p in model.named_parameters():
                if name.startswith(ssf.head_prefix(model) + "."):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        delta = ssf.delta_from_model(
            model,
            task=f"random-task-{i + 1}",
            backbone=MODEL,
            backbone_fingerprint=fingerprint,
            site_scheme="foldable",
            labels=labels,
        )
        path = directory / f"random-task-{i + 1}.safetensors"
        ssf.save_delta(delta, path)
        tasks.append(path)
    return backbone, tasks


def sample_image() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (96, 96), (220, 120, 40)).save(out, format="JPEG")
    return out.getvalue()


def wait_ready(proc: subprocess.Popen[bytes], client: Client, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: ssf-serve exited with status {proc.returncode}; see its log above")
        try:
            if client.ready():
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.25)
    raise SystemExit(f"demo: ssf-serve was not ready after {timeout_s:.0f} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--store", help="store directory (default: a fresh temporary one)")
    args = parser.parse_args(argv)
    # Ctrl-C and `docker stop` both end the demo cleanly, also when the parent started us with SIGINT
    # ignored (a non-interactive shell's background job: Python then installs no KeyboardInterrupt).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)

    work = Path(tempfile.mkdtemp(prefix="ssf-demo-"))
    found = shipped_assets()
    if found is None:
        print(f"demo: {ASSETS} has no backbone.safetensors and tasks/*.safetensors yet;")
        print("demo: using a RANDOM-weight backbone and random deltas made with the ssf core instead")
        print("demo: (the API works the same, but the predictions mean nothing)")
        backbone, tasks = random_assets(work)
    else:
        backbone, tasks = found
    store = args.store or str(work / "store")
    token = secrets.token_urlsafe(24)
    token_file = work / "admin-token"
    token_file.write_text(token)
    token_file.chmod(0o600)

    cmd = [sys.executable, "-m", "service.cli", "--model", MODEL, "--weights", str(backbone)]
    cmd += ["--store", store, "--host", "127.0.0.1", "--port", str(args.port)]
    proc = subprocess.Popen(cmd, env={**os.environ, "SSF_ADMIN_TOKEN": token})
    url = f"http://127.0.0.1:{args.port}"
    try:
        with Client(url, token=token) as client:
            wait_ready(proc, client)
            for path in tasks:
                try:
                    info = client.upload(path)
                    print(f"demo: uploaded {info['name']} v{info['version']} ({info['num_classes']} classes)")
                except SSFError as e:
                    if e.code != "task_exists":
                        raise
                    print(f"demo: {path.name} is already in the store")
            first = client.list()[0]["name"]
            top = client.predict(first, [sample_image()], top_k=3)["predictions"][0]
            print(f"demo: {first} on an orange square: {[(s['label'], round(s['score'], 3)) for s in top]}")
        print(f"\ndemo: serving {url}  (docs: {url}/docs); admin token in {token_file}")
        print(f"  curl {url}/tasks")
        print(f"  curl -F image=@photo.jpg '{url}/tasks/{first}/predict?top_k=3'")
        print(
            '  curl -H "Authorization: Bearer $(cat ' + str(token_file) + ')" -F delta=@delta.safetensors '
            f"{url}/tasks"
        )
        print("demo: Ctrl-C to stop")
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
