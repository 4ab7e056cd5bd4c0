#!/usr/bin/env python3
"""The reference pages' generated parts, made from the code at build time (a mkdocs hook).

A page asks for a part with an HTML comment on a line of its own, ``<!-- generated: NAME -->``;
``mkdocs build`` (``hooks:`` in mkdocs.yml) replaces it with the Markdown below, so the
reference cannot drift from what the code declares:

- ``cli``: every ``sona-shm`` subcommand's ``--help``, from :func:`sona_shm.cli.build_parser`;
- ``exit-codes``: the ``EXIT_*`` constants of ``sona_shm/errors.py`` and the comment beside each;
- ``config``: the fields of :class:`sona_shm.config.EngineConfig`, their defaults (by rule where
  they depend on it) and the command-line option that sets each (``sona_shm.cli._CONFIG_OPTIONS``);
- ``metrics``: every Prometheus family :func:`sona_shm.prometheus.families` makes, with its
  type, labels and help.

``python scripts/docs_reference.py NAME`` prints one part (to read it without building the site).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

GENERATED = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)


def _cell(text: str) -> str:
    """Text fit for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command, parser)`` for every subcommand under ``parser``, depth first (``fleet hosts`` after ``fleet``)."""
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((name, sub))
                found += [(f"{name} {deeper}", p) for deeper, p in _subparsers(sub)]
    return found


def cli() -> str:
    from sona_shm.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal's width: the same page on every machine
    name = os.environ.pop("SONA_SHM_NAME", None)  # --name's help shows its value: the page shows it unset
    try:
        parser = build_parser()
    finally:
        if name is not None:
            os.environ["SONA_SHM_NAME"] = name
    helps: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    out = ["| command | does |", "|---|---|"]
    out += [f"| [`sona-shm {name}`](#sona-shm-{name}) | {_cell(helps.get(name, ''))} |" for name in helps]
    out += ["", "```text", parser.format_help().rstrip(), "```"]
    for name, sub in _subparsers(parser):
        out += ["", f"### sona-shm {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(out)


def exit_codes() -> str:
    from sona_shm import errors

    source = inspect.getsource(errors)
    rows = re.findall(r"^(EXIT_[A-Z_]+) = (\d+)(?:  # (.*))?$", source, re.M)
    if not rows:
        raise RuntimeError("no EXIT_* constant found in sona_shm/errors.py")
    out = ["| code | constant (`sona_shm.cli`) | means |", "|---|---|---|"]
    out += [f"| {code} | `{name}` | {_cell(comment or 'success')} |" for name, code, comment in rows]
    return "\n".join(out)


def config() -> str:
    from sona_shm.cli import _CONFIG_OPTIONS
    from sona_shm.config import DEFAULT_LR, RULE_SIZES, EngineConfig

    flags = {dest: (flag, text) for flag, dest, _, text in _CONFIG_OPTIONS}
    out = ["| field (`EngineConfig`) | option (`flusher`, `create`) | default | means |", "|---|---|---|---|"]
    for field in dataclasses.fields(EngineConfig):
        default: Any = field.default
        if field.name == "lr":
            default = ", ".join(f"{rule}: {lr:g}" for rule, lr in DEFAULT_LR.items())
        elif all(field.name in sizes for sizes in RULE_SIZES.values()):  # capacity, max_steps, ...: by rule too
            default = ", ".join(f"{rule}: {sizes[field.name]}" for rule, sizes in RULE_SIZES.items())
        elif field.name == "routes":
            flag, text = "--routes FILE", "the route table's size, set by the table (--routes FILE; needed by --rule routing)"
            out.append(f"| `{field.name}` | `{flag}` | {default} (none) | {_cell(text)} |")
            continue
        flag, text = flags.get(field.name, ("", ""))
        out.append(f"| `{field.name}` | `{flag}` | {default} | {_cell(text)} |")
    return "\n".join(out)


def metrics() -> str:
    from sona_shm.prometheus import families

    out = ["| series | type | labels | help |", "|---|---|---|---|"]
    for family in families([]):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in getattr(family, "_labelnames", ()))
        out.append(f"| `{name}` | {family.type} | {labels} | {_cell(family.documentation)} |")
    return "\n".join(out)


PARTS: dict[str, Callable[[], str]] = {"cli": cli, "exit-codes": exit_codes, "config": config, "metrics": metrics}


def expand(markdown: str) -> str:
    """``markdown`` with every ``<!-- generated: NAME -->`` line replaced by its part (an unknown NAME raises)."""

    def part(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in PARTS:
            raise KeyError(f"<!-- generated: {name} -->: no such part; expected one of {', '.join(PARTS)}")
        return PARTS[name]()

    return GENERATED.sub(part, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """The mkdocs hook (``hooks:`` in mkdocs.yml): the generated parts."""
    return expand(markdown)


#: A Sphinx role as it comes out of a docstring rendered as Markdown: ``:class:`~a.b.C` `` -> ``:class:<code>~a.b.C</code>``.
SPHINX_ROLE = re.compile(r":(?:class|meth|func|data|mod|attr|exc|obj):<code>(~?)([^<]*)</code>")


def plain_roles(html: str) -> str:
    """The docstrings' Sphinx roles as plain code (``~a.b.C`` shows ``C``, as Sphinx shows it)."""
    return SPHINX_ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)


def on_page_content(html: str, **_: Any) -> str:
    """The mkdocs hook for the rendered page: the Python API's docstrings without raw Sphinx roles."""
    return plain_roles(html)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PARTS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(PARTS)}}}")
    print(PARTS[sys.argv[1]]())
