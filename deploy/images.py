"""Build the images docker-compose.yml runs, here and anywhere: the container engine, the base images and the
torch source are chosen from what this host can reach, and every command is printed before it runs.

    python deploy/images.py                  # ssf-serve:cpu, plus the bases compose needs; prints KEY=VALUE
    python deploy/images.py --variant cuda   # ssf-serve:cuda
    python deploy/images.py --no-cache       # a cold build (the layer cache is not used)

- Engine: ``docker`` when a Docker engine answers (``docker info``), otherwise ``podman``. On a host without
  systemd (containers here: root, hybrid cgroups) podman needs ``deploy/podman/containers.conf``; it is
  exported as CONTAINERS_CONF unless one is already set.
- Bases: the official images (``docker.io/library/python:3.11-slim-bookworm``, ``redis:7.0-bookworm``,
  ``nginx:1.27-bookworm``) when they are present or can be pulled; otherwise ``deploy/local-bases.sh`` builds
  Debian equivalents. PYTHON_IMAGE / REDIS_IMAGE / NGINX_IMAGE in the environment win over both.
- Torch: the Dockerfile's default (the official PyTorch index) when it answers. Otherwise, with podman, the
  host's own pip configuration is carried into the build: its file:// indexes, find-links directories and CA
  bundle are bind-mounted read-only at build time (``podman build -v``, nothing is copied into a layer) and
  passed as PIP_ARGS; torch comes from the first local index that has it, else from the host's index.
  TORCH_INDEX_URL / PIP_ARGS in the environment win.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OFFICIAL = {
    "PYTHON_IMAGE": "docker.io/library/python:3.11-slim-bookworm",
    "REDIS_IMAGE": "docker.io/library/redis:7.0-bookworm",
    "NGINX_IMAGE": "docker.io/library/nginx:1.27-bookworm",
}
OFFICIAL_TORCH_INDEX = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "cuda": "https://download.pytorch.org/whl/cu128",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    cmd: list[str], check: bool = True, quiet: bool = False, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``, printing it first as a shell line (the README quotes these lines)."""
    if not quiet:
        log("+ " + shlex.join(cmd))
    return subprocess.run(cmd, check=check, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def engine_env() -> dict[str, str]:
    """The environment for engine commands: CONTAINERS_CONF for podman on a host without systemd."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env and not Path("/run/systemd/system").exists():
        env["CONTAINERS_CONF"] = str(DEPLOY / "podman" / "containers.conf")
    return env


def engine() -> str:
    forced = os.environ.get("SSF_CONTAINER_ENGINE")
    if forced:
        return forced
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False).returncode == 0
        if ok:
            return "docker"
    if shutil.which("podman"):
        return "podman"
    raise SystemExit("no container engine: neither a Docker engine (docker info) nor podman")


def image_exists(eng: str, image: str) -> bool:
    cmd = [eng, "image", "inspect", image]
    return subprocess.run(cmd, capture_output=True, env=engine_env(), check=False).returncode == 0


def can_pull(eng: str, image: str) -> bool:
    if image_exists(eng, image):
        return True
    try:
        out = run([eng, "pull", image], check=False, capture_output=True, env=engine_env(), timeout=600)
    except subprocess.TimeoutExpired:
        return False
    if out.returncode != 0:
        log(f"  cannot pull {image}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'}")
    return out.returncode == 0


def bases(eng: str) -> dict[str, str]:
    """Official base images where they can be had; the Debian-built ones from deploy/local-bases.sh else."""
    chosen = {k: os.environ.get(k, "") for k in OFFICIAL}
    missing = [k for k, v in chosen.items() if not v]
    if missing and all(can_pull(eng, OFFICIAL[k]) for k in missing):
        chosen.update({k: OFFICIAL[k] for k in missing})
    elif missing:
        if eng != "podman":
            raise SystemExit("no registry answers and deploy/local-bases.sh imports into podman only")
        out = run(["sh", str(DEPLOY / "local-bases.sh")], capture_output=True, env=engine_env())
        sys.stderr.write(out.stderr)
        local = dict(line.split("=", 1) for line in out.stdout.split())
        chosen.update({k: local[k] for k in missing})
    return chosen


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except Exception:
        return False


def pip_config() -> dict[str, list[str]]:
    """The host's pip settings (pip config list, environment included), values split on whitespace."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    cfg: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        cfg.setdefault(name, []).extend(shlex.split(value.strip().strip("'\"")))
    return cfg


def host_pip_build(variant: str) -> tuple[list[str], str, str]:
    """(podman -v mounts, TORCH_INDEX_URL, PIP_ARGS) reproducing the host's pip configuration in a build."""
    cfg = pip_config()
    volumes: list[str] = []
    args: list[str] = []

    def mount(path: str) -> None:
        if Path(path).exists() and f"{path}:{path}:ro" not in volumes:
            volumes.append(f"{path}:{path}:ro")

    for url in cfg.get("extra-index-url", []):
        if url.startswith("file://"):
            mount(url.removeprefix("file://").rstrip("/").removesuffix("/simple"))
        args += ["--extra-index-url", url]
    for index in cfg.get("index-url", []):
        args += ["--extra-index-url", index]
    if not cfg.get("index-url"):
        args += ["--extra-index-url", "https://pypi.org/simple"]
    for links in cfg.get("find-links", []):
        mount(links)
        args += ["--find-links", links]
    for cert in cfg.get("cert", [])[:1]:
        mount(cert)
        args += ["--cert", cert]
    # torch from a local index when one has it (the wheels are large), else from the host's index
    torch_index = next(
        (
            u
            for u in cfg.get("extra-index-url", []) + cfg.get("index-url", [])
            if u.startswith("file://") and (Path(u.removeprefix("file://")) / "torch").is_dir()
        ),
        (cfg.get("index-url") or ["https://pypi.org/simple"])[0],
    )
    return volumes, torch_index, " ".join(args)


def build_ssf(eng: str, variant: str, python_image: str, no_cache: bool = False, demo: bool = False) -> float:
    """Build ssf-serve:<variant> (or, with ``demo``, the Dockerfile's demo target as ssf-demo:<variant>);
    returns the wall time in seconds."""
    tag = f"ssf-demo:{variant}" if demo else f"ssf-serve:{variant}"
    cmd = [
        eng,
        "build",
        "-t",
        tag,
        "--build-arg",
        f"VARIANT={variant}",
        "--build-arg",
        f"PYTHON_IMAGE={python_image}",
    ]
    if eng == "podman":
        cmd += ["--format", "docker"]  # OCI images drop HEALTHCHECK
    if no_cache:
        cmd += ["--no-cache"]
    if demo:
        cmd += ["--target", "demo"]
    torch_index, pip_args = os.environ.get("TORCH_INDEX_URL"), os.environ.get("PIP_ARGS")
    if torch_index is None and not reachable(OFFICIAL_TORCH_INDEX[variant] + "/torch/"):
        if eng != "podman":
            raise SystemExit(
                f"{OFFICIAL_TORCH_INDEX[variant]} does not answer: set TORCH_INDEX_URL (and PIP_ARGS)"
            )
        log(f"  {OFFICIAL_TORCH_INDEX[variant]} does not answer: using the host's pip configuration")
        volumes, torch_index, host_args = host_pip_build(variant)
        pip_args = host_args if pip_args is None else pip_args
        for v in volumes:
            cmd += ["-v", v]
    if torch_index is not None:
        cmd += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    if pip_args is not None:
        cmd += ["--build-arg", f"PIP_ARGS={pip_args}"]
    cmd += ["-f", str(ROOT / "Dockerfile"), str(ROOT)]
    start = time.monotonic()
    run(cmd, env=engine_env())
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-cache", action="store_true", help="a cold build")
    p.add_argument("--demo", action="store_true", help="the demo image (compose profile demo) instead")
    a = p.parse_args(argv)
    eng = engine()
    chosen = bases(eng)
    seconds = build_ssf(eng, a.variant, chosen["PYTHON_IMAGE"], a.no_cache, a.demo)
    log(f"built {'ssf-demo' if a.demo else 'ssf-serve'}:{a.variant} in {seconds:.0f} s")
    print(f"CONTAINER_ENGINE={eng}")
    for k, v in chosen.items():
        print(f"{k}={v}")
    print(f"IMAGE_VARIANT={a.variant}")
    print(f"BUILD_SECONDS={seconds:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
