"""The ``sona-shm`` command: exit codes, messages, stats output."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from sona_shm import Trajectory, open_consumer
from sona_shm.cli import EXIT_ERROR, EXIT_FLUSHER_RUNNING, EXIT_NOT_FOUND, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, main


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
        (["flusher", "--name", "x", "--flush-interval", "-1"], "--flush-interval: expected a finite number of seconds >= 0, got -1.0"),
        (["flusher", "--name", "x", "--flush-interval", "nan"], "--flush-interval: expected a finite number of seconds >= 0, got nan"),
        (["flusher", "--name", "x", "--flush-interval", "inf"], "--flush-interval: expected a finite number of seconds >= 0, got inf"),
        (["stats", "--name", "a/b"], "name: expected 1-64 characters"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USAGE and fragment in err


def test_drain_writes_an_npz_and_says_how_many(capsys, engine, name, tmp_path):
    flusher = engine()
    client = engine.attach()
    for i in range(5):
        client.record(Trajectory(np.full(16, i, np.float32), [], 1.0, route=f"r{i}"))
    flusher.scan()
    out = tmp_path / "batch.npz"
    code, printed, _ = run(capsys, "drain", "--name", name, "--out", str(out), "--max", "3")
    assert code == EXIT_OK and f"drained 3 trajectories from {name!r} into {out}" in printed
    with np.load(out) as data:
        assert data["route"].tolist() == ["r0", "r1", "r2"] and data["query"][:, 0].tolist() == [0, 1, 2]
    code, printed, _ = run(capsys, "drain", "--name", name, "--out", str(tmp_path / "rest.npz"))
    assert code == EXIT_OK and "drained 2 trajectories" in printed
    assert client.stats()["buffer"]["drained"] == 5


def test_drain_refusals_and_their_exit_codes(capsys, engine, name, tmp_path):
    out = str(tmp_path / "x.npz")
    code, _, err = run(capsys, "drain", "--name", name, "--out", out)
    assert code == EXIT_NOT_FOUND and "does not exist" in err
    engine()
    code, _, err = run(capsys, "drain", "--name", name, "--out", out, "--max", "-1")
    assert code == EXIT_USAGE and "--max: expected N >= 0, got -1" in err
    code, _, err = run(capsys, "drain", "--name", name, "--out", str(tmp_path))
    assert code == EXIT_USAGE and "exists" in err
    consumer = open_consumer(name)
    try:
        with consumer.draining():
            code, _, err = run(capsys, "drain", "--name", name, "--out", out, "--timeout", "0")
    finally:
        consumer.close()
    assert code == EXIT_ERROR and "drain lock stayed held" in err
    assert not os.path.exists(out)


@pytest.mark.guarantee("committed-means-learned-once")
def test_sigterm_right_after_the_flusher_took_its_lock_is_a_clean_stop(children, name):
    """A supervisor sees a live flusher once the lock is taken; a SIGTERM from then on must mean exit 0."""
    from sona_shm.engine import provision as flusher_module

    from children import fork_child

    def flusher_signalled_at_the_lock() -> None:
        real = flusher_module._create_or_adopt

        def create_or_adopt(*args, **kwargs):
            taken = real(*args, **kwargs)  # the flusher lock is held from here on
            os.kill(os.getpid(), signal.SIGTERM)
            return taken

        flusher_module._create_or_adopt = create_or_adopt
        code = main(["flusher", "--name", name, "--quiet", "--hidden-dim", "8", "--lanes", "2", "--lane-slots", "8", "--capacity", "8"])
        os._exit(code)

    pid = children.add(fork_child(flusher_signalled_at_the_lock, deadline=120))
    assert children.wait(pid) == EXIT_OK


def test_a_refused_flusher_leaves_the_callers_signal_handlers_as_they_were(capsys, name):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert run(capsys, "flusher", "--name", name, "--rank", "3")[0] == EXIT_USAGE
    assert run(capsys, "flusher", "--name", name, "--capacity", str(2**31 - 1), "--lanes", "4096")[0] == EXIT_ERROR  # no room
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_corrupt_or_foreign_routes_file_is_a_clear_error(capsys, name, tmp_path):
    """A truncated .npz (BadZipFile) or a Python file given as --routes: exit 2 naming the file, no traceback."""
    good = tmp_path / "routes.npz"
    np.savez(good, vectors=np.eye(3, 8, dtype=np.float32))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    script = tmp_path / "routes.py"
    script.write_text("routes = [[1, 0], [0, 1]]\n")
    for path in (truncated, script):
        for command in ("create", "flusher"):
            code, _, err = run(capsys, command, "--name", name, "--rule", "routing", "--routes", str(path))
            assert code == EXIT_USAGE and f"routes file {path}: expected a .npy" in err and "Traceback" not in err
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["demo", "--producers", "100000"], "--producers: expected an integer in [1, 31], got 100000"),
        (["demo", "--producers", "0"], "--producers: expected an integer in [1, 31], got 0"),
        (["demo", "--trajectories", "-5"], "--trajectories: expected an integer in [1, 10000000], got -5"),
    ],
)
def test_demo_counts_are_bounded(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USAGE and fragment in err


def test_drain_into_a_file_system_that_refuses_it_is_a_clear_error_and_drains_nothing(capsys, engine, name):
    flusher = engine(capacity=8)
    client = engine.attach()
    client.record(Trajectory(np.ones(16, np.float32), [], 1.0))
    flusher.scan()
    code, _, err = run(capsys, "drain", "--name", name, "--out", "/proc/sona-shm-drain.npz")
    assert code == EXIT_ERROR and "out: cannot write '/proc/sona-shm-drain.npz'" in err and "nothing was drained" in err
    assert "Traceback" not in err and client.buffer_stats()[0] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_drain_onto_a_full_disk_is_a_clear_error_and_drains_nothing(engine, name, tmp_path):
    """A real full file system (a 64 KiB tmpfs in a private mount namespace): exit 1, and the trajectories stay."""
    from support import python_cmd
    from support import run as run_cmd

    flusher = engine(capacity=64, max_steps=1)
    client = engine.attach()
    for _ in range(32):
        client.record(Trajectory(np.ones(16, np.float32), [], 1.0))
    flusher.scan()
    mount = tmp_path / "full"
    mount.mkdir()
    script = f"mount -t tmpfs -o size=64k tmpfs {mount} && dd if=/dev/zero of={mount}/filler bs=4k count=16 2>/dev/null; " + " ".join(
        python_cmd("-m", "sona_shm", "drain", "--name", name, "--out", f"{mount}/out.npz")
    )
    done = run_cmd(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], timeout=120)
    assert done.returncode == EXIT_ERROR, (done.returncode, done.stderr)
    assert "No space left on device" in done.stderr and "nothing was drained" in done.stderr and "Traceback" not in done.stderr
    assert client.buffer_stats()[0] == 32  # still in the buffer


def test_sigint_while_the_command_starts_is_a_quiet_exit(children, name):
    """Ctrl-C while sona-shm imports what it needs (SONA_SHM_TEST_PAUSE=start stops it right there): exit 130, no
    traceback; later the flusher's own handling takes over (a test above). (An interrupt before any code of
    sona_shm runs, while the interpreter itself starts, is the interpreter's.)"""
    import subprocess

    from support import env, popen, python_cmd

    command = python_cmd("-m", "sona_shm", "flusher", "--name", name, "--hidden-dim", "8", "--lanes", "2", "--capacity", "8")
    proc = popen(command, deadline=120, env={**env(), "SONA_SHM_TEST_PAUSE": "start"}, stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # stopped itself where the start is interrupted
    assert os.WIFSTOPPED(status), status
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "", (proc.returncode, err)
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")


# ----------------------------------------------------------------- routes build, defaults by rule


def write_lines(path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_routes_build_averages_the_examples_of_each_name_as_from_examples(capsys, tmp_path):
    from sona_shm import RouteTable
    from sona_shm.learn.routes import load_routes

    rows = [
        {"name": "billing", "embedding": [1.0, 0.0, 0.0, 2.0], "text": "my invoice"},
        {"name": "tech", "embedding": [0.0, 3.0, 0.0, 0.0]},
        {"name": "billing", "embedding": [2.0, 0.0, 0.5, 0.0]},
        {"name": "sales", "embedding": [0.0, 0.0, 1.0, 0.0]},
    ]
    source = write_lines(tmp_path / "examples.jsonl", *rows[:2], "", *rows[2:])  # a blank line is skipped
    out = str(tmp_path / "routes.npz")
    code, printed, _ = run(capsys, "routes", "build", "--in", source, "--out", out)
    assert code == EXIT_OK and "3 routes of hidden_dim 4 from 4 examples (billing, tech, sales)" in printed
    built = load_routes(out)
    expected = RouteTable.from_examples(
        {"billing": [rows[0]["embedding"], rows[2]["embedding"]], "tech": [rows[1]["embedding"]], "sales": [rows[3]["embedding"]]}
    )
    assert built.names == ("billing", "tech", "sales") and np.array_equal(built.vectors, expected.vectors)
    code, _, err = run(capsys, "routes", "build", "--in", source, "--out", out)
    assert code == EXIT_USAGE and "exists" in err  # never replaces a table


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"name": "a", "embedding": [1, 0]}', "not json"], "line 2: expected one JSON object, got invalid JSON"),
        (['{"name": "a", "embedding": [1, 0]}', "[1, 2]"], "line 2: expected a JSON object with 'name' and 'embedding', got list"),
        (['{"embedding": [1, 0]}'], "line 1: field 'name': expected the route's name (a non-empty string), got None"),
        (['{"name": "a", "embedding": [1, 0]}', '{"name": "b", "vector": [1, 0]}'], "line 2: field 'embedding': expected a list"),
        (['{"name": "a", "embedding": [1, "x"]}'], "line 1: field 'embedding': expected a list of numbers"),
        (
            ['{"name": "a", "embedding": [1, 0]}', '{"name": "b", "embedding": [1, 0, 0]}'],
            "line 2: field 'embedding': expected 2 numbers (as on line 1), got 3",
        ),
        (['{"name": "a", "embedding": [0, 0]}'], "line 1: field 'embedding': expected a non-zero vector"),
        (['{"name": "a", "embedding": [1, 0]}'], "expected 2 to 256 route vectors, got 1"),
        ([""], "got none"),
    ],
)
def test_routes_build_names_the_line_and_field_that_is_wrong(capsys, tmp_path, lines, fragment):
    source = write_lines(tmp_path / "examples.jsonl", *lines)
    code, _, err = run(capsys, "routes", "build", "--in", source, "--out", str(tmp_path / "routes.npz"))
    assert code == EXIT_USAGE and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "routes.npz").exists()


def test_a_file_that_is_not_a_routes_file_gets_no_pickle_advice(capsys, name, tmp_path):
    for path, hint in ((tmp_path / "router.py", ""), (tmp_path / "examples.jsonl", "build the table from them")):
        path.write_text('{"name": "a", "embedding": [1, 0]}\n')
        code, _, err = run(capsys, "create", "--name", name, "--rule", "routing", "--routes", str(path))
        assert code == EXIT_USAGE and "allow_pickle" not in err and "pickle" not in err, err
        assert f"routes file {path}: expected a .npy (K x h array) or .npz (vectors, names) file, got a file that is neither" in err
        assert "sona-shm routes build --in" in err and hint in err


def test_a_routing_engine_is_sized_for_feedback_and_the_reference_keeps_its_sizes(capsys, name, tmp_path):
    from sona_shm.config import EngineConfig
    from sona_shm.stats import read

    reference = EngineConfig()
    assert (reference.capacity, reference.max_steps, reference.attention_dim, reference.lane_slots, reference.lr) == (
        10_000,
        8,
        64,
        512,
        0.002,
    )
    routes = tmp_path / "routes.npz"
    np.savez(routes, vectors=np.eye(4, 384, dtype=np.float32))
    try:
        assert run(capsys, "create", "--name", name, "--rule", "routing", "--routes", str(routes))[0] == EXIT_OK
        config = read(name).config
        assert (config.capacity, config.max_steps, config.attention_dim, config.lane_slots, config.hidden_dim) == (0, 1, 0, 256, 384)
        assert config.segment_bytes < 30 * 2**20  # 412 MiB with the reference rule's sizes (issue 20)
    finally:
        run(capsys, "destroy", "--name", name)
    as_given = EngineConfig(rule="routing", routes=2, capacity=100, max_steps=2)  # given sizes win
    assert (as_given.capacity, as_given.max_steps, as_given.attention_dim) == (100, 2, 0)


def test_the_flusher_says_its_configuration_size_and_implementation_at_creation(engine, caplog):
    import logging

    from sona_shm import RouteTable
    from sona_shm.native import IMPLEMENTATION

    with caplog.at_level(logging.INFO, logger="sona_shm.flusher"):
        engine(routes=RouteTable.build(np.eye(3, 16, dtype=np.float32)), rule="routing")
    first = caplog.records[0].getMessage()
    assert "created segment" in first and "routing rule, hidden_dim 16" in first and "3 routes" in first
    assert "max_steps 4, attention_dim 8, capacity 64, 4 lanes x 32 lane_slots" in first  # the test's sizes (conftest SMALL)
    assert "MiB reserved" in first and f"hot paths in {IMPLEMENTATION}" in first


# ----------------------------------------------------------------- help, defaults from the environment


def all_parsers():
    """Every (sub)command's parser, by its prog."""
    import argparse

    from sona_shm.cli import build_parser

    found, todo = {}, [build_parser()]
    while todo:
        parser = todo.pop()
        found[parser.prog] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    return found


def test_every_subcommand_has_a_description_an_example_and_help_for_its_options():
    import argparse

    parsers = all_parsers()
    assert {"sona-shm routes build", "sona-shm drain", "sona-shm fleet hosts", "sona-shm routes retire"} <= set(parsers)
    for prog, parser in parsers.items():
        text = parser.format_help()
        assert parser.description and "examples:\n  sona-shm " in text, prog
        assert "``" not in text and ":class:" not in text and ":func:" not in text and ":data:" not in text, (prog, text)
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, (prog, action.option_strings or action.dest)


def test_lr_help_shows_the_default_of_each_rule():
    from sona_shm.config import DEFAULT_LR

    text = " ".join(all_parsers()["sona-shm flusher"].format_help().split())
    assert f"reference {DEFAULT_LR['reference']:g}; routing {DEFAULT_LR['routing']:g}" in text
    assert "capacity" in text and "routing 0" in text  # the sizes by rule too


def test_version_says_what_the_hot_paths_run_on(capsys):
    from sona_shm.native import IMPLEMENTATION

    with pytest.raises(SystemExit):
        main(["--version"])
    assert f"(hot paths in {IMPLEMENTATION})" in capsys.readouterr().out


def test_sona_shm_name_is_the_default_of_name(capsys, engine, name, monkeypatch):
    engine()
    monkeypatch.setenv("SONA_SHM_NAME", name)
    code, out, _ = run(capsys, "stats", "--json")
    assert code == EXIT_OK and json.loads(out)["name"] == name
    code, out, _ = run(capsys, "routes", "list")
    assert code == EXIT_OK and "has no route table" in out
    monkeypatch.delenv("SONA_SHM_NAME")
    with pytest.raises(SystemExit):
        main(["stats", "--json"])
    assert "--name" in capsys.readouterr().err


def test_sona_shm_fleet_url_is_the_default_of_the_fleet_command(capsys, monkeypatch):
    pytest.importorskip("redis")
    monkeypatch.setenv("SONA_SHM_FLEET_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    code, _, err = run(capsys, "fleet", "hosts", "--fleet-key", "frt", "--timeout", "0.5")
    assert code != EXIT_OK and "needs --fleet URL" not in err and "Redis did not answer" in err, err
