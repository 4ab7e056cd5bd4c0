"""Property tests of the routing rule: the C learner equals the numpy learner, and the numpy
gradient equals finite differences of its loss, for inputs hypothesis draws."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sona_shm.config import MAX_ROUTES, EngineConfig
from sona_shm.learn import routing as routing_module
from sona_shm.learn.learner import Learner
from sona_shm.shm.layout import Layout

F32 = np.float32
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _speedups():
    from sona_shm.shm.lane import _speedups

    if _speedups is None:
        if os.environ.get("SONA_SHM_PURE_PYTHON"):
            pytest.skip("C fast paths disabled on purpose")
        raise AssertionError("the C extension is not built")
    return _speedups


@st.composite
def routing_cases(draw, flushes: bool):
    """A route table, an adapter, feedback slots (some not signals), cut points and a threshold.

    ``flushes``: a threshold that may fall inside the batch, and no query mapped near zero
    (its gradient, ~tau/|f|, throws U and D so far that later windows amplify the last
    bits float32 rounding left differently: that compares chaos, not code). Else no flush.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    h = draw(st.sampled_from([1, 3, 7, 8, 9, 16, 31, 64]))
    k = draw(st.one_of(st.integers(2, 9), st.sampled_from([63, 64, 65, 255, MAX_ROUTES])))
    rank = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 60))
    unit = rng.standard_normal((k, h))
    unit = (unit / np.linalg.norm(unit, axis=1, keepdims=True)).astype(F32)
    weight_scale = draw(st.sampled_from([0.0, 0.01, 0.3, 1.0, 3.0]))
    down = (rng.standard_normal((rank, h)) * weight_scale).astype(F32)
    up = (rng.standard_normal((rank, h)) * weight_scale).astype(F32)
    query = rng.standard_normal((n, h))
    scales = draw(st.lists(st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30]), min_size=n, max_size=n))
    query = (query * np.array(scales)[:, None]).astype(F32)
    near_zero = None if flushes else draw(st.sampled_from([None, 1e-1, 1e-2, 1e-3]))
    if near_zero is not None and h > 1:
        # The adapter maps query 0's direction to (1 - near_zero) of itself removed:
        # |f| = near_zero for that query (f = q^ + s (d . q^) u with d = q^, u = -(1 - eps) q^ / s).
        qhat = rng.standard_normal(h)
        qhat /= np.linalg.norm(qhat)
        s = 1.0 / np.sqrt(rank)
        down[0] = qhat
        up[0] = -(1.0 - near_zero) * qhat / s
        if rank == 2:
            down[1] = 0.0
        query[0] = qhat.astype(F32)
    kind = draw(st.lists(st.sampled_from(["bandit", "full", "full+route", "none"]), min_size=n, max_size=n))
    route_index = np.where([kd in ("bandit", "full+route") for kd in kind], rng.integers(0, k, n), -1)
    best_index = np.where([kd.startswith("full") for kd in kind], rng.integers(0, k, n), -1)
    reward_kind = draw(st.sampled_from(["binary", "fraction", "mixed"]))
    if reward_kind == "binary":
        reward = rng.integers(0, 2, n).astype(F32)
    elif reward_kind == "fraction":
        reward = rng.random(n).astype(F32)
    else:
        reward = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n), rng.random(n)).astype(F32)
    threshold = draw(st.integers(1, n + 3)) if flushes else n + 1
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=3)) if n > 1 else []))
    lr = draw(st.sampled_from([0.1, 1.0, 10.0]))
    temperature = draw(st.sampled_from([1.0, 10.0, 37.5]))
    return dict(
        h=h, k=k, rank=rank, unit=unit, down=down, up=up, query=query, route_index=route_index, best_index=best_index,
        reward=reward, threshold=threshold, cuts=cuts, lr=lr, temperature=temperature,
    )  # fmt: skip


def _learner(case: dict) -> Learner:
    learner = Learner(
        case["h"], case["rank"], case["lr"], case["threshold"], rule="routing", unit=case["unit"], temperature=case["temperature"]
    )
    learner.down[...] = case["down"]
    learner.up[...] = case["up"]
    return learner


def _slots(case: dict, layout: Layout) -> np.ndarray:
    n = len(case["query"])
    slots = np.zeros(n, dtype=layout.slot_dtype)
    slots["seq"] = np.arange(1, n + 1)
    slots["query"] = case["query"]
    slots["quality"] = case["reward"]
    slots["route_index"] = case["route_index"] + 1
    slots["best_index"] = case["best_index"] + 1
    return slots.view(np.uint8).reshape(n, layout.slot_bytes)


def _close(name: str, c: np.ndarray, py: np.ndarray, tol: float, scale: float = 0.0) -> None:
    """Equal within ``tol`` relative to the largest magnitude involved (``scale``: of the terms summed)."""
    scale = max(1.0, scale, float(np.abs(py).max(initial=0.0)))
    np.testing.assert_allclose(c, py, rtol=tol, atol=tol * scale, err_msg=name)


@SETTINGS
@given(st.booleans().flatmap(lambda flushes: st.tuples(st.just(flushes), routing_cases(flushes))))
def test_c_routing_learner_equals_the_numpy_learner(drawn):
    """Without a flush both learners sum the same float64 gradients, up to the order of the
    sums (1e-8: a query the adapter maps near zero amplifies rounding by 1/|f|^2); once a
    flush rounds U and D to float32, a last-bit difference there may carry into the next
    window's gradients (1e-5 then: a wrong U, D or window is O(1) off)."""
    from sona_shm.learn.learner import learn_block

    flushes, case = drawn
    _speedups()
    layout = Layout(EngineConfig(hidden_dim=case["h"], rank=case["rank"], rule="routing", routes=case["k"], max_steps=1, attention_dim=0))
    raw = _slots(case, layout)
    c, py = _learner(case), _learner(case)
    bounds = [0, *case["cuts"], len(raw)]
    for lo, hi in zip(bounds, bounds[1:]):
        assert learn_block(c, layout, raw[lo:hi], lo + 1) == (0, [], hi - lo)
        part = slice(lo, hi)
        py.learn_feedback(case["query"][part], case["route_index"][part], case["best_index"][part], case["reward"][part])
        py.count_routes(case["route_index"][part], case["best_index"][part], case["reward"][part])
    assert c.metrics == py.metrics and c.pending == py.pending and c.generation == py.generation
    assert (c.metrics.flushes_performed > 0) == (flushes and py.metrics.flushes_performed > 0)
    tol = 1e-5 if flushes else 1e-8
    # G_D[r] = s (u_r . g) q^ may cancel to far less than g's own size, which G_U[r] = s kappa_r g shows.
    terms = float(max(np.abs(py.grad_up).max(), np.abs(py.grad_down).max()))
    for field in ("up", "down", "grad_up", "grad_down"):
        _close(field, getattr(c, field), getattr(py, field), tol, terms if field.startswith("grad") else 0.0)
    _close("route_reward", c.route_reward, py.route_reward, 1e-12)
    assert np.isfinite(c.up).all() and np.isfinite(c.down).all() and np.isfinite(c.grad_up).all() and np.isfinite(c.grad_down).all()
    assert np.array_equal(c.route_chosen, py.route_chosen) and np.array_equal(c.route_best, py.route_best)


@st.composite
def gradient_cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    h = draw(st.integers(2, 9))
    k = draw(st.integers(2, 7))
    rank = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 5))
    unit = rng.standard_normal((k, h))
    unit = (unit / np.linalg.norm(unit, axis=1, keepdims=True)).astype(F32)
    weight_scale = draw(st.sampled_from([0.0, 0.1, 0.5, 1.5]))
    down = (rng.standard_normal((rank, h)) * weight_scale).astype(F32)
    up = (rng.standard_normal((rank, h)) * weight_scale).astype(F32)
    query = (rng.standard_normal((n, h)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))).astype(F32)
    full = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    route_index = rng.integers(0, k, n)
    best_index = np.where(full, rng.integers(0, k, n), -1)
    reward = np.where(rng.random(n) < 0.3, rng.integers(0, 2, n), rng.random(n))
    temperature = draw(st.sampled_from([0.5, 3.0, 10.0]))
    return query, route_index, best_index, reward, down, up, unit, temperature


@settings(max_examples=100, deadline=None)
@given(gradient_cases())
def test_routing_gradients_equal_finite_differences_of_the_loss(case):
    """routing.gradients is the ascent gradient of routing.loss w.r.t. U and D (bandit p_a held)."""
    query, route_index, best_index, reward, down, up, unit, temperature = case
    n = len(query)
    # A query the adapter maps to (almost) zero has no gradient by definition; the loss is
    # not smooth there, so such draws say nothing about the formula.
    s = 1.0 / np.sqrt(down.shape[0])
    q = query.astype(np.float64) / np.linalg.norm(query.astype(np.float64), axis=1, keepdims=True)
    f = q + s * (q @ down.T.astype(np.float64)) @ up.astype(np.float64)
    assume(np.linalg.norm(f, axis=1).min() > 0.05)
    gu, gd = routing_module.gradients(query, route_index, best_index, reward, down, up, unit, temperature)
    held = routing_module.route_probabilities(query, down, up, unit, temperature)[np.arange(n), route_index]
    eps = 1e-6
    for which, grad in (("up", gu), ("down", gd)):
        numeric = np.zeros_like(grad)
        for idx in np.ndindex(*grad.shape):
            w = {"down": down.astype(np.float64), "up": up.astype(np.float64)}
            w[which][idx] += eps
            hi = routing_module.loss(query, route_index, best_index, reward, w["down"], w["up"], unit, temperature, held)
            w[which][idx] -= 2 * eps
            lo = routing_module.loss(query, route_index, best_index, reward, w["down"], w["up"], unit, temperature, held)
            numeric[idx] = (hi - lo) / (2 * eps)
        scale = max(1.0, float(np.abs(numeric).max()))
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5 * scale, err_msg=which)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 40),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.1, 1.0, 10.0, 1000.0]),
)
def test_loss_slopes_are_bounded_by_one(k, n, seed, temperature):
    """|dL/dz_k| <= 1 for every row, full information or bandit, any reward in [0, 1] (README, "Which rule")."""
    rng = np.random.default_rng(seed)
    z = temperature * rng.uniform(-1, 1, (n, k))
    z[0, 0] = temperature  # a confident router too
    route_index = rng.integers(0, k, n)
    best_index = np.where(rng.random(n) < 0.5, rng.integers(0, k, n), -1)
    reward = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n), rng.random(n))
    c = routing_module._loss_slopes(z, route_index, best_index, reward)
    assert np.isfinite(c).all() and np.abs(c).max() <= 1.0 + 1e-12


@pytest.mark.parametrize("rank", [1, 2])
def test_a_query_mapped_below_the_minimum_norm_teaches_nothing_on_either_learner(rank):
    """|f(q^)| < 1e-6: no gradient (the signal still counts), in numpy and in C alike; just above it, a clipped one."""
    from sona_shm.learn.learner import learn_block

    _speedups()
    h, k = 16, 3
    rng = np.random.default_rng(rank)
    unit = rng.standard_normal((k, h))
    unit = (unit / np.linalg.norm(unit, axis=1, keepdims=True)).astype(F32)
    qhat = np.zeros(h, np.float64)
    qhat[0] = 1.0  # exact in float32, so f(q^) = (1 - (1 - eps)) q^ = eps q^ up to one rounding
    layout = Layout(EngineConfig(hidden_dim=h, rank=rank, rule="routing", routes=k, max_steps=1, attention_dim=0))
    for eps, teaches in ((2**-24, False), (2**-12, True)):
        case = dict(h=h, rank=rank, lr=1.0, threshold=10, unit=unit, temperature=10.0)
        case["down"] = np.zeros((rank, h), F32)
        case["up"] = np.zeros((rank, h), F32)
        case["down"][0] = qhat
        case["up"][0] = -(1.0 - eps) * np.sqrt(rank) * qhat
        case.update(query=qhat[None].astype(F32), route_index=np.array([1]), best_index=np.array([2]), reward=np.array([1.0], F32))
        c, py = _learner(case), _learner(case)
        assert learn_block(c, layout, _slots(case, layout), 1)[:2] == (0, [])
        py.learn_feedback(case["query"], case["route_index"], case["best_index"], case["reward"])
        for learner in (c, py):
            assert learner.pending == 1 and learner.metrics.signals_accumulated == 1
            # Above the minimum it teaches, but clipped: tau / |f| is taken at |f| = GRADIENT_FLOOR
            # (the exact gradient here would be ~1e5): s |d.q| (tau / 0.1) |P w| <= 1 * 1 * 100 * 2.
            assert learner.grad_up.any() == teaches and (teaches or not learner.grad_down.any())
            assert np.abs(learner.grad_up).max() <= 200 and np.abs(learner.grad_down).max() <= 200
