"""The docs' generated reference parts (scripts/docs_reference.py, the mkdocs hook) are made from the code, whole.

``mkdocs build --strict`` (.ci/run) builds the site; these tests check the parts without
mkdocs: every part a page asks for exists, and each covers everything the code declares.
"""

from __future__ import annotations

import argparse
import re

import pytest

from sona_shm import errors
from sona_shm.cli import build_parser
from sona_shm.config import EngineConfig
from sona_shm.prometheus import families

import docs_reference
from support import ROOT

PAGES = sorted((ROOT / "docs").rglob("*.md"))


def test_every_part_a_page_asks_for_is_made():
    asked = {m for page in PAGES for m in docs_reference.GENERATED.findall(page.read_text())}
    assert asked == set(docs_reference.PARTS)  # each part is used, and none is missing
    for page in PAGES:
        expanded = docs_reference.expand(page.read_text())
        assert "<!-- generated:" not in expanded, page


def test_an_unknown_part_is_refused():
    with pytest.raises(KeyError, match="no such part"):
        docs_reference.expand("<!-- generated: nonsense -->\n")


def test_sphinx_roles_render_as_code():
    html = "Raises :class:<code>~sona_shm.errors.NoFreeLaneError</code>; see :meth:<code>Client.forward</code>."
    assert docs_reference.plain_roles(html) == "Raises <code>NoFreeLaneError</code>; see <code>Client.forward</code>."


def test_the_cli_part_has_every_command_and_option():
    text = docs_reference.cli()
    parser = build_parser()
    for name, sub in docs_reference._subparsers(parser):
        assert f"\n### sona-shm {name}\n" in text
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.option_strings[-1] in text, (name, action.option_strings)


def test_the_exit_codes_part_has_every_constant():
    text = docs_reference.exit_codes()
    constants = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert len(constants) >= 11
    for name, value in constants.items():
        assert f"| {value} | `{name}` |" in text


def test_the_config_part_has_every_field_and_default():
    text = docs_reference.config()
    for field in EngineConfig.__dataclass_fields__:
        assert f"| `{field}` |" in text
    assert "reference: 0.002, routing: 0.03" in text  # lr: the default depends on the rule
    assert "| `capacity` | `--capacity` | reference: 10000, routing: 0 |" in text  # and so do the sizes


def test_the_cli_part_does_not_depend_on_the_environment(monkeypatch):
    monkeypatch.setenv("SONA_SHM_NAME", "someones-engine")  # --name's default, shown in its help
    assert "someones-engine" not in docs_reference.cli()


def test_the_metrics_part_has_every_series():
    text = docs_reference.metrics()
    for family in families([]):
        name = family.name + ("_total" if family.type == "counter" else "")
        assert re.search(rf"^\| `{name}` \| {family.type} \|", text, re.M), name
