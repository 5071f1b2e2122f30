"""Write ``kserve-schema.json``: the field tables of KServe's ServingRuntime and InferenceService, taken from
the KServe Python SDK wheel on PyPI, for validating the manifests here offline.

No package on PyPI ships KServe's CRD YAML (openAPIV3Schema); the SDK ships the same API as generated
classes (``kserve/models/v1alpha1_*.py``, ``v1beta1_*.py``: ``openapi_types``, ``attribute_map`` and the
required checks in the setters). This reads them with ``ast`` (nothing is imported or run) and keeps
every KServe type reachable from the two kinds; the Kubernetes core types they embed (``V1Container``,
``V1ObjectMeta``, ...) are left to kubernetes-validate's bundled schemas. Run it after a KServe upgrade:

    pip download kserve==0.21.0 --no-deps -d /tmp/kserve
    python deploy/k8s/kserve/extract_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("kserve-schema.json")
ROOTS = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}
KSERVE_TYPE = re.compile(r"V1(alpha1|alpha2|beta1)[A-Z]\w*")
REQUIRED = re.compile(r"client_side_validation and (\w+) is None")


CLASS = re.compile(r"^class (\w+)\(object\):", re.M)


def read_model(source: str) -> dict[str, Any]:
    tree = ast.parse(source)
    tables: dict[str, dict[str, str]] = {}
    for node in ast.walk(tree):
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
            tables[target.id] = ast.literal_eval(node.value)  # type: ignore[union-attr]
    keys = tables["attribute_map"]
    return {
        "fields": {keys[attr]: kind for attr, kind in tables["openapi_types"].items()},
        "required": sorted(keys[attr] for attr in set(REQUIRED.findall(source)) if attr in keys),
    }


def extract(wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as z:
        version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        modules = {}
        for path in z.namelist():
            if path.startswith("kserve/models/") and path.endswith(".py"):
                source = z.read(path).decode()
                modules.update({cls: source for cls in CLASS.findall(source)})
        types: dict[str, Any] = {}
        opaque: set[str] = set()  # named by a field but not generated (quantities): any value passes
        todo = list(ROOTS.values())
        while todo:
            name = todo.pop()
            if name in types or name in opaque:
                continue
            if name not in modules:
                opaque.add(name)
                continue
            types[name] = read_model(modules[name])
            for kind in types[name]["fields"].values():
                todo += [m.group(0) for m in KSERVE_TYPE.finditer(kind)]
    source = version.split("/")[0].removesuffix(".dist-info")
    return {"source": source, "kinds": ROOTS, "types": types, "opaque": sorted(opaque)}


if __name__ == "__main__":
    OUT.write_text(json.dumps(extract(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
