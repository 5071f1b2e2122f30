"""docs/cli.md against the parsers: every console script of pyproject.toml has a section, every flag of its
argparse parser is in that section and every flag the section names exists; every ``SSF_*`` setting of
``ssf-serve`` (read from the settings class at test time) has a row, and no row names a setting that is gone.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import tomllib

import pytest
from pydantic import BaseModel

from tests.docs.doctext import ROOT, read, sections, table_rows

DOC = "docs/cli.md"
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def console_scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


def help_text(entry: str) -> str:
    """What ``SCRIPT --help`` prints: the entry point run with ``--help`` (argparse prints and exits 0)."""
    module, _, function = entry.partition(":")
    main = getattr(importlib.import_module(module), function)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code in (0, None), f"{entry} --help exited {exited.value.code}"
    return out.getvalue()


def parser_flags(help_text: str) -> set[str]:
    """Options of the usage and options list, and the names of positional arguments (as PACKAGE etc.)."""
    flags = set(FLAG.findall(help_text.split("\n\n", 1)[0]))  # the usage block
    for line in help_text.splitlines():
        match = re.match(r"^  (-[-\w]+(?:[ ,][^ ].*)?)", line)
        if match:
            flags |= set(FLAG.findall(line.split("  ", 2)[1]))
    return flags


def positionals(help_text: str) -> set[str]:
    block = help_text.split("positional arguments:", 1)
    if len(block) == 1:
        return set()
    names = set()
    for line in block[1].split("\n\n", 1)[0].splitlines():
        match = re.match(r"^  ([a-z][\w-]*)", line)
        if match:
            names.add(match.group(1))
    return names


def doc_flags(section: str, script: str) -> set[str]:
    """Flags in the first column of the section's tables and in its command lines (usage and examples, with
    their continuation lines); prose may name other commands' flags."""
    flags = {f for row in table_rows(section) for f in FLAG.findall(row[0])}
    fenced, continued = False, False
    for line in section.splitlines():
        if line.startswith("```"):
            fenced, continued = not fenced, False
            continue
        if fenced and (line.startswith(script + " ") or (continued and line.startswith(" "))):
            flags |= set(FLAG.findall(line.split("#", 1)[0]))
            continued = True
        else:
            continued = False
    return flags - {"-"}


@pytest.mark.parametrize(("script", "entry"), sorted(console_scripts().items()))
def test_every_flag_is_documented_and_every_documented_flag_exists(script: str, entry: str) -> None:
    documented = sections(read(DOC), 2)
    assert script in documented, f"{DOC} has no '## {script}' section"
    text = help_text(entry)
    in_parser, in_doc = parser_flags(text), doc_flags(documented[script], script)
    missing = sorted(in_parser - in_doc)
    assert not missing, f"{script}: flags of the parser missing from {DOC}: {missing}"
    extra = sorted(in_doc - in_parser)
    assert not extra, f"{script}: {DOC} names flags the parser does not have: {extra}"
    unnamed = sorted(p for p in positionals(text) if f"`{p.upper()}`" not in documented[script])
    assert not unnamed, f"{script}: positional arguments without a `NAME` row in {DOC}: {unnamed}"


def env_settings() -> set[str]:
    """``SSF_*`` names of every field of the service settings class, as pydantic-settings reads them."""
    from service.settings import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    delimiter = Settings.model_config.get("env_nested_delimiter") or "__"
    names: set[str] = set()

    def walk(model: type[BaseModel], stem: str) -> None:
        for name, field in model.model_fields.items():
            alias = field.validation_alias if isinstance(field.validation_alias, str) else None
            env = alias or f"{stem}{name}"
            nested = field.annotation
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                walk(nested, f"{env}{delimiter}")
            else:
                names.add(env.upper())

    walk(Settings, prefix)
    return names


def test_every_setting_is_documented() -> None:
    settings = env_settings()
    assert "SSF_ADMIN_TOKEN" in settings and "SSF_MODEL" in settings, settings  # the derivation still works
    text = read(DOC)
    missing = sorted(name for name in settings if f"`{name}`" not in text)
    assert not missing, f"SSF_* settings of service/settings.py missing from {DOC}: {missing}"
    table = sections(sections(text, 2)["ssf-serve"], 3)["Environment settings"]
    rows = {row[0].strip("`") for row in table_rows(table) if row[0].startswith("`SSF_")}
    stale = sorted(rows - settings)
    assert not stale, f"{DOC} documents settings service/settings.py no longer has: {stale}"


def test_every_console_script_is_in_the_command_table() -> None:
    table = table_rows(read(DOC).split("\n## ", 1)[0])
    listed = {row[0].strip("`") for row in table}
    missing = sorted(set(console_scripts()) - listed)
    assert not missing, f"console scripts missing from the table at the top of {DOC}: {missing}"
