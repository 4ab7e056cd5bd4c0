"""Real processes: the flusher started with the CLI, producers in other processes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from sona_shm import InstantLoop, Step, Trajectory
from sona_shm.engine.client import attach
from sona_shm.stats import read_stats
from sona_shm.supervise import stop_process

from support import ROOT, load_vectors, make_trajectories, run, scenario_config, scenario_trajectory

SCENARIOS = load_vectors()["scenarios"]
PRODUCER = str(ROOT / "tests" / "producer.py")


def run_producers(procs, name: str, *argsets: list[str]) -> list[dict]:
    started = [procs.start(PRODUCER, name, *args) for args in argsets]
    lines = []
    for p in started:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"producer failed ({p.returncode}): {err}"
        lines += [json.loads(line) for line in out.splitlines()]
    return lines


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_parity_through_the_flusher_process(procs, name, scenario):
    h, rank, lr = scenario_config(scenario)
    attention = max([len(s["att"]) for op in scenario["ops"] if op["op"] == "traj" for s in op["steps"]] + [1])
    procs.flusher(
        name,
        "--hidden-dim",
        str(h),
        "--rank",
        str(rank),
        "--lr",
        str(lr),
        "--flush-threshold",
        "100",
        "--flush-interval",
        "0",
        "--max-steps",
        "8",
        "--attention-dim",
        str(attention),
        "--lanes",
        "2",
    )
    probes = np.array(scenario["probes"], np.float32)
    with attach(name) as client:
        for op in scenario["ops"]:
            if op["op"] == "traj":
                assert client.record(scenario_trajectory(op))
            elif op["op"] == "flush":
                client.flush(timeout=30)
            else:
                client.sync(timeout=30)
                np.testing.assert_allclose(client.forward(probes), np.array(op["outputs"]), atol=2e-6, rtol=0, err_msg=op["label"])
                stats = client.stats()
                assert stats["buffer"]["len"] == op["stats"]["trajectories_buffered"]
                assert stats["buffer"]["dropped"] == op["stats"]["trajectories_dropped"]


@pytest.mark.guarantee("committed-means-learned-once")
@pytest.mark.parametrize("threshold", [100, 10**9], ids=["flush-every-100", "one-flush-at-the-end"])
def test_four_producers_learn_everything_exactly_once(procs, name, threshold):
    h = 64
    procs.flusher(
        name,
        "--hidden-dim",
        str(h),
        "--flush-threshold",
        str(threshold),
        "--max-steps",
        "4",
        "--attention-dim",
        "8",
        "--lanes",
        "8",
        "--lane-slots",
        "256",
    )
    # --hold 4: all four hold their lanes at once before they exit, whatever the load (else a producer
    # done before another starts frees its lane for it, and the distinct-lanes check below is a race)
    results = run_producers(procs, name, *[["--seed", str(s), "--count", "2000", "--hold", "4"] for s in range(4)])
    assert sorted(r["recorded"] for r in results) == [2000] * 4
    assert len({r["lane"] for r in results}) == 4
    with attach(name) as client:
        client.flush(timeout=60)
        stats = client.stats()
        reference = InstantLoop(h, 2, 0.002, threshold)
        for seed in range(4):
            for t in make_trajectories(seed, 2000, h):
                reference.on_trajectory(t)
        reference.flush()
        assert stats["trajectories_processed"] == stats["signals_accumulated"] == stats["updates_applied"] == 8000
        assert stats["lane_dropped"] == 0 and stats["recorded"] == 8000
        np.testing.assert_allclose(client._ledger.read("up")[0], reference.up, atol=1e-5)
        probes = np.random.default_rng(9).standard_normal((4, h)).astype(np.float32)
        np.testing.assert_allclose(client.forward(probes), reference.forward(probes), atol=1e-5)


def test_threads_and_forked_children_count_exactly(procs, name):
    procs.flusher(name, "--hidden-dim", "32", "--lanes", "8", "--lane-slots", "128")
    threaded, *forked = run_producers(procs, name, ["--seed", "1", "--count", "300", "--threads", "4"]) + run_producers(
        procs, name, ["--seed", "2", "--count", "200", "--fork", "2"]
    )
    assert threaded["recorded"] == 1200
    assert sorted(r["recorded"] for r in forked) == [200, 200, 201]
    assert len({r["lane"] for r in forked}) == 3  # each forked child claimed its own lane
    stats = read_stats(name)
    assert stats["trajectories_processed"] == 1200 + 601 and stats["lane_dropped"] == 0


def test_sigterm_drains_flushes_and_exits_zero(procs, name):
    flusher = procs.flusher(name, "--hidden-dim", "32", "--flush-threshold", "1000000")
    with attach(name) as client:
        for t in make_trajectories(7, 300, 32):
            assert client.record(t)
    assert stop_process(flusher) == 0
    stats = read_stats(name)
    assert stats["trajectories_processed"] == 300 and stats["pending_signals"] == 0
    assert stats["flushes_performed"] == 1 and stats["flusher"]["alive"] is False


@pytest.mark.guarantee("dropped-means-counted")
def test_overfilled_lane_counts_drops_exactly_and_learns_the_rest(procs, name):
    command = [sys.executable, "-m", "sona_shm", "create", "--name", name, "--hidden-dim", "8", "--lane-slots", "16", "--lanes", "2"]
    created = run(command, timeout=60)
    assert created.returncode == 0, created.stderr
    with attach(name) as client:
        results = [client.record(Trajectory(np.ones(8), [Step([1.0], None, 1.0)], 1.0)) for _ in range(20)]
        assert results == [True] * 16 + [False] * 4
        procs.flusher(name)
        client.sync(timeout=30)
        stats = client.stats()
    assert stats["trajectories_processed"] == 16 and stats["lane_dropped"] == 4 and stats["recorded"] == 16


def test_second_flusher_refuses_and_names_the_first(procs, name):
    first = procs.flusher(name, "--hidden-dim", "8")
    second = run([sys.executable, "-m", "sona_shm", "flusher", "--name", name], timeout=60)
    assert second.returncode == 4
    assert f"already has a live flusher (pid {first.pid})" in second.stderr
    assert first.poll() is None
