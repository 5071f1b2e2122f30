"""No tracked file refers to a document that is not in the repository.

A person who clones the repo has only what is tracked: a docstring, comment or README that cites a design
note, a spec or a contract kept elsewhere sends them nowhere. Point at docs/api.md, docs/architecture.md,
docs/cli.md, a README, RELIABILITY.md or BENCHMARKS.md instead.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.docs.doctext import ROOT

# Names of documents that lived outside the repository (built from parts so this file does not match).
OUTSIDE = [
    re.compile(r"\b(?:" + "|".join(["CONTR" + "ACT", "DES" + "IGN", "ST" + "YLE"]) + r")\.md\b"),
    re.compile(r"\bCONTR" + r"ACT\b"),
    re.compile(r"shared/" + r"reference|/work/" + r"shared"),
    re.compile(r"(?<![\w.-])reference/[\w.-]+\.(?:md|txt|pdf)\b"),
    re.compile(
        r"\b(?:" + "|".join(["reliability-" + "tests", "serving-" + "anchors", "ssf-" + "paper"]) + r")\b"
    ),
]
MD_NAME = re.compile(r"(?<![\w./-])([\w./-]*[\w-]\.md)\b")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")


def tracked_text_files() -> dict[str, str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an sdist): every file under the root
        paths = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    texts = {}
    for path in paths:
        file = ROOT / path
        if not file.is_file() or file.stat().st_size > 2_000_000:
            continue
        data = file.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[path] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def resolves(target: str, source: str, tracked: set[str]) -> bool:
    """A path named in ``source`` exists relative to that file, to the repo root, or as a tracked basename."""
    target = target.removeprefix("./")
    here = Path(source).parent
    candidates = {(here / target).as_posix(), target.lstrip("/")}
    normalized = {Path(c).resolve().relative_to(ROOT.resolve()).as_posix() for c in candidates if _inside(c)}
    if normalized & tracked or any((ROOT / c).exists() for c in normalized):
        return True
    return "/" not in target and any(t.rsplit("/", 1)[-1] == target for t in tracked)


def _inside(relative: str) -> bool:
    try:
        (ROOT / relative).resolve().relative_to(ROOT.resolve())
    except ValueError:
        return False
    return True


def test_no_file_cites_a_document_outside_the_repository() -> None:
    me = str(Path(__file__).resolve().relative_to(ROOT))
    hits = []
    for path, text in tracked_text_files().items():
        if path == me:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in OUTSIDE:
                match = pattern.search(line)
                if match:
                    hits.append(f"{path}:{number}: {match.group(0)!r}")
    assert not hits, "references to documents that are not in the repository:\n" + "\n".join(hits)


def test_every_markdown_file_named_or_linked_exists() -> None:
    texts = tracked_text_files()
    tracked = set(texts) | {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    missing = []
    for path, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            bare = URL.sub(" ", line)
            names = set(MD_NAME.findall(bare))
            if path.endswith(".md"):
                names |= {t for t in MD_LINK.findall(line) if "://" not in t and not t.startswith("mailto:")}
            missing += [
                f"{path}:{number}: {name}" for name in sorted(names) if not resolves(name, path, tracked)
            ]
    assert not missing, "files name documents or link targets that do not exist:\n" + "\n".join(missing)
