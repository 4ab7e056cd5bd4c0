"""Fault injection: producers and flushers killed with SIGKILL at random and chosen instants.

Every test checks exact accounting — which trajectory ids were learned (read back from
the buffer), that each learned slot holds exactly what its producer wrote, and that the
weights equal an :class:`InstantLoop` fed exactly the learned trajectories in learning
order. Kill instants come from a seeded RNG; readiness is waited on, never slept on.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from sona_shm import InstantLoop
from sona_shm.engine.client import attach
from sona_shm.engine.flusher import Flusher
from sona_shm.shm.layout import (
    FL_IDLE,
    FLUSHER_LINE,
    LANE_CLAIMS,
    LANE_HEAD,
    LANE_OWNER_PID,
    LANE_OWNER_START,
    LOCK_DRAIN,
    LOCK_FLUSHER,
    LOCK_LANE_BASE,
    EngineConfig,
)
from sona_shm.shm.ledger import Ledger
from sona_shm.shm.segment import Segment, process_alive, start_ticks
from sona_shm.stats import read_stats
from sona_shm.supervise import stop_process

from children import fork_child
from conftest import SMALL
from faults import ID_BASE, Progress, check_slot, expected, fork_producer, learned
from support import wait_for

H = 16
#: The flusher of these tests: small lanes (so they fill and drop), a buffer that never does.
ENGINE = ["--hidden-dim", str(H), "--rank", "2", "--lr", "0.01", "--flush-threshold", "10", "--max-steps", "4", "--attention-dim", "8"]


def flusher_options(lanes: int, lane_slots: int, capacity: int) -> list[str]:
    return ENGINE + ["--lanes", str(lanes), "--lane-slots", str(lane_slots), "--capacity", str(capacity)]


def all_learned(name: str) -> bool:
    stats = read_stats(name)
    return all(lane["records"] == lane["learned"] for lane in stats["lanes"])


def check_learned_exactly(name: str, lr: float = 0.01, threshold: int = 10) -> list[int]:
    """Everything committed is learned once, each slot intact, weights = InstantLoop on the same; the ids."""
    wait_for(lambda: all_learned(name), what="every committed trajectory to be learned")
    entries = learned(name)
    ids = [tid for tid, _ in entries]
    assert len(ids) == len(set(ids)), "a trajectory was learned twice"
    cache: dict = {}
    reference = InstantLoop(H, 2, lr, threshold, capacity=0)
    for tid, slot in entries:
        traj = expected(tid, H, cache)
        check_slot(slot, traj, f"slot of trajectory {divmod(tid, ID_BASE)} differs from what was recorded")
        reference.on_trajectory(traj)
    seg = Segment.open(name, writable=False)
    ledger = Ledger(seg)
    try:
        up, grad_up, pending, processed = ledger.read("up", "grad_up", "pending", "trajectories_processed")
    finally:
        ledger.close()
        seg.close()
    assert processed == len(ids) and pending == reference.pending
    np.testing.assert_allclose(up, reference.up, atol=1e-5, rtol=0)
    np.testing.assert_allclose(grad_up, reference._learner.grad_up, atol=1e-5, rtol=0)
    return ids


def by_producer(ids: list[int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for tid in ids:
        p, k = divmod(tid, ID_BASE)
        out.setdefault(p, set()).add(k)
    return out


# --------------------------------------------------------------------- producers


@pytest.mark.guarantee("a-killed-producer-costs-at-most-its-one-in-flight-trajectory")
def test_producers_killed_at_random_moments_lose_at_most_their_in_flight_trajectory(procs, children, name, tmp_path):
    """40 producers SIGKILLed at random instants (in start-up, claiming a lane, mid-record) while a
    witness records throughout: exact per-producer and per-lane accounting, no stall."""
    rng = np.random.default_rng(20240501)
    kills = 40
    flusher = procs.flusher(name, *flusher_options(lanes=4, lane_slots=16, capacity=200_000))
    stop = str(tmp_path / "stop")
    witness = children.add(fork_producer(name, 0, str(tmp_path / "p0"), stop_file=stop, pace=0.0005))
    wait_for(lambda: len(Progress.read(str(tmp_path / "p0")).results) > 0, what="the witness to record")
    victims: list[int] = []
    running: dict[int, int] = {}  # producer -> pid; two victims at a time

    def kill_one(p: int) -> None:
        pid = running.pop(p)
        path = str(tmp_path / f"p{p}")
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0, 0.004))  # the injected fault: somewhere in start-up or claiming
        else:
            target = int(rng.integers(0, 400))
            # Wait for progress, not time: the kill then lands at a random point of a record().
            wait_for(lambda: len(Progress.read(path).results) >= target or Progress.read(path).finished, what=f"producer {p}")
        witnessed = len(Progress.read(str(tmp_path / "p0")).results)
        children.kill(pid)
        # Nobody stalls: the witness keeps recording right after each kill.
        wait_for(lambda: len(Progress.read(str(tmp_path / "p0")).results) > witnessed, what="the witness to go on")

    for p in range(1, kills + 1):
        running[p] = children.add(fork_producer(name, p, str(tmp_path / f"p{p}")))
        victims.append(p)
        if len(running) == 2:
            kill_one(min(running))
    while running:
        kill_one(min(running))
    open(stop, "w").close()
    assert children.wait(witness) == 0
    assert flusher.poll() is None

    ids = check_learned_exactly(name)
    learned_by = by_producer(ids)
    progress = {p: Progress.read(str(tmp_path / f"p{p}")) for p in [0, *victims]}
    stats = read_stats(name)
    lanes = {lane["lane"]: lane for lane in stats["lanes"]}

    attempted = lost_or_dropped_in_flight = 0
    for p, prog in progress.items():
        got = learned_by.get(p, set())
        if prog.lane is None:
            assert not got, f"producer {p} never attached yet has learned trajectories"
            continue
        assert prog.committed <= got, f"producer {p}: a committed trajectory was not learned"
        assert not (prog.dropped & got), f"producer {p}: a dropped trajectory was learned"
        extra = got - prog.committed
        if p == 0:
            assert prog.finished and not extra
        else:
            assert extra <= {len(prog.results)}, f"producer {p}: learned {sorted(extra)} beyond its in-flight record"
            attempted += 1  # its in-flight record(), if the kill landed in one
            lost_or_dropped_in_flight += not extra
        attempted += len(prog.results)

    learned_total = stats["trajectories_processed"]
    drops = stats["lane_dropped"]
    reported_drops = sum(len(prog.dropped) for prog in progress.values())
    lost = attempted - learned_total - drops
    assert learned_total == len(ids) == sum(lane["learned"] for lane in lanes.values()) == stats["recorded"]
    assert reported_drops <= drops <= reported_drops + kills
    assert 0 <= lost <= kills and lost + (drops - reported_drops) == lost_or_dropped_in_flight
    for lane, info in lanes.items():  # per lane: its producers' learned trajectories are its learned count
        on_lane = [p for p, prog in progress.items() if prog.lane == lane]
        assert info["learned"] == sum(len(learned_by.get(p, ())) for p in on_lane)
        assert info["drops"] >= sum(len(progress[p].dropped) for p in on_lane)
    print(f"attempted {attempted}, learned {learned_total}, lane drops {drops}, lost to kills {lost} (<= {kills} kills)")


@pytest.mark.guarantee("a-killed-producer-costs-at-most-its-one-in-flight-trajectory")
def test_producer_killed_while_claiming_a_lane_leaves_it_claimable(engine, children, name, tmp_path):
    flusher = engine(lanes=1)
    pid = children.add(fork_producer(name, 1, str(tmp_path / "p1"), limit=5, pause="claim"))
    children.wait_stopped(pid)  # it holds the lane lock; the owner fields are not written yet
    seg = Segment.open(name, writable=False)
    try:
        ctl = seg.layout.lane_control(0) // 8
        assert seg.held_locks([LOCK_LANE_BASE]) == [True] and seg.u64[ctl + LANE_CLAIMS // 8] == 0
        children.kill(pid)
        assert seg.held_locks([LOCK_LANE_BASE]) == [False]
        client = engine.attach()  # the only lane, at once
        assert client.lane == 0 and seg.u64[ctl + LANE_OWNER_PID // 8] == os.getpid() and seg.u64[ctl + LANE_CLAIMS // 8] == 1
    finally:
        seg.close()
    assert client.record(expected(2 * ID_BASE, H, {})) and flusher.scan() == 1


@pytest.mark.guarantee("a-killed-producer-costs-at-most-its-one-in-flight-trajectory")
def test_producer_killed_just_before_publishing_loses_only_that_trajectory(engine, children, name, tmp_path):
    flusher = engine(lanes=1, capacity=64)
    path = str(tmp_path / "p1")
    pid = children.add(fork_producer(name, 1, path, limit=10, pause="head", pause_at=5))
    children.wait_stopped(pid)  # trajectory 5 is written and stamped; the head still says 5
    seg = Segment.open(name, writable=False)
    try:
        layout = seg.layout
        assert seg.u64[layout.lane_control(0) // 8 + LANE_HEAD // 8] == 5
        assert seg.u64[layout.lane_slot(0, 5) // 8] == 6  # the stamp: a complete but unpublished slot
    finally:
        seg.close()
    assert flusher.scan() == 5  # the stamped slot is not learned: it was never published
    children.kill(pid)
    assert Progress.read(path).results == "11111"
    client = engine.attach()  # the same lane continues at its head and overwrites slot 5
    for k in range(3):
        assert client.record(expected(2 * ID_BASE + k, H, {}))
    assert flusher.scan() == 3
    ids = check_learned_exactly(name, lr=SMALL["lr"], threshold=SMALL["flush_threshold"])
    assert ids == [ID_BASE + k for k in range(5)] + [2 * ID_BASE + k for k in range(3)]


# --------------------------------------------------------------------- the flusher


@pytest.mark.guarantee("committed-means-learned-once")
def test_flusher_killed_at_random_moments_loses_and_repeats_nothing(procs, children, name, tmp_path):
    """Three producers record 2500 trajectories each (waiting for room, so nothing drops) while
    the flusher is SIGKILLed 8 times — in start-up, in adoption, mid-scan, mid-flush, mid-publish —
    and restarted; every trajectory is learned exactly once and the weights are exact."""
    rng = np.random.default_rng(777)
    count = 2500
    flusher = procs.flusher(name, *flusher_options(lanes=4, lane_slots=64, capacity=10_000))
    pids = [children.add(fork_producer(name, p, str(tmp_path / f"p{p}"), limit=count, timeout=60)) for p in (1, 2, 3)]
    done = 0
    for kill in range(8):
        target = min(done + int(rng.integers(50, 600)), 3 * count)
        wait_for(lambda t=target: read_stats(name)["trajectories_processed"] >= t, what="learning progress")
        flusher.send_signal(signal.SIGKILL)
        flusher.wait()
        assert read_stats(name)["flusher"]["alive"] is False  # the kernel dropped its lock at once
        done = read_stats(name)["trajectories_processed"]
        if kill % 3 == 2:
            # The injected fault: a flusher killed somewhere in start-up, adoption or its first scans.
            starting = procs.start("-m", "sona_shm", "flusher", "--name", name, "--quiet")
            time.sleep(rng.uniform(0.1, 0.6))
            starting.send_signal(signal.SIGKILL)
            starting.wait()
        flusher = procs.flusher(name)  # adopts whatever it finds, no options
    for pid in pids:
        assert children.wait(pid) == 0
    ids = check_learned_exactly(name)
    assert sorted(ids) == sorted(p * ID_BASE + k for p in (1, 2, 3) for k in range(count))
    stats = read_stats(name)
    assert stats["lane_dropped"] == 0 and stats["trajectories_processed"] == 3 * count
    assert stop_process(flusher) == 0
    assert "ERROR" not in flusher.stderr.read()


@pytest.mark.guarantee("committed-means-learned-once")
def test_flusher_killed_mid_publish_is_repaired_by_the_next_one(procs, name):
    """The test hook SONA_SHM_TEST_PAUSE=publish stops the flusher after it wrote the inactive
    ledger copy and before the commit store; it is SIGKILLed there."""
    Flusher(name, config=EngineConfig(**{**SMALL, "hidden_dim": H, "lanes": 2, "lane_slots": 64, "capacity": 1000})).close()
    with attach(name) as client:
        for k in range(50):
            assert client.record(expected(ID_BASE + k, H, {}))
        paused = procs.start("-m", "sona_shm", "flusher", "--name", name, "--quiet", extra_env={"SONA_SHM_TEST_PAUSE": "publish"})
        _, status = os.waitpid(paused.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        seg = Segment.open(name, writable=False)
        ledger = Ledger(seg)
        try:
            commit = ledger.commit
            copies = ledger.copies.copy()
        finally:
            ledger.close()
            seg.close()
        current, written = copies[commit & 1], copies[(commit + 1) & 1]
        assert current["trajectories_processed"] == 0 and current["lane_tail"][client.lane] == 0
        assert written["trajectories_processed"] == 50 and written["lane_tail"][client.lane] == 50  # mid-publish
        paused.send_signal(signal.SIGKILL)
        paused.wait()
        assert read_stats(name)["trajectories_processed"] == 0
        procs.flusher(name)
        for k in range(50, 75):
            assert client.record(expected(ID_BASE + k, H, {}))
        client.sync(timeout=30)
    assert check_learned_exactly(name) == [ID_BASE + k for k in range(75)]


def test_idle_flusher_killed_leaves_producers_ringing_harmlessly(procs, name):
    flusher = procs.flusher(name, *flusher_options(lanes=2, lane_slots=64, capacity=1000))
    seg = Segment.open(name, writable=False)
    try:
        wait_for(lambda: seg.u64[(FLUSHER_LINE + FL_IDLE) // 8] == 1, what="the flusher to sleep")
        flusher.send_signal(signal.SIGKILL)
        flusher.wait()
        assert seg.u64[(FLUSHER_LINE + FL_IDLE) // 8] == 1  # it died asleep: every record now rings
    finally:
        seg.close()
    with attach(name) as client:
        for k in range(40):
            assert client.record(expected(ID_BASE + k, H, {}))  # returns at once, no flusher needed
        procs.flusher(name)
        client.sync(timeout=30)
    assert len(check_learned_exactly(name)) == 40


# --------------------------------------------------------------------- dead holders, waits, pid reuse


@pytest.mark.guarantee("nothing-waits-forever")
def test_no_lock_outlives_its_holder(procs, children, name, tmp_path):
    """Flusher, lane and drain locks held by SIGKILLed processes are free at once: nobody waits."""
    flusher = procs.flusher(name, *flusher_options(lanes=1, lane_slots=8, capacity=100))
    pid = children.add(fork_producer(name, 1, str(tmp_path / "p1"), pause="claim"))
    children.wait_stopped(pid)
    drain = _fork_lock_holder(name, LOCK_DRAIN)
    children.add(drain)
    children.wait_stopped(drain)
    seg = Segment.open(name, writable=True)
    try:
        assert seg.held_locks([LOCK_FLUSHER, LOCK_DRAIN, LOCK_LANE_BASE]) == [True, True, True]
        assert not seg.try_lock(LOCK_DRAIN)  # refused without waiting
        flusher.send_signal(signal.SIGKILL)
        flusher.wait()
        children.kill(pid)
        children.kill(drain)
        assert seg.held_locks([LOCK_FLUSHER, LOCK_DRAIN, LOCK_LANE_BASE]) == [False, False, False]
        assert seg.try_lock(LOCK_DRAIN)
        seg.unlock(LOCK_DRAIN)
    finally:
        seg.close()
    second = Flusher(name, config_overrides={})  # no wait, no timeout: the dead one's lock is gone
    try:
        client = attach(name)
        try:
            assert client.lane == 0 and client.record(expected(ID_BASE, H, {})) and second.scan() == 1
        finally:
            client.close()
    finally:
        second.close()


def _fork_lock_holder(name: str, byte: int) -> int:
    def hold() -> None:
        seg = Segment.open(name, writable=True)
        if seg.try_lock(byte):
            os.kill(os.getpid(), signal.SIGSTOP)

    return fork_child(hold, deadline=120)


@pytest.mark.guarantee("nothing-waits-forever")
def test_every_wait_is_bounded_without_a_flusher(engine, name):
    """With no flusher at all, each call that waits returns or raises within its timeout."""
    engine(lanes=1, lane_slots=2).close()
    client = engine.attach()
    assert client.record(expected(ID_BASE, H, {})) and client.record(expected(ID_BASE + 1, H, {}))
    assert client.record(expected(ID_BASE + 2, H, {}), timeout=0.05) is False  # lane full: waited, then dropped
    assert client.stats()["lane_dropped"] == 1
    for call in (lambda: client.sync(timeout=0.05), lambda: client.flush(timeout=0.05)):
        with pytest.raises(TimeoutError, match="no flusher is running"):
            call()
    with pytest.raises(FileNotFoundError):
        attach(name + "-missing", timeout=0.05)
    for bad in (float("nan"), float("inf"), -1, "1"):
        with pytest.raises(ValueError, match="timeout: expected a finite number of seconds"):
            client.record(expected(ID_BASE + 3, H, {}), timeout=bad)
        with pytest.raises(ValueError, match="timeout: expected a finite number of seconds"):
            client.sync(timeout=bad)
    assert client.stats()["lane_dropped"] == 1


@pytest.mark.guarantee("nothing-waits-forever")
def test_a_recycled_pid_never_keeps_a_lane(engine, children, name):
    """Liveness is the kernel's lock table: a lane whose recorded owner is a live process that
    holds no lock (what a recycled pid looks like) is free and reported dead."""
    engine(lanes=1)
    pid = children.add(fork_child(lambda: os.kill(os.getpid(), signal.SIGSTOP), deadline=120))  # alive, not the lane's owner
    children.wait_stopped(pid)
    ticks = start_ticks(pid)
    assert process_alive(pid, ticks) and not process_alive(pid, ticks + 1)  # pid + start time identify it
    seg = Segment.open(name, writable=True)
    try:
        ctl = seg.layout.lane_control(0) // 8
        seg.u64[ctl + LANE_OWNER_PID // 8] = pid
        seg.u64[ctl + LANE_OWNER_START // 8] = ticks
        seg.u64[ctl + LANE_CLAIMS // 8] = 1
        lane = read_stats(name)["lanes"][0]
        assert lane["pid"] == pid and lane["alive"] is False
        client = engine.attach()
        assert client.lane == 0 and seg.u64[ctl + LANE_OWNER_PID // 8] == os.getpid()
        assert seg.u64[ctl + LANE_OWNER_START // 8] == start_ticks(os.getpid())
        assert read_stats(name)["lanes"][0]["alive"] is True
    finally:
        seg.close()
