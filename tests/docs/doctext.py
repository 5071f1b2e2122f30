"""Reading the repository's Markdown docs for the doc tests: sections by heading, table rows, code spans."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

CODE_SPAN = re.compile(r"`([^`\n]+)`")


def read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def sections(text: str, level: int) -> dict[str, str]:
    """Heading text -> body (up to the next heading of the same or a higher level), outside code fences."""
    out: dict[str, str] = {}
    title: str | None = None
    body: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"^(#{1,6}) (.+?)\s*$", line)
        if heading and len(heading.group(1)) <= level:
            if title is not None:
                out[title] = "\n".join(body)
            title = heading.group(2) if len(heading.group(1)) == level else None
            body = []
        elif title is not None:
            body.append(line)
    if title is not None:
        out[title] = "\n".join(body)
    return out


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row (header and separator rows included)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            rows.append([cell.strip() for cell in line[1:-1].split("|")])
    return rows


def code_spans(text: str) -> set[str]:
    return set(CODE_SPAN.findall(text))
