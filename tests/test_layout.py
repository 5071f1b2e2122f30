"""The test tree's own rules: what tests share lives in ``tests/helpers``, so no module imports from a test
module or a conftest (a test module is not a library, and a conftest's names are pytest's to inject as
fixtures), and every test file's name is unique."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imports(tree: ast.AST, package: str) -> list[tuple[int, list[str]]]:
    """Each import statement's line and the modules it may name (relative ones made absolute)."""
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.append((node.lineno, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            found.append((node.lineno, [base, *(f"{base}.{alias.name}" for alias in node.names)]))
    return found


def _is_test_or_conftest(module: str) -> bool:
    return any(part.startswith("test_") or part == "conftest" for part in module.split("."))


def imports_of_test_modules(root: Path) -> list[str]:
    """``path:line`` of each import of a ``test_*`` module or a ``conftest`` in the tree under ``root``."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        package = ".".join(rel.with_suffix("").parts[:-1])
        for line, modules in _imports(ast.parse(path.read_text(), filename=str(path)), package):
            if any(_is_test_or_conftest(m) for m in modules):
                bad.append(f"{rel}:{line}")
    return bad


def duplicate_test_file_names(root: Path) -> dict[str, list[str]]:
    places: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("test_*.py")):
        places[path.name].append(str(path.relative_to(root.parent)))
    return {name: paths for name, paths in places.items() if len(paths) > 1}


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    bad = imports_of_test_modules(TESTS)
    assert not bad, "import helpers from tests/helpers instead:\n" + "\n".join(bad)


def test_test_file_names_are_unique() -> None:
    assert not duplicate_test_file_names(TESTS)


def test_the_guard_sees_what_it_forbids(tmp_path: Path) -> None:
    """Positive control: each forbidden form is found, and a helper import is not."""
    pkg = tmp_path / "tests" / "area"
    pkg.mkdir(parents=True)
    (pkg / "test_a.py").write_text(
        "from tests.area.test_b import x\n"
        "from tests.conftest import RedisServer\n"
        "from . import conftest\n"
        "from .test_b import y\n"
        "import tests.area.test_b\n"
        "from tests.helpers.models import make\n"
    )
    (pkg / "other").mkdir()
    (pkg / "other" / "test_a.py").write_text("")
    bad = imports_of_test_modules(tmp_path / "tests")
    assert bad == [f"tests/area/test_a.py:{line}" for line in (1, 2, 3, 4, 5)]
    assert duplicate_test_file_names(tmp_path / "tests") == {
        "test_a.py": ["tests/area/other/test_a.py", "tests/area/test_a.py"]
    }
