"""The docker-compose topology as plain processes: redis-server, N ssf-serve replicas and nginx.

Same files as compose: ``deploy/redis/redis.conf`` (with --port/--bind/--dir overrides) and
``deploy/nginx/ssf.conf.template`` (rendered with the same ``${VAR}`` rules the nginx image's envsubst
uses). Everything binds to 127.0.0.1 on free ports, lives in one work directory, and runs in its own
process group so teardown (also on failure, also on Ctrl-C) kills exactly what was started.

    python deploy/topology.py --model test_vit --weights backbone.safetensors --replicas 2

prints the nginx URL and runs until Ctrl-C. Tests use ``Topology`` as a context manager.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NGINX_TEMPLATE = DEPLOY / "nginx" / "ssf.conf.template"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"
# passive health, identical for every replica (compose writes the same in NGINX_UPSTREAM_SERVERS)
UPSTREAM_PARAMS = "max_fails=1 fail_timeout=5s"
FALLBACK_PARAMS = "max_fails=0"  # the fallback pool has no passive health (see the template)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(template: str, variables: dict[str, str]) -> str:
    """envsubst for ``${NAME}`` only; a name the template uses but ``variables`` lacks is an error
    (envsubst would silently leave it, and nginx would fail later with a less clear message)."""
    missing = sorted({m.group(1) for m in _VAR.finditer(template)} - variables.keys())
    if missing:
        raise KeyError(f"template variables without a value: {', '.join(missing)}")
    return _VAR.sub(lambda m: variables[m.group(1)], template)


def upstream_servers(addresses: list[str], params: str = UPSTREAM_PARAMS) -> str:
    return " ".join(f"server {a} {params};" for a in addresses)


def nginx_main_conf(workdir: Path, include: Path) -> str:
    """The main-context file around the rendered template (compose uses the image's own nginx.conf)."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers as root only here, never in the image
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temps = "\n".join(f"    {kind}_temp_path {workdir / kind};" for kind in kinds)
    return (
        f"{user}worker_processes 1;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"{temps}\n"
        f"    include {include};\n"
        "}\n"
    )


def nginx_command(
    prefix: Path, port: int, replicas: list[str], access_log: Path, template: str | None = None
) -> list[str]:
    """Render the template (or ``template``) for ``replicas`` into ``prefix`` and return the command
    that runs nginx in the foreground on 127.0.0.1:``port``."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (make system-deps)")
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / "ssf.conf"
    variables = {
        "NGINX_LISTEN": f"127.0.0.1:{port}",
        "NGINX_UPSTREAM_SERVERS": upstream_servers(replicas),
        "NGINX_FALLBACK_SERVERS": upstream_servers(replicas, FALLBACK_PARAMS),
        "NGINX_ACCESS_LOG": str(access_log),
    }
    site.write_text(render(template if template is not None else NGINX_TEMPLATE.read_text(), variables))
    main = prefix / "nginx.conf"
    main.write_text(nginx_main_conf(prefix, site))
    cmd = [binary, "-p", str(prefix), "-e", "stderr", "-c", str(main)]
    return [*cmd, "-g", f"daemon off; master_process on; pid {prefix / 'nginx.pid'};"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (loopback, our URL)
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as f:
            self.popen = subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """``sig`` to the process itself (SIGTERM: a graceful drain)."""
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL to the whole process group (kill -9), then reap."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


# Topologies started and not yet stopped: the interpreter's exit stops them even when no context manager
# or fixture got to (an exception outside one, sys.exit in a helper). Each server runs in its own session,
# so nothing else would take it down with this process.
_LIVE: list[Topology] = []


def _stop_live_topologies() -> None:
    for topo in list(_LIVE):
        try:
            topo.stop()
        except Exception as e:  # at exit: report, keep stopping the others
            print(f"topology teardown at exit: {e}", file=sys.stderr)


atexit.register(_stop_live_topologies)


@dataclass(eq=False)  # identity: _LIVE tracks these objects
class Topology:
    workdir: Path
    weights: Path
    model: str = "test_vit"
    replicas: int = 2
    admin_token: str = "topology-admin-token"
    replica_env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.nginx_port = free_port()
        self.replica_ports = [free_port() for _ in range(self.replicas)]
        self.redis = self._redis_proc()
        self.servers = [self._replica_proc(i) for i in range(self.replicas)]
        self.nginx = self._nginx_proc()

    # ------------------------------------------------------------------------------- addresses
    @property
    def store_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        """nginx: what clients use."""
        return f"http://127.0.0.1:{self.nginx_port}"

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[i]}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "nginx" / "access.log"

    # ----------------------------------------------------------------------------- processes
    def _redis_proc(self) -> Proc:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make system-deps)")
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        cmd = [binary, str(REDIS_CONF), "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        cmd += ["--protected-mode", "yes", "--dir", str(data), "--daemonize", "no"]
        return Proc("redis", cmd, self.workdir / "redis.log")

    def _replica_proc(self, i: int) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSF_")}
        env.update({"SSF_ADMIN_TOKEN": self.admin_token, "SSF_DRAIN_DELAY_S": "1"})
        env.update(self.replica_env)
        # the installed ssf-serve console script of this interpreter (what compose and k8s run), else
        # the module it runs
        script = Path(sys.executable).with_name("ssf-serve")
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]
        cmd += ["--model", self.model, "--weights", str(self.weights)]
        cmd += ["--store", self.store_url, "--device", "cpu", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.replica_ports[i])]
        return Proc(f"ssf-{i + 1}", cmd, self.workdir / f"ssf-{i + 1}.log", env)

    def _nginx_proc(self) -> Proc:
        replicas = [f"127.0.0.1:{p}" for p in self.replica_ports]
        cmd = nginx_command(self.workdir / "nginx", self.nginx_port, replicas, self.access_log)
        return Proc("nginx", cmd, self.workdir / "nginx.log")

    def check_nginx_config(self) -> None:
        """``nginx -t`` on the rendered files."""
        cmd = [*self.nginx.cmd, "-t"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{r.stderr}")

    # ------------------------------------------------------------------------------ lifecycle
    def _track(self) -> None:
        if self not in _LIVE:
            _LIVE.append(self)

    def start(self) -> None:
        self._track()
        self.check_nginx_config()
        self.start_redis()
        for i in range(self.replicas):
            self.servers[i].start()
        for i in range(self.replicas):
            self.wait_ready(i)
        self.nginx.start()
        wait_for_port(self.nginx_port)

    def start_redis(self) -> None:
        self._track()
        self.redis.start()
        wait_for_port(self.redis_port)

    def start_replica(self, i: int, wait: bool = True) -> None:
        self._track()
        self.servers[i].start()
        if wait:
            self.wait_ready(i)

    def wait_ready(self, i: int) -> float:
        """Seconds until replica ``i`` answers /readyz 200; raises with its log when it dies or hangs."""
        t0 = time.monotonic()
        server = self.servers[i]
        while time.monotonic() - t0 < self.ready_timeout_s:
            if not server.running:
                raise RuntimeError(f"{server.name} exited:\n{server.tail()}")
            if http_status(self.replica_url(i) + "/readyz") == 200:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"{server.name} not ready after {self.ready_timeout_s}s:\n{server.tail()}")

    def stop(self) -> None:
        """Tear everything down; each part is stopped even when another one fails to."""
        errors = []
        if self in _LIVE:
            _LIVE.remove(self)
        for proc in [self.nginx, *self.servers, self.redis]:
            try:
                proc.stop()
            except Exception as e:  # keep going: never leave a process behind
                errors.append(f"{proc.name}: {e}")
        if errors:
            raise RuntimeError("teardown: " + "; ".join(errors))

    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM (CI cancelling a job, ``kill``) into KeyboardInterrupt, so that context managers and
    fixtures tear the topology down instead of leaving orphaned servers in their own sessions."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="test_vit")
    p.add_argument("--weights", required=True, type=Path)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workdir", type=Path, help="logs, Redis data, nginx files (default: a new temp dir)")
    args = p.parse_args(argv)
    interrupt_on_sigterm()
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="ssf-topology-"))
    token = os.environ.get("SSF_ADMIN_TOKEN") or "topology-admin-token"
    topo = Topology(args.workdir.resolve(), args.weights.resolve(), args.model, args.replicas, token)
    with topo:
        print(f"nginx: {topo.url}  replicas: {[topo.replica_url(i) for i in range(args.replicas)]}")
        print(f"redis: {topo.store_url}  logs: {topo.workdir}  (Ctrl-C stops everything)", flush=True)
        try:
            while all(p.running for p in [topo.redis, topo.nginx, *topo.servers]):
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
