"""The optional C fast paths: built, and indistinguishable from the Python paths."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from sona_shm import Step, Trajectory
from sona_shm.engine import client as client_module
from sona_shm.shm import lane as lane_module

from conftest import SMALL

H, A = SMALL["hidden_dim"], SMALL["attention_dim"]
F32 = np.float32

pytestmark = pytest.mark.skipif(bool(os.environ.get("SONA_SHM_PURE_PYTHON")), reason="C fast paths disabled on purpose")


def test_the_extension_is_built_and_in_use():
    # optional=True in setup.py lets an install without a compiler succeed; here, where
    # there is one, a silent build failure would quietly cost the speed.
    assert client_module._speedups is not None and lane_module._speedups is not None


def trajectories() -> list[Trajectory]:
    rng = np.random.default_rng(5)
    vec = lambda n: rng.standard_normal(n).astype(F32)  # noqa: E731
    return [
        Trajectory(vec(H), [], 0.25, id=1),
        Trajectory(vec(H), [Step(vec(H), vec(A), 0.5)], -1.5, latency_us=123, route="r-1", id=2),
        Trajectory(vec(H), [Step(vec(3), None, 2.0), Step(vec(H), (), -0.0), Step(vec(1), vec(2), 1e-30)], 3.0, id=3),
        Trajectory(vec(H), tuple(Step(vec(H), vec(A), float(k)) for k in range(4)), 1e38, route="ü" * 32, id=2**64 - 1),
        Trajectory(vec(2 * H)[::2], [Step(vec(2 * H)[::2], vec(2 * A)[::2], 0.1)], 0.0, id=5),  # strided views
    ]


def fields(client, traj: Trajectory, *, c_writes: bool = False) -> dict:
    """What record() wrote for ``traj``: every field a reader may use.

    ``c_writes``: the C writer must handle ``traj`` itself (else a C writer that handed
    everything back to the Python path would pass every comparison below).
    """
    if c_writes:
        assert client._writer.record(traj) in (lane_module.PUBLISHED, lane_module.PUBLISHED_RING), traj
    else:
        assert client.record(traj)
    layout = client.layout
    index = (client._writer.head - 1) % layout.lane_slots
    slots = np.ndarray(
        (layout.lane_slots,), dtype=layout.slot_dtype, buffer=client._segment.numpy_buffer(), offset=layout.lane_slot(client.lane, 0)
    )
    rec = slots[index]
    n = int(rec["n_steps"])
    meta = rec["meta"][:n]
    out = {
        "head": [rec[f].item() for f in ("traj_id", "latency_us", "quality", "n_steps", "route_len")],
        "route": bytes(rec["route"][: rec["route_len"]]),
        "query": rec["query"].tobytes(),
        "meta": meta.tobytes(),
        "act": [rec["steps"]["act"][s].tobytes() for s in range(n)],
        "att": [rec["steps"]["att"][s][: meta["att_len"][s]].tobytes() for s in range(n)],
    }
    del rec, slots
    return out


def test_c_and_python_fill_identical_slots(engine, monkeypatch):
    flusher = engine(lane_slots=64)
    client = engine.attach()
    written_by_c = [fields(client, t, c_writes=True) for t in trajectories()]
    assert type(client._writer) is lane_module._speedups.LaneWriter
    monkeypatch.setattr(lane_module, "_speedups", None)
    client.release_lane()  # the next record claims the lane again, with the Python writer
    written_by_python = [fields(client, t) for t in trajectories()]
    assert type(client._writer) is lane_module.PyLaneWriter
    assert written_by_c == written_by_python
    assert flusher.scan() == 2 * len(trajectories())


def test_ids_taken_from_the_lane_agree(engine, monkeypatch):
    engine()
    client = engine.attach()
    no_id = Trajectory(np.ones(H, F32), [], 1.0)
    first = fields(client, no_id, c_writes=True)["head"][0]
    monkeypatch.setattr(lane_module, "_speedups", None)
    client.release_lane()
    second = fields(client, no_id)["head"][0]
    assert (first, second) == (client.lane, client.lane + SMALL["lanes"])  # k * lanes + lane, k = 0, 1


def test_the_c_path_declines_what_it_does_not_handle(engine):
    engine()
    client = engine.attach()
    writer = client._writer

    class MyTrajectory(Trajectory):
        pass

    ok = Trajectory(np.ones(H, F32), [Step(np.ones(H, F32), None, 1.0)], 1.0)
    assert writer.fill(ok) == 0
    for traj in [
        MyTrajectory(np.ones(H, F32), [], 1.0),  # subclass: the Python path decides
        Trajectory(np.ones(H), [], 1.0),  # float64
        Trajectory(list(np.ones(H)), [], 1.0),
        Trajectory(np.ones(H, ">f4"), [], 1.0),  # byte-swapped
        Trajectory(np.ones(H + 1, F32), [], 1.0),
        Trajectory(np.full(H, np.nan, F32), [], 1.0),
        Trajectory(np.ones(H, F32), [Step(np.ones(H, F32), None, 1)], 1.0),  # int reward
        Trajectory(np.ones(H, F32), [Step(np.ones(H, F32), np.ones(A + 1, F32), 1.0)], 1.0),
        Trajectory(np.ones(H, F32), [Step(np.full(H, np.inf, F32), None, 1.0)], 1.0),
        Trajectory(np.ones(H, F32), [Step(np.ones(H, F32), None, 1.0)] * 5, 1.0),  # > max_steps
        Trajectory(np.ones(H, F32), [], float("nan")),
        Trajectory(np.ones(H, F32), [], 1.0, latency_us=-1),
        Trajectory(np.ones(H, F32), [], 1.0, route="x" * 65),
        Trajectory(np.ones(H, F32), [], 1.0, route="\ud800"),  # not encodable
        Trajectory(np.ones(H, F32), [], 1.0, id=True),
    ]:
        assert writer.fill(traj) == -1, traj
        assert writer.record(traj) == -1, traj
    assert writer.head == 0  # nothing was published


def handed_back() -> list[Trajectory]:
    """Valid trajectories the C writer hands back, most after copying part of them."""
    rng = np.random.default_rng(6)
    vec = lambda n: rng.standard_normal(n).astype(F32)  # noqa: E731
    return [
        Trajectory(vec(H), [Step(vec(H), vec(A), 0.5)], 1, route="r", id=8),  # int quality: everything else copied
        Trajectory(vec(H), [Step(vec(H), vec(A), 0.5), Step(vec(H).tolist(), None, 2.0)], 0.5, id=9),  # a list in step 1
        Trajectory(vec(H), [Step(vec(5), vec(A), 1.0), Step(vec(H), vec(3), np.float32(0.25))], 2.0, id=10),  # numpy reward
        Trajectory(vec(H).astype(np.float64), [Step(vec(H), [1.0, 2.0], 1.0)], 1.0, latency_us=np.uint64(7), id=11),
    ]


def test_the_python_path_after_a_c_partial_write_fills_what_python_alone_fills(engine, monkeypatch):
    engine(lane_slots=64)
    client = engine.attach()
    for t in handed_back():
        assert client._writer.fill(t) == -1  # declined: whatever it copied stays in the unpublished head slot
    after_c = [fields(client, t) for t in handed_back()]
    monkeypatch.setattr(lane_module, "_speedups", None)
    client.release_lane()
    assert [fields(client, t) for t in handed_back()] == after_c


def test_a_handed_back_trajectory_writes_only_the_prefix_it_uses(engine):
    # tmpfs allocates a page when it is first written; a one-step trajectory at h=256 uses
    # one 4 KiB page of its 12 KiB slot, whichever writer fills it. (Checked through the
    # bytes past the prefix, not st_blocks, which huge pages on /dev/shm would coarsen.)
    engine(hidden_dim=256, max_steps=8, attention_dim=64, lane_slots=4)
    client = engine.attach()
    layout = client.layout
    x = np.ones(256, F32)
    prefix = layout.prefix_bytes(1)
    assert layout.slot_bytes == 3 * 4096 and prefix <= 4096
    for quality in (1.0, 1):  # C writes it; int quality: handed back to the Python path
        rest = np.ndarray(
            (layout.slot_bytes - prefix,), np.uint8, buffer=client._segment.numpy_buffer(), offset=client._writer.slot_offset + prefix
        )
        rest[:] = 0xA5  # finite as float32 (-2.9e-16), so nothing has a reason to scrub it
        assert client.record(Trajectory(x, [Step(x, None, 1.0)], quality))
        assert (rest == 0xA5).all(), f"quality={quality!r}: bytes past the prefix were written"
        del rest


def _geometry(**change):
    fields = dict(
        hidden_dim=H, rank=2, max_steps=1, attention_dim=A, lanes=1, lane_slots=1, slot_bytes=4096, payload_offset=128,
        route_offset=48, step_bytes=4 * (H + A), routes=0, lanes_offset=1200, slots_offset=4096, unit_reward=False,
        routes_used_offset0=0, routes_used_offset1=0,
    )  # fmt: skip
    return lane_module._speedups.Geometry(**{**fields, **change})


def test_the_geometry_is_checked_once_without_overflow_and_a_failed_lane_writer_init_changes_nothing():
    """The C twin takes the segment's geometry as one object (Layout.geometry), checked when it is made."""
    mem = bytearray(4096 + 4096)
    good = _geometry()
    assert good.hidden_dim == H and good.slot_bytes == 4096 and good.unit_reward is False
    writer = lane_module._speedups.LaneWriter(mem, good, 0)
    for field, value in [("attention_dim", 2**62), ("hidden_dim", 2**62), ("step_bytes", 2**61), ("payload_offset", 2**62),
                         ("route_offset", 2**62), ("hidden_dim", 65536), ("routes", -1), ("routes", 65535), ("rank", 3)]:  # fmt: skip
        with pytest.raises(ValueError, match="inconsistent slot geometry"):
            _geometry(**{field: value})
    with pytest.raises(TypeError, match="keyword"):
        lane_module._speedups.Geometry()
    for lane in (1, -1):  # the lane does not fit the segment (or the geometry)
        with pytest.raises(ValueError, match="does not fit"):
            lane_module._speedups.LaneWriter(mem, good, lane)
    with pytest.raises(ValueError, match="does not fit"):
        writer.__init__(bytearray(100), good, 0)
    with pytest.raises(TypeError):
        writer.__init__(mem, "not a geometry", 0)
    assert writer.slot_offset == 4096 and writer.record(Trajectory(np.ones(H, F32), [], 1.0)) == lane_module.PUBLISHED


def trained(engine, seed: int):
    """A client of an engine that learned (and flushed) a few trajectories, its weights, an rng."""
    flusher = engine(flush_threshold=5)
    client = engine.attach()
    rng = np.random.default_rng(seed)
    for _ in range(10):
        client.record(Trajectory(rng.standard_normal(H).astype(F32), [Step(rng.standard_normal(H).astype(F32), None, 1.0)], 1.0))
    flusher.scan()
    return client, client._load_weights(), rng


def test_adapt_matches_numpy(engine):
    client, w, rng = trained(engine, 2)
    x = rng.standard_normal(H).astype(F32)
    out = client_module._speedups.adapt(x, w.down, w.up_scaled)
    assert out.dtype == F32 and out.shape == (H,)
    np.testing.assert_allclose(out, x + (x @ w.down_t) @ w.up_scaled, atol=1e-6)
    assert client_module._speedups.adapt(np.full(H, np.nan, F32), w.down, w.up_scaled) is None
    assert client_module._speedups.adapt(x.astype(np.float64), w.down, w.up_scaled) is None
    assert client_module._speedups.adapt(np.ones(H + 1, F32), w.down, w.up_scaled) is None


def test_adapt_takes_batches_and_strided_rows(engine):
    client, w, rng = trained(engine, 4)
    adapt = client_module._speedups.adapt
    batch = rng.standard_normal((7, 2 * H)).astype(F32)[:, ::2]  # strided in both axes
    out = adapt(batch, w.down, w.up_scaled)
    assert out.shape == (7, H) and out.flags.c_contiguous
    np.testing.assert_allclose(out, batch + (batch @ w.down_t) @ w.up_scaled, atol=1e-6)
    assert adapt(np.zeros((0, H), F32), w.down, w.up_scaled).shape == (0, H)
    bad = batch.copy()
    bad[5, 3] = np.inf
    assert adapt(bad, w.down, w.up_scaled) is None  # the Python path names the bad element
    assert adapt(np.ones((2, 3, H), F32), w.down, w.up_scaled) is None
    np.testing.assert_allclose(client.forward(batch), out, atol=1e-6)


def test_the_c_learner_learns_what_the_numpy_learner_learns(engine, monkeypatch):
    """Mixed step counts, short activations, degenerate and overflowing signals, flushes
    falling inside batches: both learners end with the same weights and gradients."""
    from sona_shm.engine import flusher as flusher_module
    from sona_shm.learn import learner as learner_module

    from support import load_vectors, make_trajectories, scenario_trajectory

    rng = np.random.default_rng(8)
    edge = [scenario_trajectory(op) for s in load_vectors()["scenarios"] if s["hidden_dim"] == 8 for op in s["ops"] if op["op"] == "traj"]
    huge = [
        Trajectory(np.full(H, 3e38, F32), [Step(np.full(H, 3e38, F32), None, 3e38), Step(np.full(H, -3e38, F32), None, 1.0)], 3e38),
        Trajectory(np.full(H, 3e38, F32), [], 3e38),
    ]
    batches = [make_trajectories(int(seed), int(rng.integers(1, 40)), H) for seed in range(12)]
    batches.insert(3, [Trajectory(np.resize(t.query, H), [Step(s.activations, None, s.reward) for s in t.steps], t.quality) for t in edge])
    batches.insert(6, huge)

    class Counting:  # the C learner must learn these batches itself, not hand them back
        def __init__(self) -> None:
            self.handled = self.declined = 0

        def learn_slots(self, *args):
            result = flusher_module._speedups_real.learn_slots(*args)
            self.handled += 1
            self.declined += len(result[5])  # slots it found corrupt
            return result

    counting = Counting()
    monkeypatch.setattr(flusher_module, "_speedups_real", flusher_module._speedups, raising=False)
    states = []
    for speedups in (counting, None):
        monkeypatch.setattr(flusher_module, "_speedups", speedups)  # which path the flusher takes
        monkeypatch.setattr(learner_module, "_speedups", speedups or flusher_module._speedups_real)  # what the learner calls
        flusher = engine(flush_threshold=7, lane_slots=64)
        client = engine.attach()
        for batch in batches:
            for t in batch:
                assert client.record(t)
            flusher.scan()
        learner = flusher.learner
        states.append((learner.up.copy(), learner.grad_up.copy(), learner.pending, learner.metrics, learner.generation))
        client.close()
        flusher.close()
        from sona_shm.shm import segment

        segment.unlink(client.name)
    assert counting.handled > len(batches) and counting.declined == 0
    (up_c, grad_c, *rest_c), (up_py, grad_py, *rest_py) = states
    assert rest_c == rest_py
    assert np.isfinite(up_c).all() and np.isfinite(grad_c).all()
    np.testing.assert_allclose(up_c, up_py, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_c, grad_py, rtol=1e-5, atol=1e-5)


def test_a_slot_failing_its_stamp_sends_the_batch_to_the_numpy_learner(engine, monkeypatch, caplog):
    """learn_slots hands a batch with a bad stamp back (None, nothing changed); the numpy
    path learns the valid slots and logs the bad one, as it does without the extension."""
    from sona_shm.engine import flusher as flusher_module

    rng = np.random.default_rng(9)
    trajs = [
        Trajectory(rng.standard_normal(H).astype(F32), [Step(rng.standard_normal(H).astype(F32), None, float(i))], 1.0) for i in range(10)
    ]
    states = []
    for speedups in (flusher_module._speedups, None):
        monkeypatch.setattr(flusher_module, "_speedups", speedups)
        flusher = engine(flush_threshold=3)
        client = engine.attach()
        for t in trajs:
            assert client.record(t)
        client._segment.u64[client.layout.lane_slot(client.lane, 4) // 8] = 999  # corrupt one stamp
        caplog.clear()
        assert flusher.scan() == 9 and "1 slots in [0, 10) fail their checks" in caplog.text and flusher.corrupt == 1
        states.append((flusher.learner.up.copy(), flusher.learner.metrics, flusher.buffer_head))
        client.close()
        flusher.close()
        from sona_shm.shm import segment

        segment.unlink(client.name)
    (up_c, *rest_c), (up_py, *rest_py) = states
    assert rest_c == rest_py
    np.testing.assert_allclose(up_c, up_py, rtol=1e-6)


def test_the_learners_refuse_malformed_arrays_without_crashing():
    """learn_slots/learn_routing check the learner's arrays before reading a dimension: a 0-d array
    (whose shape pointer numpy leaves NULL) where a per-route count is due is a ValueError,
    not a segfault. Run in a child, so that a crash fails this test and not the run."""
    from support import python_cmd, run

    script = """
import types
import numpy as np
from sona_shm.shm.lane import _speedups as S
geometry = S.Geometry(hidden_dim=8, rank=1, max_steps=1, attention_dim=0, lanes=1, lane_slots=1, slot_bytes=4096,
                      payload_offset=128, route_offset=48, step_bytes=64, routes=2, lanes_offset=1200, slots_offset=4096,
                      unit_reward=True, routes_used_offset0=1104, routes_used_offset1=1112)
block = np.zeros((1, 4096), np.uint8)
counts = (np.zeros(2, np.uint64), np.zeros(2, np.uint64), np.zeros(2))
for i in range(3):
    for zero_d in (np.zeros((), np.uint64), np.zeros(())):
        bad = list(counts)
        bad[i] = zero_d
        learner = types.SimpleNamespace(
            lr=0.1, flush_threshold=5, pending=0, route_chosen=bad[0], route_best=bad[1], route_reward=bad[2],
            grad_up=np.zeros((1, 8)), up=np.zeros((1, 8), np.float32), grad_down=np.zeros((1, 8)),
            down=np.zeros((1, 8), np.float32), unit=np.eye(2, 8, dtype=np.float32), temperature=10.0,
        )
        for learn in (S.learn_slots, S.learn_routing):
            try:
                learn(block, geometry, 1, learner, False)
            except ValueError as exc:
                assert "do not fit the geometry" in str(exc), exc
            else:
                raise AssertionError("accepted a 0-d count array")
print("refused")
"""
    done = run(python_cmd("-c", script), timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "refused", (done.returncode, done.stderr[-2000:])


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable copy of ``a`` whose data starts one byte off alignment."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = np.ndarray(a.shape, a.dtype, buffer=raw.data, offset=1)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def test_c_calls_refuse_byte_swapped_and_misaligned_weights_and_routes():
    """route(), adapt() and the learners read weights, routes and counts as native floats: an
    array of another byte order (dtype '>f4' is NPY_FLOAT32 too) or misaligned is refused, not
    read as garbage or written in the wrong byte order."""
    from sona_shm.config import EngineConfig
    from sona_shm.shm.layout import Layout

    speedups = lane_module._speedups
    rng = np.random.default_rng(11)
    h, k = 16, 4
    x = rng.standard_normal(h).astype(F32)
    down, up = (rng.standard_normal((2, h)).astype(F32) * 0.1 for _ in range(2))
    unit = rng.standard_normal((k, h)).astype(F32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    names = ("a", "b", "c", "d")
    bias, active = np.zeros(k, F32), np.ones(k, np.uint8)

    def route(d=down, u=up, v=unit):
        return speedups.route(x, d, u, v, bias, active, names, 0, 0.0, 10.0, -1.0)

    assert route().index == int(np.argmax(unit @ (x + (x @ down.T) @ up)))
    for bad in (unit.astype(">f4"), _misaligned(unit)):
        with pytest.raises(ValueError, match="route\\(\\): vectors must be"):
            route(v=bad)
    for bad in (down.astype(">f4"), _misaligned(down)):
        with pytest.raises(ValueError, match="adapt\\(\\): down and up_scaled must be"):
            speedups.adapt(x, bad, up)
        with pytest.raises(ValueError, match="route\\(\\): down and up_scaled must be"):
            route(u=bad)

    from sona_shm.learn.learner import Learner

    layout = Layout(EngineConfig(hidden_dim=h, rule="routing", routes=k, max_steps=1, attention_dim=0))
    slots = np.zeros(3, dtype=layout.slot_dtype)
    slots["seq"] = np.arange(1, 4)
    slots["query"] = rng.standard_normal((3, h))
    slots["best_index"] = 1
    raw = slots.view(np.uint8).reshape(3, layout.slot_bytes)

    def learner(rule="routing", **change):
        fresh = Learner(h, 2, 1.0, 5, rule=rule, unit=unit, max_routes=layout.max_routes)
        for field, value in change.items():
            setattr(fresh, field, value)
        return fresh

    fields = ("up", "down", "work_up", "work_down", "route_vectors", "route_bias", "work_vectors", "work_bias", "route_centre",
              "route_chosen", "route_best", "route_reward")  # fmt: skip
    assert speedups.learn_routing(raw, layout.geometry, 1, learner(), False) == (0, 3, 3, 0, 3, [], 3)  # windows of 1, 1, 1
    for field in fields:
        value = getattr(learner(), field)
        for bad in (value.astype(value.dtype.newbyteorder()), _misaligned(value)):
            with pytest.raises(ValueError, match=f"learn_routing\\(\\): the learner's {field}|per-route counts"):
                speedups.learn_routing(raw, layout.geometry, 1, learner(**{field: bad}), False)
            assert not bad.astype(bad.dtype.newbyteorder("=")).any() or field in ("down", "work_down", "route_vectors", "work_vectors")

    assert speedups.learn_slots(raw, layout.geometry, 1, learner("reference"), False) == (3, 0, 0, 0, 3, [], 3)
    for field in ("grad_up", "up", "route_chosen", "route_best", "route_reward"):
        value = getattr(learner("reference"), field)
        for bad in (value.astype(value.dtype.newbyteorder()), _misaligned(value)):
            with pytest.raises(ValueError):
                speedups.learn_slots(raw, layout.geometry, 1, learner("reference", **{field: bad}), False)


def feedback_trajectories(table) -> list[Trajectory]:
    """Feedback on a 4-route engine: as feedback() encodes it, and recorded by hand."""
    from sona_shm.learn.routes import feedback_trajectory

    rng = np.random.default_rng(12)
    vec = lambda n: rng.standard_normal(n).astype(F32)  # noqa: E731
    made = [
        feedback_trajectory(table, vec(H), route=1, reward=0.25, best=None, unit_reward=True),
        feedback_trajectory(table, vec(H), route="d", reward=0.0, best=None, unit_reward=True),
        feedback_trajectory(table, vec(H), route=0, reward=1.0, best=None, unit_reward=True),
        feedback_trajectory(table, vec(H), route=None, reward=None, best="c", unit_reward=True),
        feedback_trajectory(table, vec(H), route=0, reward=None, best=2, unit_reward=True),
        feedback_trajectory(table, vec(H), route=2, reward=0.5, best=None, unit_reward=True, probability=0.3),
        feedback_trajectory(table, vec(H), route=1, reward=None, best=1, unit_reward=True, probability=1.0),
    ]
    made = [dataclasses.replace(t, id=30 + i) for i, t in enumerate(made)]  # ids from the lane differ between the two passes
    return made + [
        Trajectory(vec(H), [], 1e-30, route_index=3, id=40),
        Trajectory(vec(H), [Step(vec(H), vec(A), 0.5), Step(vec(3), None, -2.0)], 5.0, route="x", best_index=0, id=41),  # full: any quality
        Trajectory(vec(H), [], -3.0, route="plain", id=42),  # not a feedback
        Trajectory(vec(H), [], 0.5, route_index=3, best_index=3, latency_us=9, id=43),
    ]


def refused_feedback() -> list[tuple[Trajectory, str]]:
    """Feedback trajectories a 4-route routing engine refuses, and what the error names."""
    x = np.ones(H, F32)
    return [
        (Trajectory(x, [], 0.5, route_index=4), "route_index: expected None or a route index in [0, 3]"),
        (Trajectory(x, [], 0.5, best_index=65535), "best_index: expected None or a route index in [0, 3]"),
        (Trajectory(x, [], 0.5, route_index=-1), "route_index: expected None or a route index in [0, 3]"),
        (Trajectory(x, [], 0.5, best_index=True), "best_index: expected None or a route index in [0, 3]"),
        (Trajectory(x, [], 0.5, route_index=1.0), "route_index: expected None or a route index in [0, 3]"),
        (Trajectory(x, [], 1.5, route_index=1), "quality: expected the reward of a bandit feedback in [0, 1]"),
        (Trajectory(x, [], -1e-30, route_index=1), "quality: expected the reward of a bandit feedback in [0, 1]"),
        (Trajectory(x, [], 1.0000001, route_index=2), "quality: expected the reward of a bandit feedback in [0, 1]"),
        (Trajectory(x, [], float("nan"), route_index=1), "quality: expected a finite number"),
        (Trajectory(x, [], 0.5, route_index=1, probability=0.0), "probability: expected the probability"),
        (Trajectory(x, [], 0.5, route_index=1, probability=1.0000001), "probability: expected the probability"),
        (Trajectory(x, [], 0.5, route_index=1, probability=float("nan")), "probability: expected a finite number"),
    ]


def slot_bytes_written(client) -> bytes:
    """Every byte of the last published slot that a reader may use, past its ``seq`` stamp."""
    layout = client.layout
    index = (client._writer.head - 1) % layout.lane_slots
    at = layout.lane_slot(client.lane, index)
    n = int.from_bytes(client._segment.buf[at + 28 : at + 30], "little")
    return bytes(client._segment.buf[at + 8 : at + layout.prefix_bytes(max(1, n))])


def test_c_and_python_write_identical_feedback_slots_and_refuse_the_same(engine, monkeypatch):
    """On a routing engine both writers store route_index/best_index (and everything else) alike,
    and refuse the same feedback trajectories: the C writer hands them back, the Python path
    raises naming the field, and nothing is published."""
    from sona_shm.errors import InvalidInputError
    from sona_shm.learn.routes import RouteTable

    table = RouteTable.build(np.random.default_rng(13).standard_normal((4, H)), ["a", "b", "c", "d"])
    flusher = engine(routes=table, rule="routing", lane_slots=64)
    client = engine.attach()
    assert type(client._writer) is lane_module._speedups.LaneWriter
    by_c = []
    for t in feedback_trajectories(table):
        assert client._writer.record(t) in (lane_module.PUBLISHED, lane_module.PUBLISHED_RING), t
        by_c.append(slot_bytes_written(client))
    for t, fragment in refused_feedback():
        assert client._writer.fill(t) == -1 and client._writer.record(t) == -1, t
        with pytest.raises(InvalidInputError) as info:
            client.record(t)
        assert fragment in str(info.value), (t, str(info.value))
    head = client._writer.head
    monkeypatch.setattr(lane_module, "_speedups", None)
    client.release_lane()
    by_python = []
    for t in feedback_trajectories(table):
        assert client.record(t)
        by_python.append(slot_bytes_written(client))
    assert type(client._writer) is lane_module.PyLaneWriter
    for t, fragment in refused_feedback():
        with pytest.raises(InvalidInputError) as info:
            client.record(t)
        assert fragment in str(info.value), (t, str(info.value))
    assert by_c == by_python
    assert head == client._writer.head - len(by_python) == len(by_c)
    assert flusher.scan() == 2 * len(by_c) and flusher.corrupt == 0
    got = [(t.route_index, t.best_index) for t in client.drain()]
    expected = [(t.route_index, t.best_index) for t in feedback_trajectories(table)]
    assert got == expected + expected


@pytest.mark.parametrize("rule", ["reference", "routing"])
def test_in_sealing_mode_the_c_learners_stop_at_the_threshold_with_the_sums_they_would_apply(engine, rule):
    """stop=True (a fleet's flusher): each call returns where a window is complete, applying nothing;
    sealing it (the window's bytes) and applying that gives the state of the plain call, bit for bit."""
    from sona_shm.fleet.window import apply_sealed, read_window, write_window
    from sona_shm.learn.learner import STATE_ARRAYS, Learner, learn_block
    from sona_shm.learn.routes import feedback_trajectory

    from support import make_trajectories, route_table

    table = route_table(H) if rule == "routing" else None
    extra = dict(rule="routing", routes=table, lr=1.0) if table is not None else {}
    flusher = engine(flush_threshold=7, lane_slots=64, **extra)
    client = engine.attach()
    rng = np.random.default_rng(4)
    if table is None:
        trajs = make_trajectories(4, 30, H)
    else:
        trajs = [
            feedback_trajectory(
                table, rng.standard_normal(H).astype(F32), route=None, reward=None, best=int(rng.integers(4)), unit_reward=True
            )
            for _ in range(30)
        ]
    for t in trajs:
        assert client.record(t)
    layout, base = flusher.layout, flusher.learner
    block = flusher._slot_bytes[client.lane * layout.lane_slots : client.lane * layout.lane_slots + 30]

    def copy() -> Learner:
        arrays = {f: getattr(base, f).copy() for f in STATE_ARRAYS}
        return Learner.for_engine(layout.config, routes_used=base.routes_used, **arrays)

    published = ("up", "down", "route_vectors", "route_bias")
    plain, sealed = copy(), copy()
    learn_block(plain, layout, block, 1)
    done, cuts, sizes = 0, [], []
    out = np.zeros(layout.entry_bytes, np.uint8)
    while done < 30:
        size = sealed.window_size
        before = [getattr(sealed, f).tobytes() for f in published]
        _, corrupt, consumed = learn_block(sealed, layout, block[done:], done + 1, stop=True)
        assert not corrupt and [getattr(sealed, f).tobytes() for f in published] == before  # nothing applied inside a call
        done += consumed
        cuts.append(consumed)
        if sealed.window_full:
            sizes.append(size)
            window = sealed.close_window()
            length = write_window(out, window, rank=2, seq=len(sizes), cum=done, sealed_at=0.0)
            raw = out[:length].tobytes()
            read = read_window(raw, hidden_dim=H, rank=2, routing=table is not None, max_routes=base.routes_used)
            apply_sealed(sealed.up, sealed.down, sealed.route_vectors, sealed.route_bias, read, sealed.lr)
            if table is not None:
                sealed.work_vectors[...], sealed.work_bias[...] = sealed.route_vectors, sealed.route_bias
    assert cuts[: len(sizes)] == sizes and sum(cuts) == 30
    assert cuts == ([7, 7, 7, 7, 2] if table is None else [1] * 30)  # the routing rule's first windows are of one feedback
    assert plain.pending == sealed.pending
    for field in STATE_ARRAYS:
        assert getattr(plain, field).tobytes() == getattr(sealed, field).tobytes(), field


def test_the_c_module_compiles_in_the_layout_that_layout_py_writes_down():
    """The byte offsets _speedups.c uses are its module constants; each is the layout's (shm/layout.py)."""
    from sona_shm.config import MAX_ROUTES, EngineConfig
    from sona_shm.shm import layout as L
    from sona_shm.trajectory import ROUTE_MAX_BYTES

    S = lane_module._speedups
    if S is None:
        pytest.skip("the C extension is not built (SONA_SHM_PURE_PYTHON or no compiler)")
    fields = L.Layout(EngineConfig(routes=2)).slot_dtype.fields
    assert fields is not None
    slot = {
        name: fields[name][1] for name in ("traj_id", "latency_us", "quality", "n_steps", "route_len", "route_index", "best_index", "meta")
    }
    assert (S.SLOT_TRAJ_ID, S.SLOT_LATENCY_US, S.SLOT_QUALITY, S.SLOT_N_STEPS, S.SLOT_ROUTE_LEN) == (
        slot["traj_id"],
        slot["latency_us"],
        slot["quality"],
        slot["n_steps"],
        slot["route_len"],
    )
    assert (S.SLOT_ROUTE_INDEX, S.SLOT_BEST_INDEX, S.SLOT_HEAD_BYTES) == (slot["route_index"], slot["best_index"], slot["meta"])
    assert S.SLOT_HEAD_BYTES == L.SLOT_HEAD_BYTES and S.ROUTE_MAX_BYTES == ROUTE_MAX_BYTES == L.ROUTE_NAME_BYTES
    assert (S.LANE_CONTROL_BYTES, S.LANE_HEAD, S.LANE_NEXT_ID, S.LANE_LAST_AT) == (
        L.LANE_CONTROL_BYTES,
        L.LANE_HEAD,
        L.LANE_NEXT_ID,
        L.LANE_LAST_AT,
    )
    assert (S.FLUSHER_LINE, S.COMMIT_LINE, S.FL_IDLE, S.WINDOW_HEAD_BYTES, S.MAX_ROUTES) == (
        L.FLUSHER_LINE,
        L.COMMIT_LINE,
        L.FL_IDLE,
        L.WINDOW_HEAD_BYTES,
        MAX_ROUTES,
    )


def test_a_build_of_another_interface_is_not_used(monkeypatch):
    """An editable install keeps the C module it built; built from older sources it would be called with arguments
    it does not take. native.py runs the Python twins then, and says why."""
    from sona_shm import native

    S = lane_module._speedups
    if S is None:
        pytest.skip("the C extension is not built (SONA_SHM_PURE_PYTHON or no compiler)")
    assert S.INTERFACE == native.INTERFACE
    monkeypatch.setattr(S, "INTERFACE", native.INTERFACE - 1)
    module, why = native._load()
    assert module is None and "out of date" in why and "pip install -e ." in why
