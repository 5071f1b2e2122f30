"""deploy/k8s/kserve validated offline: every KServe field against the tables of KServe's own API
(deploy/k8s/kserve/kserve-schema.json, extracted from the KServe SDK wheel by extract_schema.py: no PyPI
package ships the CRD YAML itself), and every Kubernetes core object inside them (containers, metadata,
resources, probes) against the Kubernetes schemas kubernetes-validate bundles, in strict mode. Plus the
two manifests agree with each other and with the server (runtime name, model format, port, /v2 probes)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e .[dev]")

KSERVE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "kserve"
SCHEMA = json.loads((KSERVE / "kserve-schema.json").read_text())
K8S_VERSION = "1.30.0"
SCALARS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}
# where each Kubernetes core type lives inside a Pod, so kubernetes-validate can check it in place
IN_POD: dict[str, tuple[str | int, ...]] = {
    "V1ObjectMeta": ("metadata",),
    "V1Container": ("spec", "containers", 0),
    "V1ResourceRequirements": ("spec", "containers", 0, "resources"),
    "V1EnvVar": ("spec", "containers", 0, "env", 0),
    "V1EnvFromSource": ("spec", "containers", 0, "envFrom", 0),
    "V1ContainerPort": ("spec", "containers", 0, "ports", 0),
    "V1Probe": ("spec", "containers", 0, "readinessProbe"),
    "V1SecurityContext": ("spec", "containers", 0, "securityContext"),
    "V1VolumeMount": ("spec", "containers", 0, "volumeMounts", 0),
    "V1Toleration": ("spec", "tolerations", 0),
}


def core_errors(kind: str, value: Any, where: str) -> list[str]:
    if kind not in IN_POD:
        return [f"{where}: no way to check Kubernetes type {kind}; add it to IN_POD"]
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}
    pod["spec"] = {"containers": [{"name": "c"}]}
    node: Any = pod
    *parents, last = IN_POD[kind]
    for step, following in zip(parents, [*parents[1:], last], strict=False):
        if isinstance(node, dict) and step not in node:
            node[step] = [] if isinstance(following, int) else {}
        node = node[step]
    if isinstance(last, int):
        node[:1] = [value]
    else:
        node[last] = value
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {e.message}"]
    return []


def errors(value: Any, kind: str, where: str) -> list[str]:  # noqa: C901  (one branch per kind of type)
    if kind == "object" or kind in SCHEMA["opaque"]:
        return []
    if kind in SCALARS:
        ok = isinstance(value, SCALARS[kind]) and (kind == "bool" or not isinstance(value, bool))
        return [] if ok else [f"{where}: {value!r} is not {kind}"]
    if kind.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [e for i, v in enumerate(value) for e in errors(v, kind[5:-1], f"{where}[{i}]")]
    if kind.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{where}: not a map"]
        inner = kind[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in errors(v, inner, f"{where}.{k}")]
    if kind not in SCHEMA["types"]:
        return core_errors(kind, value, where)
    if not isinstance(value, dict):
        return [f"{where}: not an object ({kind})"]
    table = SCHEMA["types"][kind]
    out = [f"{where}: unknown field {k!r} in {kind}" for k in value if k not in table["fields"]]
    out += [f"{where}: {kind} needs {k!r}" for k in table["required"] if k not in value]
    for key, item in value.items():
        if key in table["fields"]:
            out += errors(item, table["fields"][key], f"{where}.{key}")
    return out


def validate(doc: dict[str, Any]) -> list[str]:
    kind = SCHEMA["kinds"].get(doc.get("kind"))
    if kind is None or not str(doc.get("apiVersion", "")).startswith("serving.kserve.io/"):
        return [f"not a KServe kind: {doc.get('apiVersion')}/{doc.get('kind')}"]
    version = re.match(r"V1(alpha1|alpha2|beta1)", kind).group(0).lower()  # type: ignore[union-attr]
    if doc["apiVersion"] != f"serving.kserve.io/{version}":
        return [f"{doc['kind']} is serving.kserve.io/{version}, not {doc['apiVersion']}"]
    return errors(doc, kind, doc["kind"])


def manifests() -> dict[str, dict[str, Any]]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted(KSERVE.glob("*.yaml"))]
    return {d["kind"]: d for d in docs}


def test_the_schema_came_from_the_kserve_sdk() -> None:
    assert SCHEMA["source"].startswith("kserve-")
    assert SCHEMA["types"]["V1alpha1ServingRuntimeSpec"]["required"] == ["containers"]
    assert "storageUri" in SCHEMA["types"]["V1beta1ModelSpec"]["fields"]


@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_manifest_is_valid(kind: str) -> None:
    assert validate(manifests()[kind]) == []


def test_the_validator_rejects_broken_manifests() -> None:
    """Negative controls, one per kind of mistake, each on a copy of a real manifest."""
    isvc, runtime = manifests()["InferenceService"], manifests()["ServingRuntime"]
    cases: list[tuple[dict[str, Any], str]] = []
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    cases.append((typo, "unknown field 'storageURI'"))
    wrong_type = copy.deepcopy(isvc)
    wrong_type["spec"]["predictor"]["minReplicas"] = "two"
    cases.append((wrong_type, "is not int"))
    no_containers = copy.deepcopy(runtime)
    del no_containers["spec"]["containers"]
    cases.append((no_containers, "needs 'containers'"))
    bad_container = copy.deepcopy(runtime)
    bad_container["spec"]["containers"][0]["cmd"] = ["x"]
    cases.append((bad_container, "containers[0]"))
    bad_resources = copy.deepcopy(isvc)
    bad_resources["spec"]["predictor"]["model"]["resources"] = {"request": {"cpu": "1"}}
    cases.append((bad_resources, "resources"))
    wrong_api = copy.deepcopy(runtime)
    wrong_api["apiVersion"] = "serving.kserve.io/v1beta1"
    cases.append((wrong_api, "is serving.kserve.io/v1alpha1"))
    for doc, words in cases:
        found = validate(doc)
        assert any(words in e for e in found), (words, found)


def test_the_two_manifests_fit_each_other_and_the_server() -> None:
    from service.api.app import create_app
    from service.settings import Settings

    isvc, runtime = manifests()["InferenceService"], manifests()["ServingRuntime"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    args = container["args"]
    port = int(args[args.index("--port") + 1])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert args[args.index("--weights") + 1].startswith("/mnt/models/")  # where KServe puts storageUri
    paths = set(create_app(Settings(model="test_vit")).openapi()["paths"])
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == port
        assert container[probe]["httpGet"]["path"] in paths
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
