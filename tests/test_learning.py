"""Loop A's numerics against SEMANTICS.md, rule by rule."""

from __future__ import annotations

import numpy as np

from sona_shm.learn.learner import Learner, apply_adapter, initial_down, learning_signals

F32 = np.float32


def test_initial_down_follows_the_golden_ratio_rule():
    down = initial_down(4, 2)
    k = np.arange(8)
    expected = ((k * 0.618034) % 1 - 0.5) * 0.02
    assert down.shape == (2, 4) and down.dtype == F32
    np.testing.assert_allclose(down.ravel(), expected, atol=1e-7)
    assert down[0, 0] == F32(-0.01)


def signals(query, steps):
    """One trajectory through the batch API: steps = [(act, reward), ...]."""
    h = len(query)
    n = len(steps)
    act = np.zeros((1, max(n, 1), h), F32)
    rewards = np.zeros((1, max(n, 1)), F32)
    for s, (a, r) in enumerate(steps):
        act[0, s, : len(a)] = a
        rewards[0, s] = r
    return learning_signals(np.array([query], F32), rewards, act, np.array([n]))[0]


def test_zero_steps_teach_the_query_itself_unnormalised():
    assert signals([3.0, 4.0], []).tolist() == [3.0, 4.0]


def test_reinforce_with_mean_baseline_is_normalised():
    g = signals([0, 0], [([1.0, 0.0], 1.0), ([0.0, 1.0], 3.0)])
    # baseline 2: advantages -1, +1 -> (-1, 1) / sqrt(2)
    np.testing.assert_allclose(g, [-(0.5**0.5), 0.5**0.5], rtol=1e-6)


def test_one_step_falls_back_to_sign_of_reward_times_unit_activation():
    np.testing.assert_allclose(signals([0, 0], [([3.0, 4.0], -0.25)]), [-0.6, -0.8], rtol=1e-6)


def test_zero_reward_or_zero_activation_gives_a_zero_signal():
    assert not signals([1, 1], [([3.0, 4.0], 0.0)]).any()
    assert not signals([1, 1], [([0.0, 0.0], 1.0), ([0.0, 0.0], 2.0)]).any()


def test_short_activations_add_into_the_first_entries():
    g = signals([0, 0, 0], [([1.0], 1.0), ([0.0, 1.0, 1.0], 2.0)])
    expected = np.array([-0.5, 0.5, 0.5]) / np.sqrt(0.75)
    np.testing.assert_allclose(g, expected, rtol=1e-6)


def test_stale_steps_past_the_count_are_ignored():
    query = np.zeros((2, 2), F32)
    act = np.array([[[1, 0], [np.nan, np.inf]], [[1, 0], [0, 1]]], F32)
    rewards = np.array([[1, np.nan], [1, 3]], F32)
    g = learning_signals(query, rewards, act, np.array([1, 2]))
    np.testing.assert_allclose(g, [[1, 0], [-(0.5**0.5), 0.5**0.5]], rtol=1e-6)


def test_learner_flushes_exactly_at_the_threshold_within_a_batch():
    learner = Learner(2, 1, lr=0.5, flush_threshold=3)
    sig = np.array([[1, 0]] * 4 + [[0, 1]] * 3, F32)
    assert learner.learn(sig, np.ones(7, F32)) == 2
    # flush 1: mean of three (1, 0); flush 2: mean of (1,0),(0,1),(0,1); one (0,1) pending
    np.testing.assert_allclose(learner.up, [[0.5 + 0.5 / 3, 0.5 * 2 / 3]], rtol=1e-6)
    assert (learner.pending, learner.flushes_performed, learner.updates_applied) == (1, 2, 6)
    assert learner.metrics.trajectories_processed == learner.metrics.signals_accumulated == 7


def test_manual_flush_with_nothing_pending_changes_nothing():
    learner = Learner(2, 2, lr=0.1, flush_threshold=100)
    assert learner.flush() is False
    assert learner.generation == 0 and not learner.up.any()


def test_quality_scales_and_can_be_negative():
    learner = Learner(2, 2, lr=1.0, flush_threshold=100)
    learner.learn(np.array([[1, 0], [0, 1]], F32), np.array([2.0, -1.0], F32))
    learner.flush()
    np.testing.assert_allclose(learner.up, [[1.0, -0.5], [1.0, -0.5]])


def test_forward_adds_scaled_rank_projection():
    down = np.array([[1, 0], [0, 1]], F32)
    up = np.array([[1, 1], [2, 0]], F32)
    x = np.array([1, 2], F32)
    scale = F32(1 / np.sqrt(2))
    out = apply_adapter(x, down, up * scale)
    np.testing.assert_allclose(out, x + scale * (1 * up[0] + 2 * up[1]), rtol=1e-6)
    batch = apply_adapter(np.stack([x, x]), down, up * scale)
    np.testing.assert_allclose(batch, [out, out])
