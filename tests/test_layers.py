"""The package's layers, written down once and enforced: every import points down.

A module may import from its own layer or from the layers below it, never from one above
(trio's ``test_exports.py`` checks its layering the same way). The layers, top first:

- the command line (``cli``, ``__main__``, ``demo``);
- integrations: gunicorn, ASGI, Prometheus, the monitor, PEFT export, off-policy evaluation;
- ``fleet/``: many hosts through Redis (a mode of the flusher);
- ``engine/``: the processes over one segment (flusher and its modes, provisioning, client, consumer);
- ``stats``: the read model;
- ``store/``: files (safetensors, checkpoints);
- ``shm/``: the segment's bytes (layout, segment, space, ledger, slots, lanes);
- ``learn/``: the maths (learner, the two rules, route tables, the in-process loop);
- ``native``: the one loader of the C twin;
- the base: errors, argument checks, configuration, the values that cross the API, the CPU check.

``sona_shm/__init__.py`` is the public facade over all of them and is not in a layer (only the
command line imports it, for ``__version__``).
Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sona_shm"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("command line", ("sona_shm.cli", "sona_shm.__main__", "sona_shm.demo")),
    (
        "integrations",
        ("sona_shm.gunicorn", "sona_shm.asgi", "sona_shm.prometheus", "sona_shm.monitor", "sona_shm.export", "sona_shm.evaluate"),
    ),
    ("fleet", ("sona_shm.fleet",)),
    ("engine", ("sona_shm.engine",)),
    ("read model", ("sona_shm.stats",)),
    ("store", ("sona_shm.store",)),
    ("shared memory", ("sona_shm.shm",)),
    ("learning", ("sona_shm.learn",)),
    ("native", ("sona_shm.native", "sona_shm._speedups")),
    (
        "base",
        ("sona_shm.trajectory", "sona_shm.config", "sona_shm.checks", "sona_shm.errors", "sona_shm.machine", "sona_shm.supervise"),
    ),
]


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every sona_shm module ``path`` imports (relative imports resolved; ``from x import y``
    counts ``x.y`` when that is a module of the package, else ``x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("sona_shm")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sona_shm"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                where = PACKAGE.parent / Path(*sub.split("."))
                is_module = any(where.with_suffix(s).exists() for s in (".py", ".pyi")) or (where / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else target))
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_every_import_points_down(path):
    own = layer_of(module_name(path))
    upward = [
        f"line {line}: {target} ({LAYERS[layer_of(target)][0]}) is above {module_name(path)} ({LAYERS[own][0]})"
        for line, target in imports(path)
        if target != "sona_shm" and layer_of(target) < own
    ]
    assert not upward, "\n".join(upward)


def test_every_module_is_in_a_layer_and_only_the_command_line_imports_the_facade():
    for path in SOURCES:
        layer = layer_of(module_name(path))  # KeyError: a module no layer names
        if layer > 0:
            assert "sona_shm" not in [target for _, target in imports(path)], f"{module_name(path)} imports the facade sona_shm"


def test_the_check_sees_an_upward_import(tmp_path):
    """The check can fail: an import of the engine from the learning layer is found and placed."""
    probe = PACKAGE / "learn" / "_probe_for_test_layers.py"
    probe.write_text("from ..engine.flusher import Flusher\n")
    try:
        [(line, target)] = imports(probe)
        assert (line, target) == (1, "sona_shm.engine.flusher") and layer_of(target) < layer_of(module_name(probe))
    finally:
        probe.unlink()
