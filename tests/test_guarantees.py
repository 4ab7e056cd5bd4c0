"""Every guarantee docs/guarantees.md states names its tests: a `guarantee(slug)` marker on at least one test each."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from support import ROOT

TESTS = ROOT / "tests"


def slug(title: str) -> str:
    """``Committed means learned, once.`` -> ``committed-means-learned-once``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


PAGE = ROOT / "docs" / "guarantees.md"


def documented_guarantees() -> list[str]:
    """The slugs of the bold titles of the list on docs/guarantees.md (up to "Not promised")."""
    text = PAGE.read_text()
    section = text.split("# Guarantees\n", 1)[1].split("\nNot promised", 1)[0]
    titles = re.findall(r"^- \*\*(.+?)\*\*", section, re.M)
    assert titles, f"no guarantee found in {PAGE}"
    return [slug(t) for t in titles]


def _mark_slug(node: ast.expr) -> str | None:
    """The slug of ``pytest.mark.guarantee("slug")``, or None for anything else."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "guarantee"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "mark"
    ):
        assert len(node.args) == 1 and isinstance(node.args[0], ast.Constant), ast.unparse(node)
        return str(node.args[0].value)
    return None


def marked_tests() -> dict[str, list[str]]:
    """slug -> the tests carrying it (``file::test``), read from the test files' source."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = str(path.relative_to(ROOT))
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")]
        for node in tree.body:  # pytestmark = pytest.mark.guarantee(...) marks every test of the file
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
                values = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
                for value in values:
                    if (s := _mark_slug(value)) is not None:
                        found[s] += [f"{where}::{t.name}" for t in tests]
        for test in tests:
            for decorator in test.decorator_list:
                if (s := _mark_slug(decorator)) is not None:
                    found[s].append(f"{where}::{test.name}")
    return found


def test_every_documented_guarantee_has_a_test_carrying_its_marker():
    guarantees = documented_guarantees()
    marked = marked_tests()
    assert len(guarantees) == len(set(guarantees)) >= 9
    missing = [g for g in guarantees if not marked.get(g)]
    assert not missing, f"guarantees of docs/guarantees.md with no test marked guarantee(...): {missing}"


def test_every_marker_names_a_documented_guarantee():
    unknown = sorted(set(marked_tests()) - set(documented_guarantees()))
    assert not unknown, f"tests marked with guarantees docs/guarantees.md does not state: {unknown}"


def test_the_checker_reads_both_forms_of_marking(tmp_path):
    assert (
        slug("A killed producer costs at most its one in-flight trajectory.")
        == "a-killed-producer-costs-at-most-its-one-in-flight-trajectory"
    )
    assert (
        "tests/test_bad_input.py::test_record_refuses_malformed_trajectories_and_changes_nothing"
        in marked_tests()["bad-input-changes-nothing"]
    )
    assert "tests/integration/test_faults.py::test_no_lock_outlives_its_holder" in marked_tests()["nothing-waits-forever"]
    assert Path(TESTS / "test_guarantees.py").exists()
