"""The reward guard in one process: the moving reward's arithmetic, good checkpoints set the level, a fall of more
than DROP pauses learning within the window and (with rollback) restores the last good checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from sona_shm import InvalidInputError
from sona_shm.engine.guard import GuardOptions, MovingReward
from sona_shm.learn.routes import RouteTable
from sona_shm.store import history
from sona_shm.store.checkpoint import read_checkpoint

H, K = 16, 4
LEARNED = ("route_vectors", "route_bias", "work_vectors", "work_bias", "route_centre", "up", "down")


def table() -> RouteTable:
    return RouteTable.build(np.random.default_rng(3).standard_normal((K, H)), ["code", "math", "chat", "search"])


def test_the_moving_reward_is_the_mean_of_the_last_window_feedbacks_to_within_a_batch():
    moving = MovingReward(10)
    moving.reset(100, 40.0)  # totals when it starts: not part of the mean
    count, total = 100, 40.0
    for _ in range(9):
        count, total = count + 1, total + 1.0
        moving.observe(count, total)
    assert moving.mean is None and moving.feedbacks == 9 and moving.partial == 1.0
    moving.observe(count + 1, total + 1.0)  # the tenth
    count, total = count + 1, total + 1.0
    assert moving.known and moving.mean == 1.0
    for _ in range(3):  # batches of 3 zero-reward feedbacks
        count += 3
        moving.observe(count, total)
    # from the newest mark at least 10 feedbacks back: the last rewarded one and the 9 since
    assert moving.feedbacks == 10 and moving.mean == pytest.approx(0.1)
    count += 3
    moving.observe(count, total)  # the newest such mark is now 12 back (the batches are 3 long)
    assert moving.feedbacks == 12 and moving.mean == 0.0
    moving.observe(count, total)  # no feedback in that batch: nothing changes
    assert moving.feedbacks == 12


@pytest.mark.parametrize("drop, window", [(0, 10), (-0.1, 10), (1.01, 10), (float("nan"), 10), (True, 10), (0.2, 0), (0.2, 1.5)])
def test_guard_options_are_checked(drop, window):
    with pytest.raises(InvalidInputError, match="--guard-(reward|window)"):
        GuardOptions(drop, window)


def feed(client, rng, n: int, reward: float) -> None:
    for _ in range(n):
        assert client.feedback(rng.standard_normal(H).astype(np.float32), route=int(rng.integers(0, K)), reward=reward)


@pytest.mark.parametrize("rollback", [False, True])
def test_a_fall_of_the_reward_pauses_learning_within_the_window_and_rolls_back(engine, tmp_path, rollback):
    path = str(tmp_path / "ck")
    guard = GuardOptions(0.3, window=50, rollback=rollback)
    flusher = engine(
        routes=table(), rule="routing", lane_slots=128, capacity=1000, options={"checkpoint": path, "checkpoint_keep": 3, "guard": guard}
    )
    client = engine.attach()
    rng = np.random.default_rng(0)
    feed(client, rng, 100, 1.0)
    flusher.scan()
    assert flusher.write_checkpoint()  # good: the guard's level is the moving reward now
    learning = client.statistics().learning
    assert learning.guard_level == 1.0 and learning.guard_level_at == read_checkpoint(path).written_at and learning.moving_reward == 1.0
    good = read_checkpoint(path)
    feed(client, rng, 100, 0.0)  # the judge broke: every reward inverted
    flusher.scan()
    stats = client.statistics()
    learning = stats.learning
    learned_bad = stats.trajectories_processed - learning.paused_skipped - 100
    assert learning.paused and learning.paused_by == "guard" and learning.guard_trips == 1
    # The moving mean falls below 1.0 - 0.3 after 16 of 50 bad feedbacks; the guard looks every 5 (window / 10).
    assert 16 <= learned_bad <= 20 and learning.paused_skipped == 100 - learned_bad and stats.trajectories_processed == 200
    kept = history.kept(path)
    assert len(kept) == 2  # the good one, and the one written when learning paused
    if rollback:
        assert learning.rollbacks == 1 and learning.rolled_back_signals == learned_bad
        assert learning.rollback_checkpoint_at == good.written_at
        values = client._ledger.read(*LEARNED)
        for field, value in zip(LEARNED, values):
            assert np.array_equal(value[: len(good.arrays[field])], good.arrays[field]), field
    else:
        assert learning.rollbacks == 0 and stats.signals_accumulated == 100 + learned_bad
    # Paused: nothing more is learned, and no periodic checkpoint is written (the state does not change).
    feed(client, rng, 10, 1.0)
    flusher.scan()
    flusher._periodic_checkpoint()
    assert len(history.kept(path)) == 2 and client.statistics().learning.paused_skipped == learning.paused_skipped + 10


def test_a_steady_reward_never_trips_and_each_good_checkpoint_moves_the_level(engine, tmp_path):
    path = str(tmp_path / "ck")
    flusher = engine(
        routes=table(),
        rule="routing",
        lane_slots=128,
        capacity=0,
        options={"checkpoint": path, "checkpoint_keep": 2, "guard": GuardOptions(0.2, window=40)},
    )
    client = engine.attach()
    rng = np.random.default_rng(1)
    for level in (1.0, 0.9, 0.8, 0.75):  # a slow drift: less than DROP from one good checkpoint to the next
        for _ in range(60):
            assert client.feedback(rng.standard_normal(H).astype(np.float32), route=0, reward=float(rng.random() < level))
        flusher.scan()
        flusher.write_checkpoint()
        learning = client.statistics().learning
        assert not learning.paused and learning.guard_level == learning.moving_reward
    assert client.statistics().learning.guard_trips == 0 and len(history.kept(path)) == 2


def test_drop_at_seven_standard_deviations_never_trips_on_a_steady_reward_and_catches_an_inverted_one_within_the_window():
    """The advice on DROP and N of docs/how-to/safety.md (``scripts/guard_window.py``), on the flusher's own moving reward and guard."""
    from guard_window import bad_before_trip, false_trips, suggested_drop

    level, window = 0.8, 200
    drop = suggested_drop(level, window)
    assert drop == pytest.approx(0.198, abs=1e-3)
    assert false_trips(level, window, drop, runs=5, feedbacks=100_000, every=2000) == 0
    caught = [bad_before_trip(level, window, drop, every=2000, seed=s) for s in range(3)]
    assert all(b is not None and b <= window for b in caught), caught  # about N * DROP / (2L - 1), plus a batch
    assert false_trips(level, window, suggested_drop(level, window, k=2.0), runs=5, feedbacks=100_000, every=2000) == 5
