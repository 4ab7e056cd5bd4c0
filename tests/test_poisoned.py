"""Poisoned slots and heads: memory written outside sona_shm is counted as corrupt, never learned, never a stall.

A process with write access to the segment (the mode is the security boundary) can
scribble into a published slot or a lane head. The flusher checks the values it learns
from where it learns them: one NaN quality once made every worker's forward() return NaN
for good, and a lane head of 2**63 stopped the lane forever.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from sona_shm import InstantLoop, Step, Trajectory
from sona_shm.engine import flusher as flusher_module
from sona_shm.learn.routes import RouteTable
from sona_shm.shm.layout import LANE_HEAD

from conftest import SMALL

pytestmark = pytest.mark.guarantee("corrupt-slots-are-counted-not-learned")

H, S, A = SMALL["hidden_dim"], SMALL["max_steps"], SMALL["attention_dim"]
F32 = np.float32
NAN, INF = float("nan"), float("inf")


def trajectories(seed: int, count: int = 10) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        steps = [Step(rng.standard_normal(H).astype(F32), rng.random(3).astype(F32), float(rng.standard_normal())) for _ in range(i % 3)]
        out.append(Trajectory(rng.standard_normal(H).astype(F32), steps, float(rng.random())))
    return out


def poke(client, index: int, offset: int, fmt: str, value) -> None:
    """Write ``value`` at byte ``offset`` of the lane slot that holds record ``index``."""
    base = client.layout.lane_slot(client.lane, index)
    struct.pack_into(fmt, client._segment.buf, base + offset, value)


def payload(layout, step: int | None = None) -> int:
    """Offset of the query (``step`` None) or of a step's activations in a slot."""
    return layout.payload_offset + (0 if step is None else 4 * layout.hidden_dim + step * layout.step_bytes)


META = 40  # layout.SLOT_HEAD_BYTES: the per-step (reward, act_len, att_len) start here

#: (what, record index, byte offset (a function of the layout), struct format, value): each makes one slot corrupt.
#: Record i has i % 3 steps (trajectories()): 3 and 6 have none, 1, 4, 7 one, 2, 5, 8 two.
REFERENCE_POISON = [
    ("stamp", 4, lambda lay: 0, "<Q", 999),
    ("quality NaN", 4, lambda lay: 24, "<f", NAN),
    ("quality Inf", 2, lambda lay: 24, "<f", INF),
    ("reward NaN", 5, lambda lay: META + 8, "<f", NAN),
    ("activation Inf", 4, lambda lay: payload(lay, 0) + 12, "<f", INF),
    ("activation NaN, 2nd step", 8, lambda lay: payload(lay, 1), "<f", NAN),
    ("query NaN, no steps", 3, lambda lay: payload(lay), "<f", NAN),
    ("n_steps past max_steps", 6, lambda lay: 28, "<H", S + 1),
    ("route_len past 64", 4, lambda lay: 30, "<H", 65),
    ("act_len past hidden_dim", 4, lambda lay: META + 4, "<H", H + 1),
    ("att_len past attention_dim", 5, lambda lay: META + 14, "<H", A + 1),
    ("route_index past the table", 1, lambda lay: 32, "<H", 1),  # the engine has no routes
]


@pytest.mark.parametrize("what, index, offset, fmt, value", REFERENCE_POISON, ids=[p[0] for p in REFERENCE_POISON])
@pytest.mark.parametrize("path", ["C", "numpy"])
def test_a_poisoned_slot_is_counted_and_the_rest_learned_exactly(engine, monkeypatch, what, index, offset, fmt, value, path):
    if path == "numpy":
        monkeypatch.setattr(flusher_module, "_speedups", None)
    elif flusher_module._speedups is None:
        pytest.skip("the C extension is not built")
    flusher = engine(flush_threshold=3, capacity=64)
    client = engine.attach()
    trajs = trajectories(1)
    for t in trajs:
        assert client.record(t)
    poke(client, index, offset(client.layout), fmt, value)
    assert flusher.scan() == 9 and flusher.corrupt == 1
    stats = client.stats()
    assert stats["corrupt"] == 1 and stats["trajectories_processed"] == 9
    assert stats["lanes"][0]["learned"] == 10  # the tail is past it: the lane goes on
    loop = InstantLoop(H, SMALL["rank"], SMALL["lr"], 3)
    for i, t in enumerate(trajs):
        if i != index:
            loop.on_trajectory(t)
    np.testing.assert_allclose(client._ledger.read("up")[0], loop.up, rtol=1e-5, atol=1e-6)
    assert np.isfinite(client.forward(np.ones(H, F32))).all()
    drained = client.drain()
    assert len(drained) == 9 and all(np.isfinite(t.quality) for t in drained)
    for t in trajs[index + 1 :]:  # later records are learned as usual
        assert client.record(t)
    assert flusher.scan() == 10 - index - 1 and flusher.corrupt == 1


ROUTING_POISON = [
    ("feedback query NaN", 2, lambda lay: payload(lay) + 4, "<f", NAN),
    ("bandit reward above 1", 5, lambda lay: 24, "<f", 2.0),
    ("bandit reward NaN", 4, lambda lay: 24, "<f", NAN),
    ("route_index past the table", 7, lambda lay: 32, "<H", 9),
    ("best_index past the table", 6, lambda lay: 34, "<H", 9),
]


@pytest.mark.parametrize("what, index, offset, fmt, value", ROUTING_POISON, ids=[p[0] for p in ROUTING_POISON])
@pytest.mark.parametrize("path", ["C", "numpy"])
def test_a_poisoned_feedback_is_counted_under_the_routing_rule(engine, monkeypatch, what, index, offset, fmt, value, path):
    if path == "numpy":
        monkeypatch.setattr(flusher_module, "_speedups", None)
    elif flusher_module._speedups is None:
        pytest.skip("the C extension is not built")
    rng = np.random.default_rng(3)
    v = rng.standard_normal((4, H)).astype(F32)
    table = RouteTable.build(v)
    flusher = engine(routes=table, rule="routing", lr=1.0, flush_threshold=3, capacity=64)
    client = engine.attach()
    xs = rng.standard_normal((10, H)).astype(F32)
    feedback = [dict(route=i % 4, reward=float(i % 2)) if i % 3 else dict(best=i % 4) for i in range(10)]
    for x, f in zip(xs, feedback):
        assert client.feedback(x, **f)
    poke(client, index, offset(client.layout), fmt, value)
    assert flusher.scan() == 9 and flusher.corrupt == 1
    loop = InstantLoop(H, SMALL["rank"], 1.0, 3, rule="routing", routes=v)
    for i, (x, f) in enumerate(zip(xs, feedback)):
        if i != index:
            loop.feedback(x, **f)
    np.testing.assert_allclose(client._ledger.read("up")[0], loop.up, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(client._ledger.read("down")[0], loop.down, rtol=1e-5, atol=1e-6)
    assert np.isfinite(client.route(xs[0]).scores).all()


def test_a_head_out_of_bounds_is_counted_once_and_the_lane_goes_on(engine, name, caplog):
    flusher = engine(lane_slots=8, capacity=64)
    client = engine.attach()
    trajs = trajectories(2, 12)
    for t in trajs[:3]:
        assert client.record(t)
    assert flusher.scan() == 3
    head_word = (client.layout.lane_control(client.lane) + LANE_HEAD) // 8
    client._segment.u64[head_word] = 2**63  # written outside sona_shm
    for _ in range(3):  # no stall, no spin of errors: counted once
        assert flusher.scan() == 0
    assert flusher.corrupt == 1 and client.stats()["corrupt"] == 1 and caplog.text.count("is outside") == 1
    assert client.stats()["lanes"][0]["learned"] == 3  # the tail did not jump
    assert client.record(trajs[3])  # the owner's next record rewrites the head from its own count
    assert flusher.scan() == 1 and flusher.corrupt == 1
    client._segment.u64[head_word] = 1  # behind the tail: corrupt too
    assert flusher.scan() == 0 and flusher.corrupt == 2
    lane = client.lane
    client.close()  # the owner is gone; the next one to claim the lane repairs the head
    second = engine.attach()
    assert second.lane == lane  # lanes are tried from pid % lanes: the same one
    assert second.record(trajs[4]) and flusher.scan() == 1 and flusher.corrupt == 2
    assert second.stats()["trajectories_processed"] == 5
