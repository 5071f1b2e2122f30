"""deploy/k8s validated offline against the Kubernetes OpenAPI schemas by a real validator: the PyPI package
kubernetes-validate (it bundles the schemas of every Kubernetes release, no cluster or network needed), in
strict mode (an unknown field is an error, as `kubectl apply --validate=strict` would say). Fast: part of
`make test`. The same check by hand:  kubernetes-validate --strict -k 1.30.0 deploy/k8s/*.yaml"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate  # the dev extra
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# the oldest release still in common use that has every API the manifests use (autoscaling/v2: 1.23,
# PDB policy/v1: 1.21), and the newest the validator bundles
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


DOCS = documents()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[n for n, _ in DOCS])
def test_manifest_is_valid_for_kubernetes(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_every_kind_is_covered() -> None:
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "StatefulSet", "Secret"} <= kinds


def test_the_validator_rejects_a_broken_manifest() -> None:
    """Negative control: a wrong type and an unknown (misspelt) field are both reported."""
    deployment = next(d for _, d in DOCS if d["kind"] == "Deployment")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, VERSIONS[-1], strict=True)
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, VERSIONS[-1], strict=True)
