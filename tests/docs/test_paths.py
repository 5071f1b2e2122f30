"""Every file, folder, module and ``file.py:Symbol`` the docs name exists, so a renamed file or function
fails here instead of leaving docs/architecture.md (or another page) pointing at nothing.

Checked in docs/*.md and README.md: paths under the repository's top-level folders (in text, tables, code
blocks and diagrams), ``name.py`` and ``path/to/name.py:Symbol`` / ``:Class.method`` references (the symbol
must be defined in that file), top-level files named in code spans, and ``python -m package.module``.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.docs.doctext import DOCS, ROOT, code_spans

PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md")) + ["README.md"]
TOP = ("ssf", "training", "service", "bench", "deploy", "tests", "docs", "assets")
# a repository path: starts at a top-level folder; optional :Symbol after a .py file
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:"
    + "|".join(TOP)
    + r")/[\w./-]*?)(?::([A-Za-z_][\w.]*))?(?=[\s`'\")\],;|]|$|\.(?:\s|$))"
)
PY_FILE = re.compile(r"(?<![\w./-])([\w-]+\.py)(?::([A-Za-z_][\w.]*))?(?![\w/])")
TOP_FILE = re.compile(r"^[\w.-]+\.(?:md|toml|yml|yaml|cfg|ini|txt)$|^(?:Makefile|Dockerfile)$")
MODULE = re.compile(r"python -m ([\w.]+)")


def references(page: str) -> list[tuple[str, str | None]]:
    """(path, symbol or None) for everything ``page`` names."""
    text = (ROOT / page).read_text(encoding="utf-8")
    text = re.sub(r"\b[a-z][a-z0-9+.-]*://\S+", " ", text)  # URLs name other sites' paths
    found: list[tuple[str, str | None]] = []
    for match in REPO_PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if "<" in path or "*" in path or "{" in path:
            continue
        found.append((path, match.group(2)))
    for match in PY_FILE.finditer(text):
        found.append((match.group(1), match.group(2)))
    for span in code_spans(text):
        if TOP_FILE.match(span):
            found.append((span, None))
    for match in MODULE.finditer(text):
        module = match.group(1).rstrip(".").replace(".", "/")
        found.append((module + ".py" if (ROOT / f"{module}.py").exists() else module + "/__main__.py", None))
    return found


@cache
def tracked_basenames() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in ROOT.rglob("*.py"):
        if ".git" not in path.parts and "build" not in path.parts:
            out.setdefault(path.name, []).append(path)
    return out


def locate(path: str) -> list[Path]:
    """The files a reference can mean: a path from the root, or (a bare name) any file of that name."""
    if "/" in path:
        candidate = ROOT / path
        return [candidate] if candidate.exists() else []
    if (ROOT / path).exists():
        return [ROOT / path]
    return tracked_basenames().get(path, [])


def defines(file: Path, symbol: str) -> bool:
    """``symbol`` (``name`` or ``Class.member``) is defined at the top of ``file`` (a def, class or name)."""
    body = ast.parse(file.read_text(encoding="utf-8")).body
    for part in symbol.split("."):
        found = None
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == part:
                found = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
            elif isinstance(node, ast.ImportFrom | ast.Import) and any(
                (a.asname or a.name) == part for a in node.names
            ):
                found = node
        if found is None:
            return False
        body = found.body if isinstance(found, ast.ClassDef) else []
    return True


@pytest.mark.parametrize("page", PAGES)
def test_every_path_and_symbol_a_page_names_exists(page: str) -> None:
    problems = []
    for path, symbol in references(page):
        files = locate(path)
        if not files:
            problems.append(f"{path}: no such file or folder")
        elif symbol and not any(f.suffix == ".py" and defines(f, symbol) for f in files):
            problems.append(f"{path}:{symbol}: {symbol} is not defined in {path}")
    assert not problems, f"{page} names what the repository does not have:\n" + "\n".join(
        sorted(set(problems))
    )


def test_the_reference_scanner_sees_symbols() -> None:
    """Guards the scanner: a page naming a file:Symbol yields it, and a wrong symbol is caught."""
    assert defines(ROOT / "service/settings.py", "Settings")
    assert not defines(ROOT / "service/settings.py", "NoSuchThing")
    assert ("service/settings.py", "Settings") in references("docs/cli.md")
