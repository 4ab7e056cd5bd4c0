"""The producer client against an in-process flusher driven by ``scan()``."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from sona_shm import (
    ClosedError,
    FlusherTimeoutError,
    InstantLoop,
    InvalidInputError,
    LayoutMismatchError,
    NoFreeLaneError,
    Step,
    Trajectory,
)
from sona_shm.engine import client as client_module
from sona_shm.engine import flusher as flusher_module
from sona_shm.engine.client import attach
from sona_shm.shm import lane as lane_module
from sona_shm.shm.layout import FLUSHER_WORDS, LANE_HEAD, LOCK_LANE_BASE
from sona_shm.shm.segment import Segment
from sona_shm.supervise import set_deadline

from children import fork_child
from conftest import SMALL
from support import make_trajectories, wait_for

H = SMALL["hidden_dim"]


@pytest.fixture(autouse=True, params=["c", "python"])
def record_path(request, monkeypatch):
    """Every test here runs through the C fast paths and through the pure-Python ones."""
    if request.param == "python":
        monkeypatch.setattr(client_module, "_speedups", None)  # forward()
        monkeypatch.setattr(lane_module, "_speedups", None)  # record(), for lanes claimed from now on
        monkeypatch.setattr(flusher_module, "_speedups", None)  # the in-process flusher's learner
    elif client_module._speedups is None:
        pytest.skip("C fast paths not built or disabled")
    return request.param


def one_step(value: float = 1.0, quality: float = 1.0) -> Trajectory:
    return Trajectory(np.full(H, value, np.float32), [Step(np.arange(H, dtype=np.float32), None, value)], quality)


def test_record_then_scan_learns_each_trajectory_once(engine):
    flusher = engine()
    client = engine.attach()
    for t in make_trajectories(1, 25, H):
        assert client.record(t)
    assert flusher.scan() == 25
    assert flusher.scan() == 0
    stats = client.stats()
    assert stats["trajectories_processed"] == stats["signals_accumulated"] == stats["recorded"] == 25
    assert stats["flushes_performed"] == 2 and stats["pending_signals"] == 5
    assert stats["lanes"][0]["learned"] == 25 and stats["lanes"][0]["alive"] is True


def test_same_weights_as_instant_loop(engine):
    flusher = engine()
    client = engine.attach()
    reference = InstantLoop(H, SMALL["rank"], SMALL["lr"], SMALL["flush_threshold"])
    for i, t in enumerate(make_trajectories(2, 57, H)):
        client.record(t)
        reference.on_trajectory(t)
        if i % 13 == 0:
            flusher.scan()  # batches of varying size, cut at the threshold
    flusher.scan()
    probes = np.random.default_rng(0).standard_normal((5, H)).astype(np.float32)
    np.testing.assert_allclose(client.forward(probes), reference.forward(probes), atol=1e-6)


def test_full_lane_drops_and_counts_exactly(engine):
    flusher = engine(lane_slots=8)
    client = engine.attach()
    results = [client.record(one_step()) for _ in range(11)]
    assert results == [True] * 8 + [False] * 3
    stats = client.stats()
    assert stats["lane_dropped"] == 3 and stats["lanes"][0]["drops"] == 3
    assert flusher.scan() == 8
    assert client.record(one_step())  # room again once the tail is committed
    assert flusher.scan() == 1 and client.stats()["trajectories_processed"] == 9


def test_blocking_record_waits_for_room(engine):
    flusher = engine(lane_slots=2)
    client = engine.attach()
    assert client.record(one_step()) and client.record(one_step())
    thread = threading.Thread(target=lambda: wait_for(lambda: flusher.scan(), what="a scan that learns"))
    thread.start()
    assert client.record(one_step(), timeout=30)
    thread.join(30)
    assert client.stats()["lane_dropped"] == 0


def test_bad_input_writes_nothing(engine, name):
    flusher = engine()
    client = engine.attach()
    head_word = (client.layout.lane_control(client.lane) + LANE_HEAD) // 8
    with pytest.raises(InvalidInputError, match=r"steps: expected at most 4 steps \(max_steps of segment"):
        client.record(Trajectory(np.ones(H), [Step([1.0], None, 1.0)] * 5, 1.0))
    with pytest.raises(InvalidInputError, match="query: expected 16 values"):
        client.record(Trajectory(np.ones(H + 1), [], 1.0))
    with pytest.raises(InvalidInputError, match=r"steps\[0\].attention: expected at most 8 values"):
        client.record(Trajectory(np.ones(H), [Step([1.0], np.ones(9), 1.0)], 1.0))
    assert client._u64[head_word] == 0 and flusher.scan() == 0
    assert client.stats()["recorded"] == 0


class UnderReportingSteps(list):
    """A list whose len() says 1 whatever it holds."""

    def __len__(self) -> int:
        return 1


@pytest.mark.guarantee("bad-input-changes-nothing")
def test_a_sequence_whose_len_lies_cannot_overrun_its_slot(engine):
    """Its len() passed the max_steps check, then all its steps were written, over the next
    slot: a committed neighbour was lost. Validation and writing now see one snapshot."""
    flusher = engine(lanes=2, lane_slots=2)
    client = engine.attach()
    neighbour = engine.attach()  # the lane whose first slot lies right after ours in memory
    layout = client.layout
    assert client.record(one_step(1.0))  # our slot 0; slot 1 is last in our ring
    assert neighbour.record(one_step(2.0))  # committed, not yet learned
    seg = client._segment
    start = layout.lane_slot(client.lane, 1)
    before = bytes(seg.buf[start : start + 3 * layout.slot_bytes])  # our slot 1 and what follows it
    steps = UnderReportingSteps([Step(np.full(H, 9.0, np.float32), np.ones(8, np.float32), 9.0)] * 12)
    with pytest.raises(InvalidInputError, match=r"steps: expected a sequence whose len\(\) matches its items, got len\(\) 1 and 2 or more"):
        client.record(Trajectory(np.ones(H, np.float32), steps, 1.0))
    after = bytes(seg.buf[start : start + 3 * layout.slot_bytes])
    assert after[layout.slot_bytes :] == before[layout.slot_bytes :]  # nothing past our own slot changed
    assert client.record(Trajectory(np.ones(H, np.float32), UnderReportingSteps([one_step().steps[0]]), 1.0))  # an honest one
    assert flusher.scan() == 3 and client.stats()["trajectories_processed"] == 3


@pytest.mark.guarantee("nothing-waits-forever")
def test_a_batch_of_slots_that_all_fail_their_check_is_committed(engine):
    """The flusher moved its tail past them but did not commit it, so sync() timed out."""
    flusher = engine()
    client = engine.attach()
    for _ in range(3):
        client.record(one_step())
    layout = client.layout
    for i in range(3):  # memory corruption: every stamp wrong
        client._segment.u64[layout.lane_slot(client.lane, i) // 8] = 999
    flusher.scan()
    client.sync(timeout=5)  # the tail moved and was published
    stats = client.stats()
    assert stats["trajectories_processed"] == 0 and [lane["learned"] for lane in stats["lanes"]] == [3]


def stale_nan_in_head_slot(client) -> None:
    """What a writer killed (or interrupted) after copying a refused trajectory leaves: NaN
    in the unpublished head slot, here in step 0's attention past what the next one uses."""
    layout = client.layout
    at = client._writer.slot_offset + layout.payload_offset + 4 * H + 4 * H  # step 0's attention
    floats = np.ndarray((layout.attention_dim,), np.float32, buffer=client._segment.numpy_buffer(), offset=at)
    floats[:] = np.nan
    del floats


def test_stale_non_finite_values_in_the_head_slot_do_not_refuse_a_valid_trajectory(engine):
    flusher = engine()
    client = engine.attach()
    stale_nan_in_head_slot(client)
    assert client.record(Trajectory(np.ones(H, np.float32), [Step(np.ones(H, np.float32), None, 1.0)], 1))  # handed back by C
    stale_nan_in_head_slot(client)
    assert client.record(Trajectory(np.ones(H, np.float32), [Step(np.ones(H, np.float32), np.ones(2, np.float32), 1.0)], 1.0))
    with pytest.raises(InvalidInputError, match=r"steps\[0\].attention: expected finite"):
        client.record(Trajectory(np.ones(H, np.float32), [Step(np.ones(H, np.float32), np.full(2, np.nan, np.float32), 1.0)], 1.0))
    assert flusher.scan() == 2


def test_a_torn_read_while_claiming_leaves_no_half_claimed_lane(engine, monkeypatch):
    from sona_shm.shm.ledger import Ledger, TornRead

    flusher = engine(lane_slots=4)
    client = engine.attach()
    for _ in range(6):  # past one ring: head 6, committed tail 6
        client.record(one_step())
        flusher.scan()
    client.release_lane()
    real = Ledger.lane_tail
    torn = iter([True])

    def lane_tail(self, lane):
        if next(torn, False):
            raise TornRead("lane tail")
        return real(self, lane)

    monkeypatch.setattr(Ledger, "lane_tail", lane_tail)
    with pytest.raises(TornRead):
        client.record(one_step())  # the claim gives up (1000 torn reads in a row)
    assert client._writer is None
    assert client._segment.held_locks([LOCK_LANE_BASE + lane for lane in range(SMALL["lanes"])]) == [False] * SMALL["lanes"]
    assert [client.record(one_step()) for _ in range(3)] == [True] * 3  # was: False, silently, forever
    assert flusher.scan() == 3 and client.stats()["lane_dropped"] == 0


def test_forward_keeps_its_last_weights_when_the_generation_read_is_torn(engine, monkeypatch):
    from sona_shm.shm.ledger import Ledger, TornRead

    flusher = engine(flush_threshold=1)
    client = engine.attach()
    x = np.ones(H, np.float32)
    client.record(one_step(1.0))
    flusher.scan()
    expected = client.forward(x)  # weights of generation 1, cached
    assert not np.array_equal(expected, x)  # something was learned: the adapter is not the identity
    client.record(one_step(-3.0, quality=2.0))
    flusher.scan()  # generation 2, not yet seen by this client
    newer = engine.attach().forward(x)
    assert not np.array_equal(newer, expected)

    def torn(self):
        raise TornRead("ledger generation")

    monkeypatch.setattr(Ledger, "generation", torn)
    np.testing.assert_array_equal(client.forward(x), expected)  # neither the identity nor weights it could not check


def test_ids_are_unique_across_clients_and_kept_when_given(engine):
    flusher = engine(capacity=64)
    a = engine.attach()
    b = engine.attach()
    assert a.lane != b.lane
    ids = [a.next_id() for _ in range(5)] + [b.next_id() for _ in range(5)]
    assert len(set(ids)) == 10
    a.record(Trajectory(np.ones(H), [], 1.0, id=123456))
    a.record(Trajectory(np.ones(H), [], 1.0))
    flusher.scan()
    buffered = flusher._buffer_bytes  # the buffer keeps the ids for consumers
    stored = [int.from_bytes(bytes(buffered[i, 8:16]), "little") for i in range(2)]
    assert stored[0] == 123456 and stored[1] not in ids and stored[1] % SMALL["lanes"] == a.lane


def test_forward_uses_newest_weights_and_caches_by_generation(engine):
    flusher = engine(flush_threshold=1000)
    client = engine.attach()
    x = np.linspace(-1, 1, H, dtype=np.float32)
    assert client.forward(x).tolist() == x.tolist()
    cached = client._weights
    client.forward(x)
    assert client._weights is cached  # unchanged generation: no copy
    for t in make_trajectories(3, 20, H):
        client.record(t)
    flusher.scan()
    assert client.forward(x).tolist() == x.tolist()  # learned, not yet flushed
    flusher.flush_now()
    moved = client.forward(x)
    assert not np.array_equal(moved, x) and client._weights is not cached
    batch = client.forward(np.stack([x, x, x]))
    np.testing.assert_allclose(batch, [moved] * 3, atol=1e-7)


@pytest.mark.parametrize("x", [np.ones(H + 1, np.float32), np.full(H, np.nan, np.float32), [[np.inf] * H], "x"])
def test_forward_refuses_bad_vectors(engine, x):
    engine()
    with pytest.raises(InvalidInputError, match="^x: expected"):
        engine.attach().forward(x)


def test_attach_checks_expected_dimensions(engine, name):
    engine()
    with pytest.raises(LayoutMismatchError, match="hidden_dim: expected 32, segment .* has 16"):
        attach(name, hidden_dim=32)


def test_lanes_run_out_and_come_back(engine, name):
    engine(lanes=2)
    first = engine.attach()
    engine.attach()
    with pytest.raises(NoFreeLaneError, match="all 2 lanes are held by live processes"):
        attach(name)
    first.record(one_step())
    lane = first.lane
    first.close()
    again = engine.attach()
    assert again.lane == lane
    again.record(one_step())
    assert again.stats()["lanes"][lane]["records"] == 2  # the lane's head continues


def test_release_lane_frees_it_and_the_next_record_claims_again(engine, name):
    flusher = engine(lanes=1)
    client = engine.attach()
    client.record(one_step())
    client.release_lane()
    other = attach(name)  # the only lane is free again
    other.record(one_step())
    other.close()
    client.record(one_step())  # claims the lane anew and continues at its head
    assert flusher.scan() == 3
    assert client.stats()["lanes"][0]["records"] == 3 and client.stats()["lanes"][0]["claims"] == 3


def test_threads_share_one_lane_and_lose_nothing(engine):
    flusher = engine(lane_slots=4096, flush_threshold=100)
    client = engine.attach()
    trajectories = make_trajectories(4, 200, H)
    errors = []

    def work():
        try:
            for t in trajectories:
                assert client.record(t)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    ids = [client.next_id() for _ in range(100)]
    for t in threads:
        t.join(60)
    assert not errors
    assert flusher.scan() == 800
    assert client.stats()["trajectories_processed"] == 800 and len(set(ids)) == 100


def test_fork_after_attach_gives_the_child_its_own_lane(engine, children, name):
    flusher = engine()
    client = engine.attach()
    client.record(one_step())
    parent_lane = client.lane
    read, write = os.pipe()

    def child() -> None:  # record through the inherited client
        os.close(read)
        for _ in range(3):
            client.record(one_step())
        os.write(write, str(client.lane).encode())

    pid = children.add(fork_child(child, deadline=60))
    os.close(write)
    status = children.wait(pid)
    child_lane = int(os.read(read, 16))
    os.close(read)
    assert status == 0
    assert child_lane != parent_lane
    client.record(one_step())
    assert client.lane == parent_lane
    assert client._segment.held_locks([LOCK_LANE_BASE + parent_lane, LOCK_LANE_BASE + child_lane]) == [True, False]
    assert flusher.scan() == 5
    lanes = {lane["lane"]: lane["records"] for lane in client.stats()["lanes"]}
    assert lanes == {parent_lane: 2, child_lane: 3}


def test_a_fork_child_does_not_keep_its_dead_parents_lane(engine, children, name):
    engine()
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def child() -> None:  # attach, record, fork a grandchild that keeps everything mapped, exit
        client = attach(name)
        client.record(one_step())
        forked_r, forked_w = os.pipe()
        grandchild = os.fork()
        if grandchild == 0:  # the at-fork hooks have run once fork() returns here
            set_deadline(60)  # it must outlive the child, so it cannot die with it; it ends when
            os.close(hold_w)  # the test closes its end of this pipe, or exits, or at the deadline
            os.close(forked_w)  # tells the child we are past them
            os.read(hold_r, 1)
            os._exit(0)
        os.close(forked_w)
        os.read(forked_r, 1)  # EOF once the grandchild closed its copy
        os.write(report_w, f"{client.lane} {grandchild}".encode())

    pid = children.add(fork_child(child, deadline=60))
    os.close(report_w)
    os.close(hold_r)
    try:
        status = children.wait(pid)
        lane, grandchild = map(int, os.read(report_r, 64).split())
        assert status == 0
        os.kill(grandchild, 0)  # still alive, still holding the inherited client and mapping
        # Probe without attaching: an attach would claim a lane, maybe this very one.
        probe = Segment.open(name, writable=False)
        try:
            assert probe.held_locks([LOCK_LANE_BASE + lane]) == [False]
        finally:
            probe.close()
    finally:
        os.close(hold_w)  # lets the grandchild exit
        os.close(report_r)


def test_flush_and_sync_time_out_clearly_without_a_flusher(engine):
    engine().close()  # created, then its flusher goes away
    client = engine.attach()
    client.record(one_step())
    with pytest.raises(FlusherTimeoutError, match="sync\\(\\) on segment .* timed out after 0.05 s: no flusher is running"):
        client.sync(timeout=0.05)
    with pytest.raises(FlusherTimeoutError, match="flush\\(\\)"):
        client.flush(timeout=0.05)


def test_flush_request_is_answered_after_learning(engine):
    flusher = engine(flush_threshold=1000)
    client = engine.attach()
    for t in make_trajectories(5, 7, H):
        client.record(t)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (client.flush(timeout=30), done.set()))
    thread.start()
    wait_for(lambda: (flusher.scan(), done.is_set())[1], what="the flush request to be answered")
    thread.join(30)
    stats = client.stats()
    assert stats["flushes_performed"] == 1 and stats["updates_applied"] == 7 and stats["pending_signals"] == 0


def test_closed_client_refuses_politely(engine):
    engine()
    client = engine.attach()
    client.close()
    client.close()
    from sona_shm import ClosedError

    with pytest.raises(ClosedError, match="attach again"):
        client.record(one_step())


def test_close_waits_for_a_record_in_progress_and_later_calls_say_closed(engine):
    engine(lane_slots=4096)
    client = engine.attach()
    outcomes: list[str] = []
    started = threading.Event()

    def keep_recording():
        started.set()
        while True:
            try:
                client.record(one_step())
                outcomes.append("ok")
            except ClosedError:
                outcomes.append("closed")
                return
            except Exception as exc:  # pragma: no cover - reported below
                outcomes.append(repr(exc))
                return

    thread = threading.Thread(target=keep_recording)
    thread.start()
    started.wait(10)
    wait_for(lambda: len(outcomes) > 10, what="some records")
    client.close()
    thread.join(30)
    assert outcomes[-1] == "closed" and set(outcomes[:-1]) == {"ok"}
    for call in (lambda: client.forward(np.ones(H, np.float32)), client.stats, client.sync, client.flush, client.next_id):
        with pytest.raises(ClosedError, match="attach again"):
            call()


@pytest.mark.guarantee("nothing-waits-forever")
def test_close_while_another_thread_waits_for_room_says_closed(engine, monkeypatch):
    """close() used to wait its 10 s for the waiter's lock, and the waiter then died of AttributeError: _ledger."""
    monkeypatch.setattr(client_module, "CLOSE_WAIT", 60.0)
    engine(lane_slots=2)  # never scanned: the lane stays full
    client = engine.attach()
    assert client.record(one_step()) and client.record(one_step())
    waiting, outcome = threading.Event(), []
    real = client_module.Client._record_when_room

    def record_when_room(self, traj, timeout):
        waiting.set()
        return real(self, traj, timeout)

    monkeypatch.setattr(client_module.Client, "_record_when_room", record_when_room)

    def wait_for_room() -> None:
        try:
            outcome.append(client.record(one_step(), timeout=30.0))
        except Exception as exc:  # reported below
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=wait_for_room)
    thread.start()
    assert waiting.wait(30)
    client.close()  # takes the lock between two of the waiter's looks
    thread.join(60)
    assert outcome == ["ClosedError"]  # not False after 30 s (the old lock-holding wait), nor AttributeError


@pytest.mark.guarantee("nothing-waits-forever")
def test_a_record_that_does_not_wait_never_waits_for_one_that_does(engine, monkeypatch):
    """A record() with timeout 0 once took 1.95 s: another thread held the lock while waiting in record(timeout=2)."""
    flusher = engine(lane_slots=2)
    client = engine.attach()
    assert client.record(one_step()) and client.record(one_step())  # full
    waiting, done, outcome = threading.Event(), threading.Event(), []
    real = client_module.Client._record_when_room

    def record_when_room(self, traj, timeout):
        waiting.set()
        return real(self, traj, timeout)

    monkeypatch.setattr(client_module.Client, "_record_when_room", record_when_room)
    thread = threading.Thread(target=lambda: (outcome.append(client.record(one_step(), timeout=60.0)), done.set()))
    thread.start()
    assert waiting.wait(30)
    assert client.record(one_step()) is False  # dropped at once, counted
    assert not done.is_set()  # while the other one still waits for room
    flusher.scan()  # room: the waiter records
    thread.join(60)
    assert outcome == [True]
    assert client.stats()["lane_dropped"] == 1 and flusher.scan() == 1


def test_a_sleeping_flusher_is_rung_once_however_many_producers_publish(engine):
    """The producer that finds the flusher asleep takes the idle word back to 0 and rings; the others do not. Every
    record rang until the woken flusher cleared the word: under load, thousands of sem_post calls per wake-up."""
    engine()
    clients = [engine.attach(), engine.attach()]
    rings = []
    for client in clients:
        segment = client._open_segment()
        segment.ring = lambda: rings.append(1)  # type: ignore[method-assign]
    idle = FLUSHER_WORDS.idle
    u64 = clients[0]._u64
    for round_ in range(3):
        u64[idle] = 1  # the flusher went to sleep on the doorbell
        for i, t in enumerate(make_trajectories(round_, 6, SMALL["hidden_dim"])):
            assert clients[i % 2].record(t)
        assert len(rings) == round_ + 1 and u64[idle] == 0
    assert clients[0].record(make_trajectories(9, 1, SMALL["hidden_dim"])[0]) and len(rings) == 3  # awake: no ring
