"""The ``sona-shm`` command: exit codes, messages, stats output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sona_shm import Trajectory
from sona_shm.cli import EXIT_FLUSHER_RUNNING, EXIT_NOT_FOUND, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_of_a_missing_engine(capsys, name):
    code, _, err = run(capsys, "stats", "--name", name, "--json")
    assert code == EXIT_NOT_FOUND and f"segment {name!r} does not exist" in err


def test_stats_json_is_the_clients_stats_dict(capsys, engine, name):
    flusher = engine()
    client = engine.attach()
    client.record(Trajectory(np.ones(16), [], 1.0))
    flusher.scan()
    code, out, _ = run(capsys, "stats", "--name", name, "--json")
    printed = json.loads(out)
    direct = client.stats()
    assert code == EXIT_OK
    assert printed.keys() == direct.keys()
    assert printed["trajectories_processed"] == 1 and printed["flusher"]["pid"] == os.getpid()
    assert printed["flusher"]["alive"] is True and printed["lanes"][0]["records"] == 1


def test_stats_table_says_when_no_flusher_runs(capsys, engine, name):
    engine().close()
    code, out, _ = run(capsys, "stats", "--name", name)
    assert code == EXIT_NOT_RUNNING
    assert "NOT RUNNING" in out and "trajectories_processed" in out


def test_destroy_refuses_a_live_engine_unless_forced(capsys, engine, name):
    engine()
    code, _, err = run(capsys, "destroy", "--name", name)
    assert code == EXIT_FLUSHER_RUNNING and "pass --force" in err
    code, out, _ = run(capsys, "destroy", "--name", name, "--force")
    assert code == EXIT_OK and f"/sona_shm.{name}" in out
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")
    code, _, err = run(capsys, "destroy", "--name", name)
    assert code == EXIT_NOT_FOUND


def test_create_then_create_again(capsys, name):
    assert run(capsys, "create", "--name", name, "--hidden-dim", "8", "--lanes", "2")[0] == EXIT_OK
    code, out, _ = run(capsys, "create", "--name", name)
    assert code == EXIT_OK and "already exists" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["flusher", "--name", "x", "--rank", "3"], "rank: expected 1 or 2, got 3"),
        (["flusher", "--name", "x", "--flush-interval", "-1"], "--flush-interval: expected seconds >= 0"),
        (["stats", "--name", "a/b"], "name: expected 1-64 characters"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USAGE and fragment in err
