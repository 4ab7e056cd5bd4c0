"""Property-based: malformed input at record(), forward() and on_trajectory() raises naming the
argument and changes nothing; finite input, however extreme, never makes the weights non-finite."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sona_shm import InstantLoop, InvalidInputError, Step, Trajectory
from sona_shm.shm.layout import LANE_CONTROL_BYTES

from conftest import SMALL
from support import run

pytestmark = pytest.mark.guarantee("bad-input-changes-nothing")

H, S, A = SMALL["hidden_dim"], SMALL["max_steps"], SMALL["attention_dim"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class WeirdSequence(Sequence):
    """A Sequence whose len() lies: negative, not an int, or absurdly large."""

    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        raise IndexError(i)


not_numbers = st.sampled_from([None, "abc", b"xy", {"a": 1}, object(), {1.0}, print, Decimal("1"), 1 + 2j])
bad_scalars = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e300, True, False, np.float64("nan"), np.float32("inf"), [1.0], "1"]),
    not_numbers,
)


def arrays_of(length: int) -> st.SearchStrategy:
    return st.lists(st.floats(-10, 10, width=32), min_size=length, max_size=length).map(lambda v: np.array(v, np.float32))


def bad_vectors(exact: int | None, at_most: int | None) -> st.SearchStrategy:
    """Vectors refused where ``exact`` values (or up to ``at_most``) are expected."""
    good = exact if exact is not None else at_most
    lengths = st.integers(0, 3 * H).filter(lambda n: n != exact if exact is not None else n > at_most)
    non_finite = st.tuples(arrays_of(max(good, 1)), st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf, 1e39])).map(_poison)
    return st.one_of(
        lengths.map(lambda n: np.ones(n, np.float32)),  # wrong length
        lengths.map(lambda n: [0.5] * n),
        st.just(np.zeros(10**6 if exact is not None else 10**5, np.float32)),  # huge
        st.sampled_from(
            [
                np.ones((2, good + 1)),  # 2-D, and not a batch forward() would take either
                np.float32(1.0),  # 0-d
                np.ones(good, complex),
                np.ones(good, bool),
                np.array(["1"] * good),
                np.array([object()] * good),
                np.array([1] * good, dtype="datetime64[s]"),
                [[1.0, 2.0], [3.0]],  # ragged
                [1.0] * (good - 1) + ["x"],
                [2**70] * good,  # not representable: object dtype
                "abcdefgh",
                b"\0" * 4 * good,
            ]
        ),
        non_finite,
        not_numbers,
    )


def _poison(args):
    arr, at, value = args
    arr = arr.astype(np.float64)
    arr[at % len(arr)] = value
    return arr


def valid_step(n_act: int = H, n_att: int = 2) -> Step:
    return Step(np.linspace(-1, 1, n_act, dtype=np.float32), np.full(n_att, 0.5, np.float32), 0.5)


def valid_trajectory(n_steps: int = 2) -> Trajectory:
    return Trajectory(np.linspace(0, 1, H, dtype=np.float32), [valid_step() for _ in range(n_steps)], 0.8, latency_us=5, route="r")


@st.composite
def malformed(draw, *, bounded: bool) -> tuple[object, str]:
    """``(trajectory, label the error must start with)``; ``bounded``: the engine limits steps and attention."""
    n = draw(st.integers(1, S))
    t = valid_trajectory(n)
    i = draw(st.integers(0, n - 1))
    fields = ["query", "activations", "reward", "quality", "latency_us", "route", "id", "steps", "step", "trajectory"]
    if bounded:
        fields += ["attention", "too_many_steps"]
    field = draw(st.sampled_from(fields))
    if field == "query":
        t.query = draw(bad_vectors(H, None))
        return t, "query: "
    if field == "activations":
        t.steps[i].activations = draw(bad_vectors(None, H))
        return t, f"steps[{i}].activations: "
    if field == "attention":
        t.steps[i].attention = draw(bad_vectors(None, A).filter(lambda v: v is not None))
        return t, f"steps[{i}].attention: "
    if field == "reward":
        t.steps[i].reward = draw(bad_scalars)
        return t, f"steps[{i}].reward: "
    if field == "quality":
        t.quality = draw(bad_scalars)
        return t, "quality: "
    if field == "latency_us":
        t.latency_us = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64), bad_scalars))
        return t, "latency_us: "
    if field == "route":
        not_text = not_numbers.filter(lambda v: not isinstance(v, str | None))
        t.route = draw(st.one_of(st.text(min_size=65, max_size=80), st.just("é" * 33), not_text))
        return t, "route: "
    if field == "id":
        t.id = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64), st.sampled_from([1.5, True, "1", math.nan])))
        return t, "id: "
    if field == "steps":
        t.steps = draw(
            st.sampled_from([None, "steps", {"a": 1}, 3, (s for s in []), WeirdSequence(-1), WeirdSequence(2**70), WeirdSequence(1.5)])
        )
        return t, "steps: "
    if field == "too_many_steps":
        t.steps = [valid_step()] * draw(st.integers(S + 1, 10_000))
        return t, "steps: "
    if field == "step":
        t.steps[i] = draw(st.one_of(st.sampled_from([(1.0, None, 1.0), {"reward": 1}, [0.0] * H]), not_numbers))
        return t, f"steps[{i}]: "
    return draw(st.one_of(st.sampled_from([(np.ones(H), [], 1.0), {"query": np.ones(H)}, np.ones(H)]), not_numbers)), "trajectory: "


def state(client) -> bytes:
    """Every byte an attached client or the flusher publishes: header lines, both ledger copies, lane controls."""
    layout = client.layout
    return bytes(client._segment.buf[: layout.lanes_offset + layout.lanes * LANE_CONTROL_BYTES])


def test_record_refuses_malformed_trajectories_and_changes_nothing(engine):
    flusher = engine(lane_slots=4)
    empty = engine.attach()
    full = engine.attach()
    for _ in range(4):
        assert full.record(valid_trajectory())  # never learned: this lane stays full
    before = state(empty)

    @SETTINGS
    @given(malformed(bounded=True), st.sampled_from([0.0, 0.01]))
    def check(case, timeout):
        traj, label = case
        for client in (empty, full):  # a full lane must raise too, not count a drop
            try:
                client.record(traj, timeout=timeout)
            except InvalidInputError as exc:
                assert str(exc).startswith(label), (label, str(exc))
            else:
                raise AssertionError(f"accepted a trajectory with a bad {label!r}")
            assert state(client) == before

    check()
    assert flusher.scan() == 4  # only the four valid ones ever committed


def test_forward_refuses_malformed_vectors_and_changes_nothing(engine):
    flusher = engine()
    client = engine.attach()
    loop = InstantLoop(H, SMALL["rank"])
    for t in [valid_trajectory()] * 10:
        client.record(t)
    flusher.scan()
    before = state(client)

    @SETTINGS
    @given(st.one_of(bad_vectors(H, None), st.sampled_from([np.ones((3, H + 1)), np.ones((2, 3, H)), np.full((2, H), np.nan)])))
    def check(x):
        for target in (client, loop):
            try:
                target.forward(x)
            except InvalidInputError as exc:
                assert str(exc).startswith("x: expected"), str(exc)
            else:
                raise AssertionError(f"forward accepted {x!r}")
        assert state(client) == before

    check()


def test_on_trajectory_refuses_malformed_trajectories_and_changes_nothing():
    loop = InstantLoop(H, 2, flush_threshold=3, capacity=4)
    for t in [valid_trajectory()] * 4:
        loop.on_trajectory(t)

    def snapshot():
        return (loop.up.tobytes(), loop._learner.grad_up.tobytes(), loop.pending, loop.metrics, loop.buffer_stats(), loop._next_id)

    before = snapshot()

    @SETTINGS
    @given(malformed(bounded=False))
    def check(case):
        traj, label = case
        try:
            loop.on_trajectory(traj)
        except InvalidInputError as exc:
            assert str(exc).startswith(label), (label, str(exc))
        else:
            raise AssertionError(f"accepted a trajectory with a bad {label!r}")
        assert snapshot() == before

    check()


extreme = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def extreme_trajectories(draw) -> Trajectory:
    n = draw(st.integers(0, S))
    steps = [
        Step(
            np.array(draw(st.lists(extreme, min_size=1, max_size=H)), np.float32),
            None,
            draw(extreme),
        )
        for _ in range(n)
    ]
    return Trajectory(np.array(draw(st.lists(extreme, min_size=H, max_size=H)), np.float32), steps, draw(extreme))


def test_finite_input_never_makes_the_weights_non_finite(engine):
    flusher = engine(flush_threshold=1, lr=1e30, lane_slots=64)
    client = engine.attach()
    loop = InstantLoop(H, 2, lr=1e30, flush_threshold=1)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(extreme_trajectories(), min_size=1, max_size=4))
    def check(batch):
        with np.errstate(over="ignore"):  # the record path's finiteness scan may overflow; it falls back exactly
            for t in batch:
                assert client.record(t)
                loop.on_trajectory(t)
        flusher.scan()
        up, grad_up = client._ledger.read("up", "grad_up")
        assert np.isfinite(up).all() and np.isfinite(grad_up).all()
        assert np.isfinite(loop.up).all() and np.isfinite(loop._learner.grad_up).all()
        # The flusher's learner (C when built) and InstantLoop's (numpy) sum in different
        # orders: they agree to float32 rounding of the largest terms, and both saturate.
        scale = float(np.abs(loop.up).max())
        np.testing.assert_allclose(up, loop.up, rtol=1e-5, atol=1e-5 * scale)

    check()


WARNINGS_SCRIPT = """
import sys
import numpy as np
from sona_shm import InstantLoop, Step, Trajectory, attach
from sona_shm.shm import lane
from sona_shm.engine import client
from sona_shm.engine.flusher import Flusher
from sona_shm.shm.layout import EngineConfig
if sys.argv[2] == "python":
    lane._speedups = client._speedups = None
name, big = sys.argv[1], np.full(16, 2**64 - 1, np.uint64)
flusher = Flusher(name, config=EngineConfig(hidden_dim=16, lanes=2, lane_slots=8, capacity=8, max_steps=2, attention_dim=4))
with attach(name) as c:
    ok = [c.record(Trajectory(big, [Step(big, np.full(4, 2**64 - 1, np.uint64), 1.0)], 1.0)) for _ in range(3)]
    c.forward(big)
    c.forward(np.stack([big, big]))
    flusher.scan()
InstantLoop(hidden_dim=16).on_trajectory(Trajectory(big, [Step(big, None, 1.0)], 1.0))
flusher.close()
print(ok)
"""


@pytest.mark.guarantee("bad-input-changes-nothing")
@pytest.mark.parametrize("path", ["c", "python"])
def test_uint64_max_input_is_accepted_without_a_numpy_warning(name, path):
    """Its float32 square overflows the fast finiteness check; numpy said so on stderr (a RuntimeWarning)."""
    done = run([sys.executable, "-c", WARNINGS_SCRIPT, name, path], timeout=120)  # the default warning filters
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True, True, True]" and done.stderr == ""


K = 4  #: routes of the routing engine below


def bad_route_indices() -> st.SearchStrategy:
    return st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=K),
        st.sampled_from([True, False, 1.0, "1", "code", b"\x01", np.float64(1), np.int64(K), np.uint16(65535), [1], math.nan]),
        not_numbers.filter(lambda v: v is not None),
    )


@st.composite
def malformed_feedback(draw) -> tuple[Trajectory, str]:
    """A feedback trajectory a routing engine with K routes refuses, and the label the error must start with."""
    t = valid_trajectory(draw(st.integers(0, 2)))
    t.route_index = draw(st.one_of(st.none(), st.integers(0, K - 1)))
    t.best_index = draw(st.integers(0, K - 1)) if t.route_index is None else draw(st.one_of(st.none(), st.integers(0, K - 1)))
    field = draw(st.sampled_from(["route_index", "best_index", "reward"]))
    if field == "reward":  # a bandit feedback's quality is its reward, in [0, 1] under the routing rule
        t.route_index, t.best_index = draw(st.integers(0, K - 1)), None
        t.quality = draw(
            st.one_of(
                st.floats(max_value=-1e-45, allow_nan=False, allow_infinity=False),
                st.floats(min_value=1.0000001, allow_nan=False, allow_infinity=False),
                st.sampled_from([math.nan, math.inf, -math.inf, 2, -1]),
            )
        )
        return t, "quality: "
    setattr(t, field, draw(bad_route_indices()))
    return t, f"{field}: "


def test_feedback_trajectories_are_refused_alike_by_both_writers_and_the_loop(engine, monkeypatch):
    from sona_shm.learn.routes import RouteTable
    from sona_shm.shm import lane as lane_module

    table = RouteTable.build(np.random.default_rng(15).standard_normal((K, H)), ["a", "b", "c", "d"])
    flusher = engine(routes=table, rule="routing")
    client = engine.attach()
    loop = InstantLoop(H, 2, rule="routing", routes=table.vectors, route_names=table.names, capacity=4)
    assert client.record(valid_trajectory()) and loop.on_trajectory(valid_trajectory()) is None  # lane claimed
    before, loop_before = state(client), (loop.up.tobytes(), loop.metrics, loop.buffer_stats())

    @SETTINGS
    @given(malformed_feedback())
    def check(case):
        traj, label = case
        for target in (client.record, loop.on_trajectory):
            try:
                target(traj)
            except InvalidInputError as exc:
                assert str(exc).startswith(label), (label, str(exc))
            else:
                raise AssertionError(f"{target} accepted a feedback with a bad {label!r}: {traj!r}")
        assert state(client) == before and (loop.up.tobytes(), loop.metrics, loop.buffer_stats()) == loop_before

    recorded = 1
    if lane_module._speedups is not None:
        assert type(client._writer) is lane_module._speedups.LaneWriter
        check()
        monkeypatch.setattr(lane_module, "_speedups", None)
        client.release_lane()
        assert client.record(valid_trajectory())  # the lane again, with the Python writer
        recorded += 1
        before = state(client)
    assert type(client._writer) is lane_module.PyLaneWriter
    check()
    assert flusher.scan() == recorded  # only the valid ones ever committed
