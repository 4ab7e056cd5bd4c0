"""Consumers: drain against an in-process flusher driven by ``scan()``."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from sona_shm import (
    ClosedError,
    DrainTimeoutError,
    InstantLoop,
    InvalidInputError,
    SegmentNotFoundError,
    SonaShmError,
    Step,
    Trajectory,
    TrajectoryBatch,
    drain_to_file,
    open_consumer,
)
from sona_shm.shm.layout import LOCK_DRAIN

from children import fork_child
from conftest import SMALL
from support import assert_same_trajectory, make_trajectories

H, S, A = SMALL["hidden_dim"], SMALL["max_steps"], SMALL["attention_dim"]


def rich_trajectories(seed: int, count: int, first_id: int = 0) -> list[Trajectory]:
    """``make_trajectories`` with ids, latencies and routes (none, ASCII, 64-byte UTF-8)."""
    out = make_trajectories(seed, count, H, max_steps=S, attention_dim=A)
    routes = [None, "search", "é" * 32, ""]
    for i, t in enumerate(out):
        t.id, t.latency_us, t.route = first_id + i, (seed * 1000 + i) * 2**40, routes[i % len(routes)]
    return out


@pytest.fixture
def consumers():
    """``consumers(name)``: open_consumer that closes what it opened at teardown."""
    opened = []

    def make(name: str):
        consumer = open_consumer(name)
        opened.append(consumer)
        return consumer

    yield make
    for consumer in opened:
        consumer.close()


def test_drains_exactly_what_instant_loop_drains(engine):
    capacity = 8
    flusher = engine(capacity=capacity, lane_slots=32)
    client = engine.attach()
    loop = InstantLoop(H, SMALL["rank"], SMALL["lr"], SMALL["flush_threshold"], capacity)
    rng = np.random.default_rng(3)
    recorded = 0
    for round_ in range(40):  # many passes round the ring, with drops, partial and whole drains
        for t in rich_trajectories(round_, int(rng.integers(0, 13)), first_id=recorded):
            assert client.record(t)
            loop.on_trajectory(t)
            recorded += 1
        flusher.scan()
        assert client.buffer_stats() == pytest.approx(loop.buffer_stats())
        how = round_ % 4
        if how == 0:
            got, expected = client.drain(), loop.drain()
        elif how in (1, 2):
            n = int(rng.integers(0, capacity + 3))
            got, expected = client.drain_n(n), loop.drain_n(n)
        else:
            continue
        assert [t.id for t in got] == [t.id for t in expected]
        for g, e in zip(got, expected):
            assert_same_trajectory(g, e)
    stats = client.stats()
    buffer = stats["buffer"]
    assert buffer["drained"] + buffer["len"] + buffer["dropped"] == stats["trajectories_processed"] == recorded
    assert buffer["dropped"] > 0 and buffer["drained"] > 3 * capacity  # the test went where it meant to
    assert buffer["consumer_pid"] == os.getpid() and buffer["drained_at"]


def test_arrays_are_zero_past_each_length_even_over_stale_slots(engine):
    flusher = engine(capacity=2, lane_slots=2)
    client = engine.attach()
    full = [Step(np.full(H, 7.0), np.full(A, 9.0), 5.0) for _ in range(3)]
    for _ in range(2):
        client.record(Trajectory(np.ones(H), full, 1.0, route="a-long-route-name"))
    flusher.scan()
    assert len(client.drain()) == 2
    short = Trajectory(np.full(H, 2.0), [Step(np.arange(1, 6), [0.5, 0.25], -1.0)], 0.5, latency_us=3, route="b")
    empty = Trajectory(np.full(H, 3.0), [], 0.25)
    client.record(short)
    client.record(empty)
    flusher.scan()
    # Slots may hold earlier trajectories' values past what the new ones wrote (the
    # producer's C path does not clear them); make sure these do.
    consumer = open_consumer(client.name)
    try:
        raw = consumer._slots
        raw["steps"]["att"][0, 0, 2:] = 9.0
        raw["steps"]["act"][0, 1:] = 7.0
        raw["meta"]["reward"][0, 1] = 5.0
        del raw
        batch = consumer.drain_arrays()
    finally:
        consumer.close()
    assert len(batch) == 2 and batch.n_steps.tolist() == [1, 0] and batch.route.tolist() == ["b", ""]
    assert batch.latency_us.tolist() == [3, 0] and batch.quality.tolist() == [0.5, 0.25]
    assert batch.act_len.tolist() == [[5, 0, 0, 0], [0] * S] and batch.att_len.tolist() == [[2, 0, 0, 0], [0] * S]
    assert batch.rewards.tolist() == [[-1.0, 0, 0, 0], [0] * S]
    expected_act = np.zeros((2, S, H), np.float32)
    expected_act[0, 0, :5] = np.arange(1, 6)
    expected_att = np.zeros((2, S, A), np.float32)
    expected_att[0, 0, :2] = [0.5, 0.25]
    assert np.array_equal(batch.activations, expected_act) and np.array_equal(batch.attention, expected_att)
    first, second = batch.trajectories()
    assert_same_trajectory(first, short)
    assert_same_trajectory(second, empty)


def test_without_a_consumer_the_buffer_keeps_the_oldest_and_counts_the_rest(engine):
    flusher = engine(capacity=8, lane_slots=32)
    client = engine.attach()
    trajectories = rich_trajectories(1, 12)
    for t in trajectories:
        assert client.record(t)
    flusher.scan()
    assert client.buffer_stats() == (8, 4, pytest.approx(8 / 12))
    assert client.stats()["trajectories_processed"] == 12  # the dropped ones were learned all the same
    got = client.drain_n(np.int64(5))
    assert [t.id for t in got] == [0, 1, 2, 3, 4]
    for t in rich_trajectories(2, 3, first_id=100):
        client.record(t)
    flusher.scan()
    assert client.buffer_stats() == (6, 4, pytest.approx(11 / 15))
    assert [t.id for t in client.drain()] == [5, 6, 7, 100, 101, 102]
    assert client.buffer_stats() == (0, 4, pytest.approx(11 / 15)) and client.drain() == []


def test_a_held_drain_lock_makes_others_wait_and_a_failed_block_gives_nothing_away(engine, name, consumers):
    flusher = engine()
    client = engine.attach()
    for t in rich_trajectories(4, 5):
        client.record(t)
    flusher.scan()
    a, b = consumers(name), consumers(name)
    with a.draining(2) as held:
        assert held.traj_id.tolist() == [0, 1]
        with pytest.raises(DrainTimeoutError, match=f"drain lock stayed held \\(pid {os.getpid()}, the last consumer"):
            b.drain(timeout=0.05)
        assert b.buffer_stats()[0] == 5  # nothing leaves before the block ends
    with pytest.raises(RuntimeError, match="the sink failed"):
        with b.draining() as batch:
            assert batch.traj_id.tolist() == [2, 3, 4]
            raise RuntimeError("the sink failed")
    assert [t.id for t in a.drain()] == [2, 3, 4]
    assert client.stats()["buffer"]["drained"] == 5
    assert a._segment.held_locks([LOCK_DRAIN]) == [False]


def test_a_corrupt_slot_is_logged_and_skipped_not_wedging_the_buffer(engine, name, consumers, caplog):
    flusher = engine()
    client = engine.attach()
    for t in rich_trajectories(9, 5):
        client.record(t)
    flusher.scan()
    consumer = consumers(name)
    consumer._slots["seq"][1] = 77  # as if something scribbled over the buffer
    consumer._slots["n_steps"][3] = S + 1
    with caplog.at_level("ERROR", logger="sona_shm.consumer"):
        assert [t.id for t in consumer.drain()] == [0, 2, 4]
    assert "2 buffer slots fail their checks (first index 1); skipped" in caplog.text
    assert client.stats()["buffer"]["drained"] == 5 and consumer.drain() == []


def test_nested_drain_in_one_thread_fails_at_once(engine, name, consumers):
    engine()
    consumer = consumers(name)
    with consumer.draining():
        with pytest.raises(SonaShmError, match="already draining"):
            consumer.drain_n(1)


@pytest.fixture
def fast_switching():
    """Switch threads every 10 µs instead of 5 ms, so races show up if there are any."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def test_threads_and_consumers_never_receive_a_trajectory_twice(engine, name, consumers, fast_switching):
    flusher = engine(capacity=16, lane_slots=32)
    client = engine.attach()
    shared = consumers(name)
    drainers = [shared, shared, shared, consumers(name), consumers(name)]
    produced = threading.Event()
    got: list[list[int]] = [[] for _ in drainers]
    errors = []

    def work(k: int) -> None:
        rng = np.random.default_rng(k)
        try:
            while True:
                done = produced.is_set()
                ids = [t.id for t in drainers[k].drain_n(int(rng.integers(1, 6)), timeout=30)]
                got[k] += ids
                if done and not ids:
                    return
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(drainers))]
    for t in threads:
        t.start()
    for chunk in range(30):
        for t in rich_trajectories(chunk, 10, first_id=chunk * 10):
            assert client.record(t)
        flusher.scan()
    produced.set()
    for t in threads:
        t.join(60)
    assert not errors
    everything = [i for ids in got for i in ids]
    assert len(everything) == len(set(everything))
    for ids in got:
        assert ids == sorted(ids)  # oldest first, and one lane learns in order
    buffer = client.stats()["buffer"]
    assert buffer["len"] == 0 and buffer["drained"] == len(everything)
    assert len(everything) + buffer["dropped"] == 300


def test_a_fork_child_uses_its_own_descriptor(engine, children, name, consumers):
    flusher = engine()
    client = engine.attach()
    for t in rich_trajectories(5, 4):
        client.record(t)
    flusher.scan()
    consumer = consumers(name)

    def in_child(body) -> int:
        return children.wait(children.add(fork_child(lambda: os._exit(body()), deadline=60)))

    def drain_while_parent_holds() -> int:
        try:
            consumer.drain(timeout=0.1)
        except DrainTimeoutError:
            return 0  # the parent's lock excludes the child
        return 1

    with consumer.draining(1):
        assert in_child(drain_while_parent_holds) == 0
        assert consumer._segment.held_locks([LOCK_DRAIN]) == [True]  # the child's exit did not drop it
    assert in_child(lambda: len(consumer.drain())) == 3
    assert consumer.buffer_stats()[0] == 0


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda c: c.drain_n(-1), "n: expected an integer in [0, "),
        (lambda c: c.drain_n(1.5), "got 1.5"),
        (lambda c: c.drain_n(True), "got True"),
        (lambda c: c.drain_arrays(-3), "got -3"),
        (lambda c: c.drain(timeout=-1), "timeout: expected a finite number of seconds >= 0, got -1"),
        (lambda c: c.drain_n(2, timeout=float("nan")), "timeout: expected a finite number of seconds >= 0, got nan"),
    ],
)
def test_bad_arguments_raise_and_drain_nothing(engine, name, consumers, call, fragment):
    flusher = engine()
    client = engine.attach()
    client.record(rich_trajectories(6, 1)[0])
    flusher.scan()
    consumer = consumers(name)
    with pytest.raises(InvalidInputError) as info:
        call(consumer)
    assert fragment in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(InvalidInputError):
        call(client)
    assert consumer.buffer_stats()[0] == 1


def test_bad_names_and_closed_consumers(engine, name):
    with pytest.raises(InvalidInputError, match="name: expected 1-64 characters"):
        open_consumer("a/b")
    with pytest.raises(SegmentNotFoundError, match=f"segment {name!r} does not exist"):
        open_consumer(name)
    engine()
    consumer = open_consumer(name)
    consumer.close()
    consumer.close()
    with pytest.raises(ClosedError, match="open it again"):
        consumer.drain()
    client = engine.attach()
    client.close()
    with pytest.raises(ClosedError, match="attach again"):
        client.drain()


def test_drain_to_file_writes_a_plain_npz_then_lets_go(engine, name, tmp_path):
    flusher = engine()
    client = engine.attach()
    trajectories = rich_trajectories(7, 9)
    for t in trajectories:
        client.record(t)
    flusher.scan()
    out = tmp_path / "part-0.npz"
    assert drain_to_file(name, out, n=6) == 6
    with np.load(out) as data:  # plain numpy, no pickle
        assert data["traj_id"].tolist() == list(range(6)) and data["activations"].shape == (6, S, H)
        assert data["route"].tolist() == [t.route or "" for t in trajectories[:6]]
    for got, expected in zip(TrajectoryBatch.load(out).trajectories(), trajectories):
        assert_same_trajectory(got, expected)
    assert drain_to_file(name, tmp_path / "part-1.npz") == 3
    assert drain_to_file(name, tmp_path / "part-2.npz") == 0
    assert len(TrajectoryBatch.load(tmp_path / "part-2.npz")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-0.npz", "part-1.npz", "part-2.npz"]  # no temporary left


def test_drain_to_file_refuses_or_fails_without_losing_anything(engine, name, tmp_path, monkeypatch):
    flusher = engine()
    client = engine.attach()
    for t in rich_trajectories(8, 4):
        client.record(t)
    flusher.scan()
    taken = tmp_path / "taken.npz"
    taken.write_bytes(b"someone else's")
    with pytest.raises(InvalidInputError, match="out: expected a new file, .* exists"):
        drain_to_file(name, taken)
    with pytest.raises(InvalidInputError, match="is not a directory"):
        drain_to_file(name, tmp_path / "missing" / "x.npz")
    with pytest.raises(InvalidInputError, match="n: expected an integer"):
        drain_to_file(name, tmp_path / "x.npz", n=-1)

    def broken_save(self, file):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TrajectoryBatch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        drain_to_file(name, tmp_path / "x.npz")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.npz"] and taken.read_bytes() == b"someone else's"
    assert client.buffer_stats()[0] == 4
    assert drain_to_file(name, tmp_path / "x.npz") == 4
