"""Property tests of the routing rule's maths (learn/routing.py), for inputs hypothesis draws: one
feedback's step is the gradient of its loss (finite differences), its slopes and steps are bounded,
and a query the adapter maps to (almost) zero teaches nothing. The C learner against this one:
tests/test_routing_c.py."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sona_shm.learn import routing

F32, F64 = np.float32, np.float64


@st.composite
def states(draw):
    """A state of the rule in float64 (adapter, route vectors, biases), a query and one feedback."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h, k, rank = draw(st.integers(2, 9)), draw(st.integers(2, 7)), draw(st.sampled_from([1, 2]))
    scale = draw(st.sampled_from([0.0, 0.1, 0.5, 1.5]))
    state = {
        "up": rng.standard_normal((rank, h)) * scale,
        "down": rng.standard_normal((rank, h)) * scale,
        "vectors": rng.standard_normal((k, h)) * draw(st.sampled_from([0.3, 1.0, 3.0])),
        "bias": rng.standard_normal(k) * draw(st.sampled_from([0.0, 0.5])),
    }
    query = rng.standard_normal(h) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    active = np.ones(k, bool)
    if k > 2 and draw(st.booleans()):
        active[rng.integers(0, k)] = False  # a retired route: never chosen, never learned
    candidates = np.flatnonzero(active)
    route = int(rng.choice(candidates))
    best = int(rng.choice(candidates)) if draw(st.booleans()) else -1
    reward = float(draw(st.sampled_from([0.0, 1.0, rng.random()])))
    tau = draw(st.sampled_from([0.5, 3.0, 10.0]))
    return state, query, active, route, best, reward, tau


def adapted_norm(state: dict, query: np.ndarray) -> float:
    q = query / np.linalg.norm(query)
    s = 1.0 / np.sqrt(state["up"].shape[0])
    return float(np.linalg.norm(q + s * (state["down"] @ q) @ state["up"]))


@settings(max_examples=150, deadline=None)
@given(states())
def test_a_step_is_the_gradient_of_the_loss(case):
    """Without centring (mu = 0) and protection, and with every slope kept, one step moves each parameter by its
    step size times the exact gradient of ``routing.loss``: lr for V, BIAS_LR for b, adapter_lr for U and D."""
    state, query, active, route, best, reward, tau = case
    # Where |f| is below GRADIENT_FLOOR the adapter's gradient is clipped on purpose; the loss is smooth only away from 0.
    assume(adapted_norm(state, query) > 2 * routing.GRADIENT_FLOOR)
    moved = {name: value.copy() for name, value in state.items()}
    with mock.patch.object(routing, "PROTECT", 0.0), mock.patch.object(routing, "SPARSE", 0.0):
        routing.step(
            moved["up"], moved["down"], moved["vectors"], moved["bias"], None, active, query.astype(F32), route, best, reward,
            n=1, lr=1.0, adapter_lr=1.0, temperature=tau,
        )  # fmt: skip
    steps = {"up": 1.0, "down": 1.0, "vectors": 1.0, "bias": routing.BIAS_LR}
    q = query.astype(F32).astype(F64)
    eps = 1e-6
    for name, size in steps.items():
        numeric = np.zeros_like(state[name])
        for idx in np.ndindex(*numeric.shape):
            if name in ("vectors", "bias") and not active[idx[0]]:
                continue  # a retired route is not in the softmax: no gradient, and the step leaves it alone
            hi, lo = ({k: v.copy() for k, v in state.items()} for _ in range(2))
            hi[name][idx] += eps
            lo[name][idx] -= eps
            numeric[idx] = (_loss(q, hi, active, route, best, reward, tau) - _loss(q, lo, active, route, best, reward, tau)) / (2 * eps)
        got = (moved[name] - state[name]) / size
        scale = max(1.0, float(np.abs(numeric).max()))
        np.testing.assert_allclose(got, numeric, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def _loss(q, state, active, route, best, reward, tau) -> float:
    vectors = np.where(active[:, None], state["vectors"], 0.0)
    bias = np.where(active, state["bias"], -np.inf)  # a retired route's score is -inf: out of the softmax
    return routing.loss(q, state["up"], state["down"], vectors, bias, route, best, reward, tau)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**32 - 1), st.sampled_from([0.1, 1.0, 10.0, 1000.0]))
def test_loss_slopes_are_bounded_by_one(k, seed, temperature):
    """|dL/dz_k| <= 1 for every route, full information or bandit, any reward in [0, 1] (README, "Which rule")."""
    rng = np.random.default_rng(seed)
    z = temperature * rng.uniform(-1, 1, k)
    if rng.random() < 0.3:
        z[0] = temperature  # a confident router too
    best = int(rng.integers(0, k)) if rng.random() < 0.5 else -1
    c = routing.slopes(z, int(rng.integers(0, k)), best, float(rng.choice([0.0, 1.0, rng.random()])))
    assert np.isfinite(c).all() and np.abs(c).max() <= 1.0 + 1e-12
    assert not ((0 < np.abs(c)) & (np.abs(c) < routing.SPARSE)).any()  # small slopes are dropped


@settings(max_examples=150, deadline=None)
@given(states(), st.sampled_from([1e-30, 1.0, 1e30]), st.integers(1, 5000))
def test_a_step_is_bounded_scale_free_and_finite(case, scale, n):
    """|dv_k| <= 2 lr tau and |db_k| <= BIAS_LR + 4 lr tau^2 / BETA for any query length: the query is normalised
    first, so 1e-30 and 1e30 times a query move the state alike, and no finite input gives NaN or infinity."""
    state, query, active, route, best, reward, tau = case
    f32 = {name: value.astype(F32) for name, value in state.items()}
    moved = []
    for factor in (1.0, scale):
        s = {name: value.copy() for name, value in f32.items()}
        centre = np.full(len(query), 0.5 / np.sqrt(len(query)))
        x = (query / np.max(np.abs(query)) * factor).astype(F32)
        assume(np.max(np.abs(x)) > 0)
        routing.step(
            s["up"],
            s["down"],
            s["vectors"],
            s["bias"],
            centre,
            active,
            x,
            route,
            best,
            reward,
            n=n,
            lr=0.03,
            adapter_lr=0.0,
            temperature=tau,
        )
        assert all(np.isfinite(v).all() for v in s.values())
        moved.append(s)
    dv = np.linalg.norm(moved[0]["vectors"].astype(F64) - f32["vectors"].astype(F64), axis=1)
    db = np.abs(moved[0]["bias"].astype(F64) - f32["bias"].astype(F64))
    assert dv.max() <= 2 * 0.03 * tau * (1 + 1e-5) + 1e-6
    assert db.max() <= routing.BIAS_LR + 4 * 0.03 * tau**2 / routing.BETA + 1e-6
    for name in ("vectors", "bias"):
        np.testing.assert_allclose(moved[0][name], moved[1][name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.array_equal(moved[0]["up"], f32["up"]) and np.array_equal(moved[0]["down"], f32["down"])  # adapter_lr 0


@pytest.mark.parametrize("rank", [1, 2])
def test_a_query_mapped_below_the_minimum_norm_teaches_nothing(rank):
    """|f(q^)| <= MIN_ADAPTED_NORM: nothing moves (the caller still counts the signal); just above it, a clipped step."""
    h, k = 16, 3
    rng = np.random.default_rng(rank)
    vectors = rng.standard_normal((k, h)).astype(F32)
    qhat = np.zeros(h, F32)
    qhat[0] = 1.0  # exact in float32, so f(q^) = (1 - (1 - eps)) q^ = eps q^ up to one rounding
    for eps, teaches in ((2**-24, False), (2**-12, True)):
        down, up = np.zeros((rank, h), F32), np.zeros((rank, h), F32)
        down[0] = qhat
        up[0] = -(1.0 - eps) * np.sqrt(rank) * qhat
        before = (up.copy(), down.copy(), vectors.copy())
        moved = routing.step(
            up,
            down,
            vectors,
            np.zeros(k, F32),
            np.zeros(h),
            np.ones(k, bool),
            qhat,
            1,
            0,
            1.0,
            n=1,
            lr=1.0,
            adapter_lr=1.0,
            temperature=10.0,
        )
        assert moved == teaches
        assert not teaches or not np.array_equal(up, before[0])
        if not teaches:
            assert all(np.array_equal(a, b) for a, b in zip((up, down, vectors), before))
        # Above the minimum the adapter's step is clipped: tau / |f| is taken at |f| = GRADIENT_FLOOR.
        assert np.abs(up - before[0]).max() <= 1 / np.sqrt(rank) * 10.0 / routing.GRADIENT_FLOOR * 2 * np.abs(vectors).max()


def test_zero_query_teaches_nothing():
    h, k = 8, 3
    vectors = np.eye(k, h, dtype=F32)
    args = (np.zeros((2, h), F32), np.zeros((2, h), F32), vectors, np.zeros(k, F32), np.zeros(h), np.ones(k, bool))
    assert routing.step(*args, np.zeros(h, F32), 0, 1, 1.0, n=1, lr=1.0, adapter_lr=1.0, temperature=10.0) is False
    assert np.array_equal(args[2], np.eye(k, h)) and not args[3].any() and not args[4].any()
