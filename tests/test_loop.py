"""InstantLoop: parity with the reference binary, buffer and metrics semantics."""

from __future__ import annotations

import numpy as np
import pytest

from sona_shm import InstantLoop, InvalidInputError, Step, Trajectory

from support import load_vectors, scenario_config, scenario_trajectory

SCENARIOS = load_vectors()["scenarios"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_parity_with_reference_vectors(scenario):
    h, rank, lr = scenario_config(scenario)
    loop = InstantLoop(h, rank, lr)
    probes = np.array(scenario["probes"], np.float32)
    checked = 0
    for op in scenario["ops"]:
        if op["op"] == "traj":
            loop.on_trajectory(scenario_trajectory(op))
        elif op["op"] == "flush":
            loop.flush()
        else:
            np.testing.assert_allclose(loop.forward(probes), np.array(op["outputs"]), atol=2e-6, rtol=0, err_msg=op.get("label"))
            length, dropped, rate = loop.buffer_stats()
            assert (length, dropped, rate) == (
                op["stats"]["trajectories_buffered"],
                op["stats"]["trajectories_dropped"],
                op["stats"]["buffer_success_rate"],
            )
            checked += 1
    assert checked >= 5


def test_untrained_adapter_returns_its_input():
    loop = InstantLoop(8, 2)
    x = np.arange(8, dtype=np.float32)
    out = loop.forward(x)
    assert out.dtype == np.float32 and out.tolist() == x.tolist()
    assert loop.forward([list(x)] * 3).shape == (3, 8)


def test_metrics_and_flush_threshold():
    loop = InstantLoop(4, 1, lr=0.1, flush_threshold=3)
    for _ in range(7):
        loop.on_trajectory(Trajectory(np.ones(4), [Step([1, 0, 0, 0], None, 1.0)], 1.0))
    m = loop.metrics
    assert (m.trajectories_processed, m.signals_accumulated, m.flushes_performed, m.updates_applied) == (7, 7, 2, 6)
    assert loop.pending == 1
    assert loop.flush() is True and loop.flush() is False
    assert loop.metrics.updates_applied == 7


def test_buffer_drops_when_full_but_still_learns():
    loop = InstantLoop(4, 1, flush_threshold=1, capacity=2)
    for _ in range(5):
        loop.on_trajectory(Trajectory(np.ones(4), [], 1.0))
    assert loop.buffer_stats() == (2, 3, pytest.approx(0.4))
    assert loop.metrics.trajectories_processed == 5
    assert [t.id for t in loop.drain_n(1)] == [0]
    assert [t.id for t in loop.drain()] == [1]
    assert loop.drain() == [] and loop.buffer_stats()[0] == 0


def test_ids_are_kept_or_assigned():
    loop = InstantLoop(2, 1)
    loop.on_trajectory(Trajectory([1, 2], [], 1.0, id=42, route="r", latency_us=5))
    loop.on_trajectory(Trajectory([1, 2], [], 1.0))
    first, second = loop.drain()
    assert (first.id, first.route, first.latency_us) == (42, "r", 5)
    assert second.id == 0 and loop.next_id() == 1


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(rank=3), "rank: expected 1 or 2"),
        (dict(hidden_dim=0), "hidden_dim: expected an integer"),
        (dict(lr=float("nan")), "lr: expected a finite number"),
        (dict(flush_threshold=0), "flush_threshold: expected an integer"),
        (dict(capacity=-1), "capacity: expected an integer"),
    ],
)
def test_bad_config_is_refused(kwargs, fragment):
    with pytest.raises(InvalidInputError, match=fragment):
        InstantLoop(**kwargs)


def test_bad_trajectory_changes_nothing():
    loop = InstantLoop(4, 1, flush_threshold=1)
    with pytest.raises(InvalidInputError):
        loop.on_trajectory(Trajectory([1, 2, 3, np.nan], [], 1.0))
    assert loop.metrics.trajectories_processed == 0 and loop.buffer_stats() == (0, 0, 1.0)
    assert not loop.up.any()


@pytest.mark.parametrize("x", [np.ones(5), np.ones((2, 5)), np.ones((2, 2, 4)), [np.nan] * 4, "abcd", [[1, 2, 3, np.inf]]])
def test_forward_refuses_bad_vectors(x):
    with pytest.raises(InvalidInputError, match="^x: expected"):
        InstantLoop(4, 1).forward(x)
