"""Packaging: one version, the license, what the sdist carries, and public signatures mypy can check."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib

import pytest

import sona_shm
from sona_shm.cli import EXIT_OK, main

from support import ROOT, run


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    from sona_shm.native import IMPLEMENTATION

    printed = capsys.readouterr().out
    assert exc.value.code == EXIT_OK and printed == f"sona-shm {sona_shm.__version__} (hot paths in {IMPLEMENTATION})\n"
    assert importlib.metadata.version("sona-shm") == sona_shm.__version__  # the installed metadata comes from it
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]


def test_license_is_an_spdx_expression_with_its_file():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c)")
    assert importlib.metadata.metadata("sona-shm")["License-Expression"] == "MIT"


def test_the_sdist_carries_every_file_the_docs_point_to():
    manifest = (ROOT / "MANIFEST.in").read_text()
    grafted = set(re.findall(r"^graft (\S+)$", manifest, re.M))
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        pointed = set(re.findall(r"`((?:examples|scripts|docs|tests)/[\w./@-]+)", text))
        pointed |= {str((page.parent / link).resolve().relative_to(ROOT)) for link in re.findall(r"\]\(([\w./-]+\.md)\)", text)}
        for path in sorted(pointed):
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} points to {path}, which does not exist"
            assert path.split("/")[0] in grafted or path == "README.md", f"{path} is not in the sdist (MANIFEST.in)"
    assert "include LICENSE" in manifest and "mkdocs.yml" in manifest and (ROOT / "sona_shm" / "py.typed").exists()


def test_public_signatures_are_typed_for_mypy(tmp_path):
    snippet = tmp_path / "use.py"
    snippet.write_text(
        "import numpy as np\n"
        "import sona_shm\n"
        "from sona_shm.stats import read\n"
        "client = sona_shm.attach('x')\n"
        "reveal_type(client.forward(np.zeros(4, np.float32)))\n"
        "reveal_type(client.record(sona_shm.Trajectory(np.zeros(4), [], 1.0)))\n"
        "reveal_type(client.statistics().adapter.up_norm)\n"
        "reveal_type(read('x').rates)\n"
        "reveal_type(sona_shm.open_consumer('x').drain_arrays(3))\n"
    )
    command = [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(ROOT / ".mypy_cache"), str(snippet)]
    done = run(command, timeout=600, cwd=ROOT)
    revealed = re.findall(r'Revealed type is "(.*)"', done.stdout)
    assert len(revealed) == 5, done.stdout + done.stderr
    assert (
        revealed[0].startswith("numpy.ndarray[") and revealed[1] in ("bool", "builtins.bool") and revealed[2] in ("float", "builtins.float")
    )
    assert revealed[3] == "sona_shm.stats.Rates | None" and revealed[4] == "sona_shm.trajectory.TrajectoryBatch"
    assert "error" not in done.stdout, done.stdout
