"""The C twin of the routing rule v2 and of route(): the same learning and the same choices as the numpy code.

Tolerances. The C learner computes ``routing.step`` in float64 like numpy, with its sums in another (fixed) order,
so the two agree up to the rounding of those sums: the float32 state (route vectors, biases, adapter; published and
working) is compared within 1e-5 of each array's largest magnitude after 1,200 feedbacks (on every stream tried the
two have in fact been bit-identical), the float64 centre within 1e-9; counters, ``pending``, where a ``stop`` call
returns and the per-route counts exactly. Its two entry points (lane slots, arrays of rows) share one kernel: their
states are compared bit for bit. ``route()``: the index chosen and ``explored`` exactly (ties and near-ties
included), the probability within 1e-9 relative (SquareCB's gamma * tau amplifies the last-bit differences of the
float64 scores: numpy's BLAS gives two equal route rows scores a few ulps apart), the float32 scores and
``adapted`` within 1e-6 relative (float32 casts of float64 values that may differ in the last bit). Nothing here
measures time.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from sona_shm.config import EngineConfig
from sona_shm.learn import learner as learner_module
from sona_shm.learn import routes as routes_module
from sona_shm.learn import routing
from sona_shm.learn.learner import Learner, Rows, learn_block
from sona_shm.learn.routes import ACTIVE, RETIRED, TIE, Router, adapt, choose
from sona_shm.native import speedups
from sona_shm.shm.layout import Layout

F32 = np.float32

pytestmark = pytest.mark.skipif(speedups is None, reason="the C extension is not built (or SONA_SHM_PURE_PYTHON=1)")

STATE = ("route_vectors", "work_vectors", "route_bias", "work_bias", "up", "down", "work_up", "work_down")
COUNTS = ("route_chosen", "route_best", "route_reward")


# ----------------------------------------------------------------- helpers


class Stream:
    """Feedback on ``k`` unit routes: queries near a route ``y`` (cosine ~0.6), full information (``best = y``) or
    bandit (the route served is ``y`` two times in three, reward 1 if it was ``y``, sometimes a fraction), some rows
    not feedback at all, and a few zero or tiny queries."""

    def __init__(self, seed: int, h: int, k: int, n: int) -> None:
        rng = np.random.default_rng(seed)
        unit = rng.standard_normal((k, h))
        self.unit = (unit / np.linalg.norm(unit, axis=1, keepdims=True)).astype(F32)
        y = rng.integers(0, k, n)
        self.query = (self.unit[y] + rng.standard_normal((n, h)) * (1.33 / np.sqrt(h))).astype(F32)
        self.query[rng.random(n) < 0.01] = 0.0
        self.query[rng.random(n) < 0.01] *= F32(1e-30)
        served = np.where(rng.random(n) < 2 / 3, y, (y + rng.integers(1, k, n)) % k)
        kind = rng.random(n)
        full, ordinary = kind < 0.45, kind > 0.95
        self.route_index = np.where(full & (rng.random(n) < 0.5) | ~full, served, -1).astype(np.int64)
        self.best_index = np.where(full, y, -1).astype(np.int64)
        self.route_index[ordinary] = -1
        reward = np.where(rng.random(n) < 0.8, served == y, rng.random(n))
        self.quality = np.where(full, 1.0, reward).astype(F32)

    def rows(self, part: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(query, route_index, best_index, quality)`` of rows ``part``: learn_feedback's arguments."""
        return self.query[part], self.route_index[part], self.best_index[part], self.quality[part]

    def prepared(self, learner: Learner, part: slice) -> Rows:
        """Rows ``part`` as Learner.rows prepares them (for learn_rows)."""
        query, route_index, best_index, quality = self.rows(part)
        return learner.rows(query, quality, route_index, best_index)


def new_learner(stream: Stream, *, threshold: int = 30, adapter_lr: float = 0.0, lr: float = 0.03, spare: int = 2) -> Learner:
    h, k = stream.query.shape[1], len(stream.unit)
    learner = Learner(h, 2, lr, threshold, rule="routing", unit=stream.unit, temperature=10.0, adapter_lr=adapter_lr, max_routes=k + spare)
    learner.down[...] = np.random.default_rng(7).standard_normal(learner.down.shape).astype(F32) * F32(0.05)
    learner.work_down[...] = learner.down
    return learner


def slot_layout(h: int) -> Layout:
    """Lane slots of width ``h``: their format is the same under both rules (the layout of an engine without a route
    table needs none of the ledger's route fields)."""
    return Layout(EngineConfig(hidden_dim=h, rank=2, max_steps=1, attention_dim=0))


def as_slots(layout: Layout, query: np.ndarray, route_index: np.ndarray, best_index: np.ndarray, quality: np.ndarray) -> np.ndarray:
    n = len(query)
    slots = np.zeros(n, dtype=layout.slot_dtype)
    slots["seq"] = np.arange(1, n + 1)
    slots["query"], slots["quality"] = query, quality
    slots["route_index"], slots["best_index"] = route_index + 1, best_index + 1
    return slots.view(np.uint8).reshape(n, layout.slot_bytes)


def snapshot(learner: Learner) -> dict:
    out = {name: getattr(learner, name).copy() for name in (*STATE, *COUNTS, "route_centre", "route_state")}
    out["counters"] = (learner.metrics, learner.pending, learner.generation, learner.routes_used)
    return out


def assert_close(c: dict, py: dict, rtol: float = 1e-5) -> None:
    assert c["counters"] == py["counters"]
    for name in STATE:
        scale = max(1.0, float(np.abs(py[name]).max(initial=0.0)))
        np.testing.assert_allclose(c[name], py[name], rtol=rtol, atol=rtol * scale, err_msg=name)
    np.testing.assert_allclose(c["route_centre"], py["route_centre"], rtol=0, atol=1e-9, err_msg="route_centre")
    for name in (*COUNTS, "route_state"):
        np.testing.assert_array_equal(c[name], py[name], err_msg=name)


def assert_identical(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"]
    for name in (*STATE, *COUNTS, "route_centre", "route_state"):
        assert a[name].tobytes() == b[name].tobytes(), name


def learn_stream(learner: Learner, stream: Stream, cuts: list[int], monkeypatch, *, c: bool) -> None:
    """Feed the stream in the parts between ``cuts`` (InstantLoop's way: learn_feedback + count_routes), on the C
    path or numpy's; route 2 is retired and a route added after the second part."""
    monkeypatch.setattr(learner_module, "_speedups", speedups if c else None)
    bounds = [0, *cuts, len(stream.query)]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        query, route_index, best_index, quality = stream.rows(slice(lo, hi))
        learner.learn_feedback(query, route_index, best_index, quality)
        learner.count_routes(route_index, best_index, quality)
        if i == 1:
            learner.retire_route(2)
            learner.add_route(stream.unit[0] * F32(0.6) + stream.unit[1] * F32(0.8))
    monkeypatch.setattr(learner_module, "_speedups", speedups)


# ----------------------------------------------------------------- constants


def test_the_c_module_compiles_in_the_routing_rules_constants():
    names = ("BETA", "OFFSET", "BIAS_LR", "CENTRE", "PROTECT", "SPARSE", "GROWTH", "GRADIENT_FLOOR", "MIN_ADAPTED_NORM")
    for name in names:
        assert getattr(speedups, name) == getattr(routing, name), name
        assert type(getattr(speedups, name)) is type(getattr(routing, name)), name
    assert speedups.TIE == TIE and speedups.ACTIVE == ACTIVE


# ----------------------------------------------------------------- the learner


@pytest.mark.parametrize("adapter_lr", [0.0, 0.02])
@pytest.mark.parametrize("h", [61, 256])
def test_the_c_learner_learns_what_the_numpy_learner_learns(h, adapter_lr, monkeypatch):
    """1,200 feedbacks, full information and bandit (binary and fractional rewards), ordinary rows, zero and tiny
    queries, a route retired and one added midway, windows growing to 30: the same state on both paths."""
    stream = Stream(1, h, 7, 1200)
    c, py = new_learner(stream, adapter_lr=adapter_lr), new_learner(stream, adapter_lr=adapter_lr)
    cuts = [1, 250, 251, 700]
    learn_stream(c, stream, cuts, monkeypatch, c=True)
    learn_stream(py, stream, cuts, monkeypatch, c=False)
    assert c.flushes_performed > 40 and c.route_state[2] == RETIRED and c.routes_used == 8
    assert (c.up != 0).any() == (adapter_lr > 0)  # the adapter learns only with adapter_lr
    assert_close(snapshot(c), snapshot(py))


def test_windows_grow_by_one_every_growth_signals_up_to_the_threshold(monkeypatch):
    stream = Stream(2, 16, 4, 3000)
    signals = int(((stream.route_index >= 0) | (stream.best_index >= 0)).sum())
    learner = new_learner(stream, threshold=25)
    learner.learn_feedback(*stream.rows(slice(None)))
    opened, flushes = 0, 0
    while opened + routing.window_size(opened, 25) <= signals:
        opened += routing.window_size(opened, 25)
        flushes += 1
    assert (learner.flushes_performed, learner.updates_applied, learner.pending) == (flushes, opened, signals - opened)
    assert learner.signals_accumulated == signals and learner.trajectories_processed == len(stream.query)


def test_on_slots_and_on_rows_the_same_kernel_gives_the_same_bits():
    """learn_routing over lane slots (with the flusher's per-route counts) and learn_routing_rows over the same rows
    (counted by the learner), cut at the same places."""
    stream = Stream(3, 40, 6, 900)
    layout = slot_layout(40)
    raw = as_slots(layout, *stream.rows(slice(None)))
    on_slots, on_rows = new_learner(stream, adapter_lr=0.01), new_learner(stream, adapter_lr=0.01)
    for lo, hi in ((0, 5), (5, 333), (333, 334), (334, 900)):
        assert learn_block(on_slots, layout, raw[lo:hi], lo + 1) == (0, [], hi - lo)
        assert on_rows.learn_rows(stream.prepared(on_rows, slice(lo, hi))) == hi - lo
    assert_identical(snapshot(on_slots), snapshot(on_rows))


def test_with_stop_both_learners_return_at_the_same_full_windows(monkeypatch):
    """stop=True: a call returns right after the signal that fills the window, applying nothing; the caller closes
    and applies it. The C learner (rows and slots) stops where numpy does, and ends in the same state."""
    stream = Stream(4, 24, 5, 700)
    layout = slot_layout(24)
    raw = as_slots(layout, *stream.rows(slice(None)))
    results = {}
    for path in ("numpy", "rows", "slots"):
        monkeypatch.setattr(learner_module, "_speedups", None if path == "numpy" else speedups)
        learner = new_learner(stream, threshold=9)
        rows = stream.prepared(learner, slice(None))
        at, cuts = 0, []
        while at < len(rows):
            published = (learner.route_vectors.copy(), learner.route_bias.copy())
            if path == "slots":
                _, corrupt, taken = learn_block(learner, layout, raw[at:], at + 1, stop=True)
                assert corrupt == []
            else:
                taken = learner.learn_rows(rows, at, stop=True)
            assert np.array_equal(published[0], learner.route_vectors) and np.array_equal(published[1], learner.route_bias)
            at += taken
            cuts.append((taken, learner.pending))
            if learner.window_full:
                learner.apply(learner.close_window())
        results[path] = (cuts, snapshot(learner))
    assert results["numpy"][0] == results["rows"][0] == results["slots"][0]
    assert len(results["numpy"][0]) > 50
    assert_close(results["rows"][1], results["numpy"][1])
    assert_identical(results["rows"][1], results["slots"][1])


def test_a_feedback_on_a_retired_route_or_a_zero_query_is_a_signal_that_teaches_nothing():
    stream = Stream(5, 16, 4, 1)
    learner = new_learner(stream, threshold=100)
    learner.retire_route(1)
    before = snapshot(learner)
    q = stream.unit[0][None].copy()
    for query, route, best in ((q, 1, -1), (q, -1, 1), (q, 0, 1), (np.zeros_like(q), 0, -1), (np.zeros_like(q), -1, 2)):
        learner.learn_feedback(query, np.array([route]), np.array([best]), np.ones(1, F32))
    after = snapshot(learner)
    assert learner.signals_accumulated == learner.flushes_performed == 5  # the first windows are one signal each
    for name in (*STATE, "route_centre"):
        assert after[name].tobytes() == before[name].tobytes(), name
    learner.learn_feedback(q, np.array([0]), np.array([-1]), np.zeros(1, F32))  # an active route that failed: it learns
    assert not np.array_equal(learner.work_vectors, before["work_vectors"]) and learner.route_centre.any()


def test_learn_routing_rows_refuses_route_indices_beyond_the_routes_in_use_before_learning_anything():
    stream = Stream(6, 8, 4, 10)
    learner = new_learner(stream, spare=3)
    query, route_index, best_index, quality = stream.rows(slice(None))
    before = snapshot(learner)
    for field, index in (("route", route_index), ("best", best_index)):
        bad = index.copy()
        bad[7] = 4  # a free row of the table (max_routes 7), not a route in use
        args = (bad, best_index) if field == "route" else (route_index, bad)
        with pytest.raises(ValueError, match="row 7 names route 4, expected one below routes_used = 4"):
            speedups.learn_routing_rows(query, *args, quality, 0, learner, False)
        assert_identical(snapshot(learner), before)
    assert speedups.learn_routing_rows(query, route_index, best_index, quality, 8, learner, False)[0] == 2  # from start on


def test_a_query_that_is_not_finite_teaches_nothing_on_rows_and_is_corrupt_in_a_slot():
    stream = Stream(7, 8, 3, 4)
    query, route_index, best_index, quality = stream.rows(slice(None))
    route_index[:], best_index[:], quality[:] = 0, -1, 1.0
    query = query.copy()
    query[1, 3], query[2, 0] = np.nan, np.inf
    learner = new_learner(stream, threshold=100)
    learner.signals_accumulated = 1000  # the window now is 50 signals: nothing is applied below
    before = snapshot(learner)
    learner.learn_feedback(query[1:3], route_index[1:3], best_index[1:3], quality[1:3])
    assert learner.signals_accumulated == 1002 and learner.pending == 2
    for name in (*STATE, "route_centre"):
        assert getattr(learner, name).tobytes() == before[name].tobytes(), name
    layout = slot_layout(8)
    raw = as_slots(layout, query, route_index, best_index, quality)
    plain = as_slots(layout, query, np.full(4, -1), np.full(4, -1), quality)  # not feedback: its query is not read
    assert learn_block(learner, layout, raw, 1) == (0, [1, 2], 4)
    assert learn_block(learner, layout, plain, 1) == (0, [], 4)
    assert learner.signals_accumulated == 1004 and learner.trajectories_processed == 2 + 2 + 4


def test_slots_failing_their_checks_are_listed_and_learned_from_nothing():
    stream = Stream(8, 8, 4, 6)
    query, route_index, best_index, quality = stream.rows(slice(None))
    route_index[:], best_index[:], quality[:] = 1, -1, 0.5
    layout = slot_layout(8)
    learner = new_learner(stream, spare=4)
    raw = as_slots(layout, query, route_index, best_index, quality)
    rec = raw.view(layout.slot_dtype)[:, 0]
    rec["seq"][0] = 99  # a stamp out of order
    rec["route_index"][1] = 5  # route 4: a free row, not a route in use
    rec["quality"][2] = 1.5  # a bandit reward outside [0, 1]
    rec["best_index"][3], rec["quality"][3] = 2, 7.0  # full information: any quality
    assert learn_block(learner, layout, raw, 1) == (0, [0, 1, 2], 6)
    assert learner.signals_accumulated == 3 and learner.route_chosen[:4].tolist() == [0, 3, 0, 0]


def test_learner_state_that_the_c_learner_cannot_read_is_refused_naming_it_and_left_alone():
    stream = Stream(9, 16, 4, 20)
    query, route_index, best_index, quality = stream.rows(slice(None))
    raw = as_slots(slot_layout(16), query, route_index, best_index, quality)
    geometry = slot_layout(16).geometry
    for name in ("up", "work_up", "work_down", "route_vectors", "work_vectors", "route_bias", "work_bias", "route_centre", "route_state"):
        value = getattr(new_learner(stream), name)
        bad_values = [value[None], value.astype(np.float64 if value.dtype != np.float64 else F32)]
        if name != "route_state":  # (a shorter route_state is a smaller table: route_vectors is named, below)
            bad_values.append(value[..., :-1])
        if value.dtype.itemsize > 1:  # (a byte has no byte order or alignment)
            bad_values += [value.astype(value.dtype.newbyteorder()), _misaligned(value)]
        if name != "route_state":
            bad_values.append(np.require(value, requirements="C").copy())
            bad_values[-1].flags.writeable = False
        for bad in bad_values:
            learner = new_learner(stream)
            setattr(learner, name, bad)
            before = bad.copy()
            with pytest.raises(ValueError, match=f"the learner's {name} must be"):
                speedups.learn_routing_rows(query, route_index, best_index, quality, 0, learner, False)
            with pytest.raises(ValueError, match=f"the learner's {name} must be"):
                speedups.learn_routing(raw, geometry, 1, learner, False)
            assert bad.tobytes() == before.tobytes(), name
    learner = new_learner(stream)
    learner.route_state = learner.route_state[:-1]
    with pytest.raises(
        ValueError, match="route_vectors must be .* float32\\[max_routes, h\\] \\(h = 16, max_routes = len\\(route_state\\) = 5\\)"
    ):
        speedups.learn_routing(raw, geometry, 1, learner, False)
    learner = new_learner(stream)
    learner.routes_used = 7
    with pytest.raises(ValueError, match="routes_used must be in \\[1, max_routes = 6\\], got 7"):
        speedups.learn_routing_rows(query, route_index, best_index, quality, 0, learner, False)
    learner = new_learner(stream)
    learner.temperature = 0.0
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        speedups.learn_routing(raw, geometry, 1, learner, False)
    with pytest.raises(ValueError, match="learn_routing_rows\\(\\): expected native"):
        speedups.learn_routing_rows(query.astype(np.float64), route_index, best_index, quality, 0, new_learner(stream), False)


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable copy of ``a`` whose data starts one byte off alignment."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = np.ndarray(a.shape, a.dtype, buffer=raw.data, offset=1)
    out[...] = a
    return out


def test_the_reference_rule_reports_the_signals_of_the_windows_it_applied():
    layout = slot_layout(8)
    rng = np.random.default_rng(10)
    slots = np.zeros(23, dtype=layout.slot_dtype)
    slots["seq"] = np.arange(1, 24)
    slots["query"] = rng.standard_normal((23, 8))
    slots["quality"] = 1.0
    learner = Learner(8, 2, 0.1, 5)
    pending, flushes, applied, width, signals, corrupt, consumed = speedups.learn_slots(
        slots.view(np.uint8).reshape(23, layout.slot_bytes), layout.geometry, 1, learner, False
    )
    assert (pending, flushes, applied, width, signals, corrupt, consumed) == (3, 4, 20, 0, 23, [], 23)


# ----------------------------------------------------------------- route()


class Fixed:
    """An rng whose random() is the given uniform draw (choose()'s side of route()'s ``u``)."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


MODES = (("greedy", 0, 0.0), ("epsilon", 1, 0.3), ("softmax", 2, 0.0), ("squarecb", 3, 1000.0), ("squarecb", 3, 7.0))


def router(seed: int, k: int = 8, h: int = 256, *, retired: tuple[int, ...] = (), temperature: float = 10.0) -> Router:
    """A learned-looking router: route vectors near unit ones, biases, a non-zero adapter."""
    rng = np.random.default_rng(seed)
    unit = rng.standard_normal((k, h))
    vectors = (unit / np.linalg.norm(unit, axis=1, keepdims=True) * rng.uniform(0.5, 2.0, (k, 1))).astype(F32)
    active = np.ones(k, np.uint8)
    active[list(retired)] = 0
    return Router(
        (rng.standard_normal((2, h)) * 0.05).astype(F32),
        (rng.standard_normal((2, h)) * 0.05).astype(F32),
        vectors,
        rng.uniform(-2, 2, k).astype(F32),
        active,
        tuple(f"r{i}" for i in range(k)),
        temperature,
    )


def c_route(r: Router, x: np.ndarray, mode: int, parameter: float, u: float):
    return speedups.route(x, r.down, r.up_scaled, r.vectors, r.bias, r.active, r.names, mode, parameter, r.temperature, u)


def assert_same_choice(r: Router, x: np.ndarray, mode: str, code: int, parameter: float, u: float) -> None:
    got = c_route(r, x, code, parameter, u)
    want = choose(r, x, mode=mode, parameter=parameter, rng=Fixed(u))
    assert type(got) is type(want)
    assert (got.index, got.name, got.explored) == (want.index, want.name, want.explored), (mode, u)
    assert got.probability == pytest.approx(want.probability, rel=1e-9, abs=1e-15)
    assert got.scores.dtype == want.scores.dtype == F32 and got.adapted.dtype == F32
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    np.testing.assert_allclose(got.adapted, want.adapted, rtol=1e-6)
    assert np.array_equal(np.isinf(got.scores), np.isinf(want.scores))


@pytest.mark.parametrize("retired", [(), (0, 5)])
def test_route_chooses_what_choose_chooses_in_every_mode(retired):
    r = router(11, retired=retired)
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal(256).astype(F32) * F32(scale) for scale in (1e-3, 1.0, 1e3)]
    xs += [r.vectors[1] * F32(3), np.zeros(256, F32)]  # near a route; a zero query scores the biases alone
    for x in xs:
        for mode, code, parameter in MODES:
            for u in (0.0, 0.03, 0.5, 0.97, 1 - 2**-53, *rng.random(6).tolist()):
                assert_same_choice(r, x, mode, code, parameter, u)


def test_route_never_chooses_a_retired_route():
    r = router(13, k=5, h=32, retired=(1, 3))
    x = r.vectors[1].copy()  # the best match is retired
    for code, parameter in ((1, 1.0), (2, 0.0), (3, 1.0)):
        chosen = {c_route(r, x, code, parameter, u).index for u in np.linspace(0, 1, 200, endpoint=False)}
        assert chosen == {0, 2, 4}
    choice = c_route(r, x, 0, 0.0, -1.0)
    assert choice.index != 1 and np.isneginf(choice.scores[[1, 3]]).all() and np.isfinite(choice.scores[[0, 2, 4]]).all()
    r = router(13, k=5, h=32, retired=(0, 1, 2, 3, 4))
    assert c_route(r, x, 0, 0.0, -1.0) is None  # no route active: the Python path says what is wrong


@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_ties_and_near_ties_are_decided_alike_on_both_paths(temperature):
    """Equal route vectors; scores apart by the bias term alone: 0 (a tie), 1e-10 (a tie: below TIE = 1e-9) or
    1e-8 (not a tie). A tie goes to the lowest index on both paths."""
    rng = np.random.default_rng(14)
    h, scale = 64, routing.BETA / temperature
    x = rng.standard_normal(h).astype(F32)
    v = rng.standard_normal(h).astype(F32)
    for gaps in ((0.0, 0.0, 0.0), (0.0, 1e-10, 0.0), (1e-10, 0.0, 1e-10), (0.0, 1e-8, 0.0), (1e-8, 0.0, 2e-8), (0.0, 1e-10, 1e-8)):
        bias = np.array([g / scale for g in gaps], F32)
        r = Router(
            np.zeros((2, h), F32), np.zeros((2, h), F32), np.tile(v, (3, 1)), bias, np.ones(3, np.uint8), ("a", "b", "c"), temperature
        )
        expected = next(i for i, g in enumerate(gaps) if g >= max(gaps) - TIE)
        assert routes_module.best_of(routes_module.scores(x, r)) == expected
        for mode, code, parameter in MODES:
            for u in (0.0, 0.4, 0.9):
                assert_same_choice(r, x, mode, code, parameter, u)
        assert c_route(r, x, 0, 0.0, -1.0).index == expected


def test_huge_finite_queries_give_finite_scores_and_adapted_vectors_on_both_paths():
    r = router(15, k=4, h=16)
    r = Router(r.down * F32(1e3), r.up_scaled * F32(1e3), r.vectors, r.bias, r.active, r.names, r.temperature)
    rng = np.random.default_rng(16)
    for x in (np.full(16, 1e38, F32), np.full(16, -3.4e38, F32), (rng.choice([-1, 1], 16) * 3.4e38).astype(F32), np.full(16, 1e-45, F32)):
        for mode, code, parameter in MODES:
            got = c_route(r, x, code, parameter, 0.5)
            want = choose(r, x, mode=mode, parameter=parameter, rng=Fixed(0.5))
            for choice in (got, want):
                assert np.isfinite(choice.scores).all() and np.isfinite(choice.adapted).all()
            assert_same_choice(r, x, mode, code, parameter, 0.5)
        np.testing.assert_array_equal(speedups.adapt(x, r.down, r.up_scaled), adapt(x, r.down, r.up_scaled))


def test_adapt_is_routes_adapt_in_float64_for_vectors_batches_and_strided_rows():
    r = router(17, k=2, h=48)
    rng = np.random.default_rng(18)
    batch = (rng.standard_normal((9, 96)) * np.logspace(-30, 30, 9)[:, None]).astype(F32)[:, ::2]
    np.testing.assert_allclose(speedups.adapt(batch, r.down, r.up_scaled), adapt(batch, r.down, r.up_scaled), rtol=1e-6)
    np.testing.assert_allclose(
        speedups.adapt(batch[3], r.down[:1], r.up_scaled[:1]), adapt(batch[3], r.down[:1], r.up_scaled[:1]), rtol=1e-6
    )
    bad = batch.copy()
    bad[4, 2] = np.nan
    assert speedups.adapt(bad, r.down, r.up_scaled) is None and speedups.adapt(batch[0].astype(np.float64), r.down, r.up_scaled) is None


def test_route_hands_back_what_it_does_not_take_and_refuses_bad_tables():
    r = router(19, k=3, h=8)
    x = np.ones(8, F32)
    for odd in (x.astype(np.float64), np.ones(9, F32), np.array([1, 2, 3, 4, 5, 6, 7, np.inf], F32), [1.0] * 8, x[None]):
        assert c_route(r, odd, 0, 0.0, -1.0) is None
    strided = np.ones(16, F32)[::2]
    assert c_route(r, strided, 0, 0.0, -1.0).index == c_route(r, x, 0, 0.0, -1.0).index
    args = [x, r.down, r.up_scaled, r.vectors, r.bias, r.active, r.names, 0, 0.0, r.temperature, -1.0]
    bad_cases = {
        3: (r.vectors.astype(">f4"), _misaligned(r.vectors), r.vectors[:, :4], r.vectors.astype(np.float64)),
        4: (r.bias[:2], r.bias.astype(np.float64)),
        5: (r.active[:2], r.active.astype(np.int64)),
        6: (r.names[:2], list(r.names)),
        7: (4, -1),
        8: (float("nan"),),
        9: (0.0, float("inf")),
        10: (1.0, float("nan")),
    }
    for at, values in bad_cases.items():
        for value in values:
            bad = list(args)
            bad[at] = value
            if at == 8:
                bad[7] = 1  # epsilon, which must be in [0, 1]
            with pytest.raises(ValueError, match="route\\(\\): "):
                speedups.route(*bad)
    assert speedups.route(*args[:5], r.active.astype(bool), *args[6:]).index == c_route(r, x, 0, 0.0, -1.0).index


def test_route_draws_with_its_own_generator_and_a_forked_child_draws_apart():
    """u < 0: route() draws from its own generator, reseeded in a forked child (gunicorn's workers are forked from
    one master): two children and the parent draw three different sequences."""
    r = router(20, k=8, h=16)
    x = np.ones(16, F32)

    def sequence() -> bytes:
        return bytes(c_route(r, x, 1, 1.0, -1.0).index for _ in range(256))  # epsilon 1: uniform over the 8 routes

    children = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(read)
                os.write(write, sequence())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            children.append(pipe.read())
        assert os.waitpid(pid, 0)[1] == 0
    mine = sequence()
    assert len(children[0]) == len(children[1]) == 256
    assert len({children[0], children[1], mine}) == 3
    assert set(mine) == set(range(8))  # and a uniform draw, not a constant (a route missing from 256: p = 8 (7/8)^256 < 1e-13)
    assert random.Random(0).random() == random.Random(0).random()  # (Python's own generators are untouched)
