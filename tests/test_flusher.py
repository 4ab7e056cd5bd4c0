"""The flusher: exclusivity, adoption, crash consistency, timers, buffer, shutdown."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from sona_shm import FlusherRunningError, InvalidInputError, LayoutMismatchError, Step, Trajectory
from sona_shm.engine.flusher import Flusher
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig, Layout

from conftest import SMALL
from support import make_trajectories

H = SMALL["hidden_dim"]


def test_second_flusher_is_refused_with_the_pid(engine, name):
    engine()
    import os

    with pytest.raises(FlusherRunningError, match=f"already has a live flusher \\(pid {os.getpid()}\\)"):
        Flusher(name, config=EngineConfig(**SMALL))


@pytest.mark.guarantee("leftovers-are-recognised")
def test_adopting_keeps_state_and_refuses_other_configuration(engine, name):
    first = engine()
    client = engine.attach()
    for t in make_trajectories(1, 15, H):
        client.record(t)
    first.scan()
    up_before = client._ledger.read("up")[0]
    first.close()
    with pytest.raises(LayoutMismatchError, match="hidden_dim: segment has 16, requested 32.*sona-shm destroy"):
        Flusher(name, config=EngineConfig(**{**SMALL, "hidden_dim": 32}), config_overrides={"hidden_dim": 32})
    second = Flusher(name, config_overrides={})  # adopt whatever is there
    try:
        assert second.created is False
        assert second.learner.trajectories_processed == 15 and second.learner.pending == 5
        np.testing.assert_array_equal(second.learner.up, up_before)
        for t in make_trajectories(2, 5, H):
            client.record(t)
        assert second.scan() == 5
        assert client.stats()["flushes_performed"] == 2
    finally:
        second.close()


@pytest.mark.guarantee("committed-means-learned-once")
def test_a_flusher_dying_before_its_commit_loses_and_repeats_nothing(engine, name, monkeypatch):
    first = engine(flush_threshold=1000)
    client = engine.attach()
    batch1, batch2 = make_trajectories(3, 10, H), make_trajectories(4, 10, H)
    for t in batch1:
        client.record(t)
    first.scan()
    for t in batch2:
        client.record(t)

    def killed(record, points=()):
        raise SystemExit("killed between learning and committing")

    monkeypatch.setattr(first.ledger, "publish", killed)
    with pytest.raises(SystemExit):
        first.scan()  # learned batch2 privately, died before publishing it
    first.close()
    monkeypatch.undo()

    second = Flusher(name, config_overrides={})
    try:
        assert second.scan() == 10  # batch2 again, batch1 not
        second.flush_now()
    finally:
        second.close()
    from sona_shm import InstantLoop

    reference = InstantLoop(H, SMALL["rank"], SMALL["lr"], 1000)
    for t in batch1 + batch2:
        reference.on_trajectory(t)
    reference.flush()
    stats = client.stats()
    assert stats["trajectories_processed"] == 20 and stats["updates_applied"] == 20
    x = np.ones(H, np.float32)
    np.testing.assert_allclose(client.forward(x), reference.forward(x), atol=1e-6)


def test_half_written_inactive_copy_is_ignored(engine, name):
    first = engine()
    client = engine.attach()
    client.record(Trajectory(np.ones(H), [], 1.0))
    first.scan()
    commit = first.ledger.commit
    first.ledger.copies[(commit + 1) & 1]["up"] = np.nan  # a writer killed mid-copy
    first.ledger.copies[(commit + 1) & 1]["trajectories_processed"] = 999
    first.close()
    second = Flusher(name, config_overrides={})
    try:
        assert second.learner.trajectories_processed == 1 and np.isfinite(second.learner.up).all()
    finally:
        second.close()


def test_interval_flush_applies_pending_gradients(engine):
    flusher = engine(flush_threshold=1000)
    flusher.flush_interval = 0.5
    client = engine.attach()
    client.record(Trajectory(np.ones(H), [], 1.0))
    flusher.scan()
    assert client.stats()["flushes_performed"] == 0
    flusher._last_flush_mono -= 1.0  # the interval has passed
    flusher.scan()
    stats = client.stats()
    assert stats["flushes_performed"] == 1 and stats["pending_signals"] == 0 and stats["last_flush_at"]


def test_a_threshold_flush_sets_last_flush_at(engine):
    flusher = engine(flush_threshold=2)
    client = engine.attach()
    client.record(Trajectory(np.ones(H), [Step(np.ones(H), None, 1.0)], 1.0))
    flusher.scan()
    assert client.stats()["last_flush_at"] is None  # one signal pending, nothing applied yet
    before = time.time()
    client.record(Trajectory(np.ones(H), [Step(np.ones(H), None, 1.0)], 1.0))
    flusher.scan()
    stats = client.stats()
    assert stats["flushes_performed"] == 1 and stats["weights_generation"] == 1
    assert stats["last_flush_at"] >= before


def test_buffer_keeps_what_fits_and_counts_the_rest(engine):
    flusher = engine(capacity=8, lane_slots=32)
    client = engine.attach()
    for i in range(12):
        client.record(Trajectory(np.full(H, i, np.float32), [Step([float(i)], None, 1.0)], 1.0))
    flusher.scan()
    buffer = client.stats()["buffer"]
    assert (buffer["len"], buffer["dropped"], buffer["success_rate"]) == (8, 4, pytest.approx(8 / 12))
    layout = flusher.layout
    slots = np.ndarray((8,), dtype=layout.slot_dtype, buffer=flusher.segment.numpy_buffer(), offset=layout.buffer_offset)
    assert slots["query"][:, 0].tolist() == list(range(8))  # oldest first, in order
    assert slots["seq"].tolist() == list(range(1, 9))
    del slots


def test_zero_capacity_keeps_nothing(engine):
    flusher = engine(capacity=0)
    client = engine.attach()
    client.record(Trajectory(np.ones(H), [], 1.0))
    flusher.scan()
    buffer = client.stats()["buffer"]
    assert buffer == {
        "len": 0,
        "dropped": 1,
        "success_rate": None,  # no buffer: not a failure to keep (issue 20)
        "capacity": 0,
        "drained": 0,
        "drained_at": None,
        "consumer_pid": None,
        "state": "no buffer",
    }
    assert client.drain() == [] and client.buffer_stats() == (0, 1, 0.0)


@pytest.mark.guarantee("leftovers-are-recognised")
@pytest.mark.guarantee("leftovers-are-recognised")
def test_incomplete_segment_is_initialised_again(name):
    layout = Layout(EngineConfig(**SMALL))
    segment.create_fd(name, layout.total_bytes, 0o600).close()  # a creator that died before the magic
    with pytest.raises(segment.SegmentNotFoundError, match="never finished"):
        segment.Segment.open(name)
    flusher = Flusher(name, config=EngineConfig(**SMALL))
    try:
        assert flusher.created is True
    finally:
        flusher.close()
    segment.Segment.open(name).close()


def test_shutdown_learns_everything_and_flushes(engine):
    flusher = engine(flush_threshold=1000)
    client = engine.attach()
    for t in make_trajectories(6, 9, H):
        client.record(t)
    flusher.shutdown()
    stats = client.stats()
    assert stats["trajectories_processed"] == 9 and stats["pending_signals"] == 0 and stats["flushes_performed"] == 1
    assert stats["flusher"]["alive"] is False


@pytest.mark.parametrize("interval", [float("nan"), float("inf"), -1.0, "1"])
def test_a_flush_interval_that_is_not_finite_seconds_is_refused_before_anything_is_created(name, interval):
    with pytest.raises(InvalidInputError, match="flush_interval: expected a finite number of seconds >= 0"):
        Flusher(name, config=EngineConfig(**SMALL), flush_interval=interval)
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")
