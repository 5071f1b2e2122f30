"""docs/api.md against the app itself: every route (OpenAPI schema and route table), every status code the
schema declares, every field of every schema, and every error code string the product can send.

The schema comes from ``create_app(settings).openapi()``: no engine is built (the lifespan never runs), so
this is cheap and needs no backbone. Error codes are found by reading the product's source (``service/``
and ``ssf/``) rather than from a list kept here, so a new code fails this test until it is documented.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.routing import BaseRoute, Route

from service.api.app import create_app
from service.settings import Settings
from tests.docs.doctext import ROOT, code_spans, read, sections, table_rows

DOC = "docs/api.md"
HEADING = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) (/\S*)$")


@cache
def apps() -> list[FastAPI]:
    """Predict declares auth only when client tokens are configured: build both variants."""
    return [
        create_app(Settings(model="test_vit")),
        create_app(Settings(model="test_vit", admin_token="t" * 16, client_tokens="client-token")),
    ]


@cache
def schema_operations() -> dict[tuple[str, str], dict[str, Any]]:
    ops: dict[tuple[str, str], dict[str, Any]] = {}
    for app in apps():
        for path, methods in app.openapi()["paths"].items():
            for method, op in methods.items():
                known = ops.setdefault((method.upper(), path), {"responses": {}, "parameters": {}, "op": op})
                known["responses"].update(op.get("responses", {}))
    return ops


def flatten(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, through included routers (newer FastAPI keeps them as one entry)."""
    for route in routes:
        if isinstance(route, Route):  # APIRoute is a Route
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield method, prefix + route.path
        elif hasattr(route, "original_router"):
            context = getattr(route, "include_context", None)
            yield from flatten(route.original_router.routes, prefix + (getattr(context, "prefix", "") or ""))


@cache
def route_table() -> set[tuple[str, str]]:
    return {pair for app in apps() for pair in flatten(app.routes)}


def documented_routes() -> dict[tuple[str, str], str]:
    out = {}
    for title, body in sections(sections(read(DOC), 2)["Routes"], 3).items():
        match = HEADING.match(title)
        assert match, f"{DOC}: a heading under 'Routes' must be 'METHOD /path', not {title!r}"
        out[(match.group(1), match.group(2))] = body
    return out


def documented_statuses(body: str) -> set[str]:
    return {row[0] for row in table_rows(body) if re.fullmatch(r"\d{3}", row[0])}


def test_every_schema_route_is_documented_and_every_documented_route_exists() -> None:
    docs = documented_routes()
    ops, table = schema_operations(), route_table()
    missing = sorted(set(ops) - set(docs))
    assert not missing, f"schema routes without a '### METHOD /path' section in {DOC}: {missing}"
    absent = sorted(set(docs) - table)
    assert not absent, f"{DOC} documents routes the app does not have: {absent}"
    text = read(DOC)
    hidden = sorted((m, p) for m, p in table - set(docs) if f"`{m} {p}`" not in text)
    assert not hidden, f"routes in the app's route table that {DOC} never names (as `METHOD /path`): {hidden}"


@pytest.mark.parametrize("key", sorted(schema_operations()), ids=lambda k: f"{k[0]} {k[1]}")
def test_every_status_code_and_field_of_a_route_is_documented(key: tuple[str, str]) -> None:
    body = documented_routes().get(key)
    if body is None:
        pytest.fail(f"{key[0]} {key[1]} has no section in {DOC}")
    op = schema_operations()[key]
    undocumented = sorted(set(op["responses"]) - documented_statuses(body))
    assert not undocumented, f"{key[0]} {key[1]}: schema status codes not in its table: {undocumented}"

    spans = code_spans(body)
    fields = [p["name"] for p in op["op"].get("parameters", [])]
    for content in op["op"].get("requestBody", {}).get("content", {}).values():
        fields += list(content.get("schema", {}).get("properties", {}))
    missing = sorted({f for f in fields if f not in spans})
    assert not missing, f"{key[0]} {key[1]}: request fields not named (in backticks): {missing}"

    for status, response in op["responses"].items():
        if not status.startswith("2"):
            continue
        for content in response.get("content", {}).values():
            ref = content.get("schema", {}).get("$ref", "")
            model = ref.rsplit("/", 1)[-1]
            if model:
                assert re.search(rf"\b{model}\b", body), f"{key[0]} {key[1]}: {model} not named"


@cache
def component_schemas() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for app in apps():
        out.update(app.openapi().get("components", {}).get("schemas", {}))
    return out


def test_every_schema_field_is_documented() -> None:
    documented = sections(sections(read(DOC), 2)["Schemas"], 3)
    for name, schema in component_schemas().items():
        assert name in documented, f"schema {name} has no '### {name}' section under 'Schemas' in {DOC}"
        rows = {row[0].strip("`") for row in table_rows(documented[name])}
        missing = sorted(set(schema.get("properties", {})) - rows)
        assert not missing, f"{DOC} '### {name}': fields without a row: {missing}"
        extra = sorted(rows - set(schema.get("properties", {})) - {"field", "---"})
        assert not extra, f"{DOC} '### {name}': rows for fields the schema does not have: {extra}"


# --------------------------------------------------------------------------------- error codes
CALLS_WITH_CODE_SECOND = {"ApiError", "error_response"}  # (status, code, message)
CALLS_WITH_CODE_FIRST = {"DeltaError"}  # (code, message)


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _strings(node: ast.expr | None) -> Iterator[str]:
    """String constants of an expression that is a constant or a conditional between constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from _strings(node.body)
        yield from _strings(node.orelse)


def codes_in_source(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in CALLS_WITH_CODE_SECOND and len(node.args) > 1:
                yield from _strings(node.args[1])
            if name in CALLS_WITH_CODE_FIRST and node.args:
                yield from _strings(node.args[0])
            if name == "get" and _name(getattr(node.func, "value", None) or node.func).endswith("CODES"):
                yield from (s for a in node.args[1:] for s in _strings(a))  # CODES.get(key, "default")
            for keyword in node.keywords:
                if keyword.arg == "code":
                    yield from _strings(keyword.value)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [_name(t) for t in targets]
            if any(n.endswith("CODES") for n in names) and isinstance(node.value, ast.Dict):
                yield from (s for v in node.value.values for s in _strings(v))
            # class SomeError: code = "..."; and code = "a" if ... else "b"
            if any(n in ("code", "default") for n in names):
                yield from _strings(node.value)


@cache
def product_error_codes() -> dict[str, str]:
    """Every error code string in the product source -> the first file that has it."""
    found: dict[str, str] = {}
    for package in ("service", "ssf"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for code in codes_in_source(tree):
                if re.fullmatch(r"[a-z][a-z0-9_]*", code):
                    found.setdefault(code, str(path.relative_to(ROOT)))
    return found


def documented_error_codes() -> set[str]:
    rows = table_rows(sections(read(DOC), 2)["Error codes"])
    return {row[0].strip("`") for row in rows if row[0].startswith("`")}


def test_the_error_code_scan_finds_the_known_kinds() -> None:
    """Guards the scanner itself: one code of each way the product defines them."""
    found = product_error_codes()
    kinds = ("invalid_token", "client_disconnected", "task_not_found", "overloaded", "fingerprint_mismatch")
    for code in kinds:
        assert code in found, f"the source scan no longer finds {code!r}: update codes_in_source"


def test_every_error_code_is_documented() -> None:
    found, documented = product_error_codes(), documented_error_codes()
    missing = sorted(f"{code} ({where})" for code, where in found.items() if code not in documented)
    assert not missing, f"error codes the product can send, missing from {DOC} 'Error codes': {missing}"
    stale = sorted(documented - set(found))
    assert not stale, f"{DOC} documents error codes the product no longer has: {stale}"


def test_every_error_code_named_in_a_route_is_in_the_error_table() -> None:
    routes = sections(read(DOC), 2)["Routes"]
    documented = documented_error_codes()
    named = {span for row in table_rows(routes) for span in code_spans(row[1] if len(row) > 1 else "")}
    unknown = sorted(named - documented)
    assert not unknown, f"route tables in {DOC} name codes missing from its 'Error codes' table: {unknown}"


def test_no_route_schema_or_error_code_is_documented_twice() -> None:
    """Two sections of one heading would hide each other from the checks above (the later one wins)."""
    text, fenced, headings = read(DOC), False, []
    for line in text.splitlines():
        fenced = fenced != line.lstrip().startswith("```")
        if not fenced and re.match(r"^#{2,3} ", line):
            headings.append(line)
    twice = sorted({h for h in headings if headings.count(h) > 1})
    assert not twice, f"{DOC} has these headings more than once: {twice}"
    rows = [row[0] for row in table_rows(sections(text, 2)["Error codes"]) if row[0].startswith("`")]
    again = sorted({code for code in rows if rows.count(code) > 1})
    assert not again, f"{DOC} lists these error codes more than once: {again}"
