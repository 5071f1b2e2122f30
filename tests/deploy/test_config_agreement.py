"""The deployment files agree with the code: every flag they pass exists in ssf-serve's parser and every
SSF_* setting is a Settings field; health paths are routes of the app; ports, service names, body limits
and drain timings line up across Dockerfile, docker-compose.yml, deploy/nginx, deploy/redis and
deploy/k8s. Fast (no servers), so it runs in every `make test`."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from deploy.topology import (
    FALLBACK_PARAMS,
    NGINX_TEMPLATE,
    REDIS_CONF,
    ROOT,
    UPSTREAM_PARAMS,
    Topology,
    render,
)
from service.api.app import create_app
from service.cli import build_parser
from service.settings import Settings

SETTING_ENV = {f"SSF_{name.upper()}" for name in Settings.model_fields}
DEFAULTS = Settings(model="x")
K8S = ROOT / "deploy" / "k8s"


def search(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    m = re.search(pattern, text, flags)
    assert m is not None, f"{pattern!r} not found"
    return m


def compose() -> dict[str, Any]:
    out: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return out


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
                out: dict[str, Any] = doc
                return out
    raise AssertionError(f"no {kind} {name or ''} in deploy/k8s")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with the default (what an empty .env gives)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


class Routes:
    """``path in routes()``: the app answers GET path with something other than 404 (no engine is
    started: /readyz says 503, which still proves the route exists)."""

    def __init__(self) -> None:
        self.client = TestClient(create_app(Settings(model="x")))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.client.get(path).status_code != 404


def routes() -> Routes:
    return Routes()


def parse_cli(args: list[str]) -> dict[str, Any]:
    """The flags as ssf-serve parses them (UsageError on an unknown flag or a bad value)."""
    parsed = {k: v for k, v in vars(build_parser().parse_args(args)).items() if v is not None}
    return parsed


def check_settings(args: dict[str, Any], env: dict[str, str]) -> Settings:
    """Settings built from the flags and env as the server would (the token replaced by a dummy)."""
    assert set(env) <= SETTING_ENV, f"not settings the app reads: {sorted(set(env) - SETTING_ENV)}"
    values: dict[str, Any] = {k.removeprefix("SSF_").lower(): str(v) for k, v in env.items()}
    values["admin_token"] = "dummy"
    values.update(args)
    return Settings(**values)


def ssf_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if str(s.get("image", "")).startswith("ssf-serve")}


# ------------------------------------------------------------------------------------ compose
def test_compose_replicas_use_real_flags_and_settings() -> None:
    services = ssf_services()
    assert len(services) >= 2, "two or more replicas"
    for name, svc in services.items():
        args = parse_cli([interpolate(a) for a in svc["command"]])
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert "SSF_ADMIN_TOKEN" not in env, f"{name}: the token belongs in the env file"
        assert interpolate(svc["env_file"]) == ".env"
        settings = check_settings(args, env)
        assert settings.store == "redis://redis:6379/0" and "redis" in compose()["services"]
        assert str(settings.port) in svc["expose"]
        assert "/models:ro" in svc["volumes"][0]
        grace = float(svc["stop_grace_period"].removesuffix("s"))
        assert grace > settings.drain_delay_s + settings.graceful_timeout_s


def test_compose_nginx_and_prometheus_point_at_the_replicas() -> None:
    services = compose()["services"]
    ports = {
        str(check_settings(parse_cli([interpolate(a) for a in s["command"]]), s["environment"]).port)
        for s in ssf_services().values()
    }
    assert len(ports) == 1
    port = ports.pop()
    expected = " ".join(f"server {n}:{port} {UPSTREAM_PARAMS};" for n in sorted(ssf_services()))
    nginx = services["nginx"]
    assert nginx["environment"]["NGINX_UPSTREAM_SERVERS"] == expected
    fallback = " ".join(f"server {n}:{port} {FALLBACK_PARAMS};" for n in sorted(ssf_services()))
    assert nginx["environment"]["NGINX_FALLBACK_SERVERS"] == fallback
    assert nginx["volumes"] == [
        "./deploy/nginx/ssf.conf.template:/etc/nginx/templates/default.conf.template:ro"
    ]
    listen = nginx["environment"]["NGINX_LISTEN"]
    assert any(p.endswith(f":{listen}") and p.startswith("127.0.0.1:") for p in nginx["ports"])
    filter_re = nginx["environment"]["NGINX_ENVSUBST_FILTER"].replace("$$", "$")
    used = set(re.findall(r"\$\{([A-Z_]+)\}", NGINX_TEMPLATE.read_text()))
    assert {v for v in used if re.search(filter_re, v)} == used
    assert set(nginx["environment"]) - {"NGINX_ENVSUBST_FILTER"} == used
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{n}:{port}" for n in ssf_services())
    assert prom["scrape_configs"][0]["metrics_path"] in routes()


def test_compose_redis_uses_the_shipped_config_with_a_volume() -> None:
    redis = compose()["services"]["redis"]
    conf_mount = next(v for v in redis["volumes"] if v.startswith("./deploy/redis/redis.conf:"))
    assert redis["command"][1] == conf_mount.split(":")[1]
    assert any(v.split(":")[1] == "/data" and not v.startswith(".") for v in redis["volumes"])
    assert redis["volumes"][1].split(":")[0] in compose()["volumes"]


def test_env_example_holds_only_settings_and_no_token() -> None:
    lines = [ln for ln in (ROOT / ".env.example").read_text().splitlines() if ln and not ln.startswith("#")]
    env = dict(ln.split("=", 1) for ln in lines)
    assert {k for k in env if k.startswith("SSF_")} <= SETTING_ENV
    assert env["SSF_ADMIN_TOKEN"] == ""
    used = set(re.findall(r"\$\{([A-Z_]+)(?::-[^}]*)?\}", (ROOT / "docker-compose.yml").read_text()))
    assert used <= set(env), f"compose uses variables .env.example does not document: {used - set(env)}"


# ---------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_entrypoint_flags_env_and_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = yaml.safe_load(search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))  # a JSON list
    assert entry == ["ssf-serve"] and "ssf-serve" in scripts
    cmd = yaml.safe_load(search(r"^CMD (.+)$", text, re.M).group(1))
    # the server image's settings (the demo target after it sets SSF_WEIGHTS_CACHE, an ssf.importer variable)
    server = text.split("\nFROM runtime AS demo")[0]
    env = dict(re.findall(r"\b(SSF_[A-Z_]+)=(\S+)", server))
    settings = check_settings(parse_cli(cmd), env)
    assert re.search(rf"^EXPOSE {settings.port}$", text, re.M)
    health = re.search(r"HEALTHCHECK.*?(/[a-z]+)'", text, re.S)
    assert health and health.group(1) == "/healthz" and "/healthz" in routes()
    assert re.search(r"^USER ssf$", text, re.M), "runs as a non-root user"
    assert "ARG VARIANT=cpu" in text and "cuda)" in text
    # every extra the image installs exists, and the CUDA variant never gets onnxruntime (CPU) next to
    # onnxruntime-gpu: both install the module `onnxruntime`, and whichever lands last wins
    extras_known = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    used_extras = {e for group in re.findall(r'"\.\[([a-z,]+)\]"', text) for e in group.split(",")}
    assert used_extras and used_extras <= extras_known, used_extras - extras_known
    cuda = search(r'if \[ "\$VARIANT" = cuda \]; then(.*?)\belse\b', text, re.S).group(1)
    assert "gpu" in cuda and not re.search(r"\[[a-z,]*\bonnx\b[a-z,]*\]", cuda)


# ------------------------------------------------------------------------------------- nginx
def test_nginx_template_limits_match_the_app_and_it_renders_valid(tmp_path: Path) -> None:
    text = NGINX_TEMPLATE.read_text()
    server_block = text.split("server {", 1)[1]
    assert f"client_max_body_size {DEFAULTS.max_body_bytes};" in server_block.split("location", 1)[0]
    upload = re.search(r"location = /tasks \{(.*?)\}", text, re.S)
    assert upload and f"client_max_body_size {DEFAULTS.max_upload_body_bytes};" in upload.group(1)
    assert "hash $ssf_task consistent;" in text
    assert re.search(r"map \$uri \$ssf_task \{\s*~\^/tasks/\(\?<t>\[\^/\]\+\) \$t;", text)
    predict = re.search(r"location ~ \^/tasks/\[\^/\]\+/predict\$ \{(.*?)\}", text, re.S)
    assert predict and "non_idempotent" in predict.group(1)
    code = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("#"))
    assert code.count("non_idempotent") == 1, "resending non-idempotent requests: predict only"
    timeouts = dict(re.findall(r"^\s*(client_(?:header|body)_timeout) (\d+)s;", text, re.M))
    assert (
        5 <= int(timeouts["client_header_timeout"]) <= 10 and 5 <= int(timeouts["client_body_timeout"]) <= 10
    )
    read_timeout = int(search(r"proxy_read_timeout (\d+)s;", text).group(1))
    assert read_timeout > DEFAULTS.request_timeout_s
    assert "proxy_next_upstream error timeout http_502 http_503;" in text
    assert upload and "error_page" not in upload.group(1), "an upload is never resent"
    with pytest.raises(KeyError):
        render(text, {})
    # the locally rendered file is valid for the nginx installed here
    topo = Topology(tmp_path, tmp_path / "weights.safetensors")
    if not Path(topo.nginx.cmd[0]).exists():
        pytest.fail("nginx is not installed (make system-deps); CI provides it")
    topo.check_nginx_config()


def test_redis_config_is_durable_and_kubernetes_carries_it_verbatim() -> None:
    conf = REDIS_CONF.read_text()
    directives = dict(ln.split(None, 1) for ln in conf.splitlines() if ln.strip() and not ln.startswith("#"))
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] in {"everysec", "always"}
    assert directives["maxmemory-policy"] == "noeviction"
    assert k8s("ConfigMap", "ssf-redis-conf")["data"]["redis.conf"] == conf


# ---------------------------------------------------------------------------------- Kubernetes
def container() -> dict[str, Any]:
    c: dict[str, Any] = k8s("Deployment", "ssf-serve")["spec"]["template"]["spec"]["containers"][0]
    return c


def test_k8s_deployment_flags_settings_probes_and_ports() -> None:
    c = container()
    args = parse_cli([str(a) for a in c["args"]])
    env = {e["name"]: str(e["value"]) for e in c["env"]}
    settings = check_settings(args, env)
    secret = k8s("Secret", "ssf-admin")
    assert set(secret["stringData"]) <= SETTING_ENV and secret["stringData"]["SSF_ADMIN_TOKEN"] == ""
    assert [s["secretRef"]["name"] for s in c["envFrom"]] == ["ssf-admin"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == settings.port
    probes = {k: c[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes() and probe["port"] in ("http", settings.port)
    pod = k8s("Deployment", "ssf-serve")["spec"]["template"]["spec"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert (
        pod["terminationGracePeriodSeconds"] > pre_stop + settings.drain_delay_s + settings.graceful_timeout_s
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the store URL names the Redis Service and its port
    redis_svc = k8s("Service", "ssf-redis")
    host_port = re.match(r"redis://([^:/]+):(\d+)/\d+$", settings.store)
    assert host_port and host_port.group(1) == redis_svc["metadata"]["name"]
    assert int(host_port.group(2)) == redis_svc["spec"]["ports"][0]["port"]


def test_k8s_service_ingress_and_hpa_point_at_the_deployment() -> None:
    dep = k8s("Deployment", "ssf-serve")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = k8s("Service", "ssf-serve")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container()["ports"]}
    hpa = k8s("HorizontalPodAutoscaler", "ssf-serve")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    main, upload = k8s("Ingress", "ssf-serve"), k8s("Ingress", "ssf-serve-upload")
    for ing in (main, upload):
        backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] == svc["metadata"]["name"]
        assert backend["port"]["name"] == svc["spec"]["ports"][0]["name"]
    size = "nginx.ingress.kubernetes.io/proxy-body-size"
    assert int(main["metadata"]["annotations"][size]) == DEFAULTS.max_body_bytes
    assert int(upload["metadata"]["annotations"][size]) == DEFAULTS.max_upload_body_bytes
    redis = k8s("StatefulSet", "ssf-redis")
    assert redis["spec"]["volumeClaimTemplates"], "Redis data on a persistent volume"
    assert shlex.join(redis["spec"]["template"]["spec"]["containers"][0]["command"]).endswith("redis.conf")


# Per-Ingress annotations of kubernetes/ingress-nginx that these manifests may use (from
# https://github.com/kubernetes/ingress-nginx/blob/main/docs/user-guide/nginx-configuration/annotations.md).
# ingress-nginx ignores an unknown annotation without a word, e.g. client-body-timeout, which exists only
# as a controller ConfigMap key.
INGRESS_NGINX_ANNOTATIONS = {
    "proxy-body-size",
    "proxy-connect-timeout",
    "proxy-read-timeout",
    "proxy-send-timeout",
    "proxy-next-upstream",
    "proxy-next-upstream-timeout",
    "proxy-next-upstream-tries",
    "proxy-request-buffering",
    "proxy-http-version",
    "client-body-buffer-size",
    "upstream-hash-by",
    "load-balance",
    "limit-connections",
    "limit-rps",
}


def test_k8s_ingress_matches_the_nginx_template() -> None:
    template = NGINX_TEMPLATE.read_text()
    prefix = "nginx.ingress.kubernetes.io/"
    main, upload = k8s("Ingress", "ssf-serve"), k8s("Ingress", "ssf-serve-upload")
    for ing in (main, upload):
        names = {k.removeprefix(prefix) for k in ing["metadata"]["annotations"] if k.startswith(prefix)}
        assert names <= INGRESS_NGINX_ANNOTATIONS, (
            f"not ingress-nginx annotations: {names - INGRESS_NGINX_ANNOTATIONS}"
        )
        notes = {k.removeprefix(prefix): v for k, v in ing["metadata"]["annotations"].items()}
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            directive = key.replace("-", "_")
            assert f"{directive} {notes[key]}s;" in template, key
    # non_idempotent only where the only POST is predict; the upload (Exact /tasks) is never resent
    assert main["metadata"]["annotations"][prefix + "proxy-next-upstream"].endswith(" non_idempotent")
    assert "non_idempotent" not in upload["metadata"]["annotations"][prefix + "proxy-next-upstream"]
    assert upload["spec"]["rules"][0]["http"]["paths"][0] == {
        **upload["spec"]["rules"][0]["http"]["paths"][0],
        "path": "/tasks",
        "pathType": "Exact",
    }
    # slowloris timeouts: controller-wide keys, the template's values
    controller = k8s("ConfigMap", "ingress-nginx-controller")["data"]
    for key in ("client-header-timeout", "client-body-timeout"):
        assert f"{key.replace('-', '_')} {controller[key]}s;" in template, key


def test_the_checks_catch_a_wrong_flag_or_setting() -> None:
    """Negative control: the helpers above really refuse what ssf-serve would refuse or ignore."""
    from service.cli import UsageError

    with pytest.raises(UsageError):
        parse_cli(["--model", "x", "--workers", "2"])
    with pytest.raises(AssertionError):
        check_settings({"model": "x"}, {"SSF_WORKERS": "2"})
    assert "/nope" not in routes()
