"""Safe online learning with real processes: a CLI flusher, forked producers routing on-policy and giving bandit
feedback with the probability of the route served, and an operator's commands.

- Pause under load: every committed feedback is taken in once; what came while paused is counted, kept and not
  learned; the learned state equals a replay of exactly the feedback outside the pause.
- Rollback while producers record: nothing committed is lost, nothing learned twice; the state equals the
  checkpoint's with exactly what was learned after the rollback on top.
- The broken judge: a router learns to route well, then every reward is inverted. With the guard, learning stops
  within the window and the rollback brings the held-out accuracy back to its level before the fault; without it, it
  collapses, and a pause and a rollback by hand bring it back. Counters add up in both.

Positions come from the flusher's log ("... after N trajectories"): the buffer keeps every trajectory taken in, in
the order taken in, so N is where the cut falls in what the consumer drains.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
from router_task import RouterTask

from sona_shm import InstantLoop
from sona_shm.config import DEFAULT_LR
from sona_shm.engine.client import attach
from sona_shm.engine.consumer import open_consumer
from sona_shm.errors import EXIT_CHECKPOINT, EXIT_USAGE, SegmentNotFoundError
from sona_shm.learn.routes import RouteTable, feedback_trajectory
from sona_shm.shm.ledger import Ledger
from sona_shm.shm.segment import Segment
from sona_shm.stats import read
from sona_shm.store.checkpoint import read_checkpoint
from sona_shm.store.history import checkpoint_history
from sona_shm.supervise import stop_process

from children import fork_child
from support import wait_for

H, K = 32, 4
THRESHOLD = 20
ID_BASE = 1 << 24
NAMES = ["code", "math", "chat", "search"]
LEARNED = ("route_vectors", "route_bias", "work_vectors", "work_bias", "route_centre", "up", "down")


def task() -> RouterTask:
    return RouterTask(5, h=H, routes=K, clusters=6, misrouted=2, noise=0.3)


def write_routes(path) -> str:
    RouteTable.build(task().routes, NAMES).save(str(path))
    return str(path)


def start_flusher(procs, name: str, tmp_path, *options: str):
    """``sona-shm flusher`` with its log in a file (the positions of pauses and rollbacks are read from it)."""
    log = open(tmp_path / "flusher.log", "a")
    proc = procs.start(
        "-m", "sona_shm", "flusher", "--name", name, "--rule", "routing", "--routes", write_routes(tmp_path / "routes.npz"),
        "--flush-threshold", str(THRESHOLD), "--lanes", "4", "--capacity", "40000",
        "--checkpoint", str(tmp_path / "router.safetensors"), *options, stderr=log,
    )  # fmt: skip
    log.close()

    def alive() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flusher exited {proc.returncode}: {(tmp_path / 'flusher.log').read_text()}")
        try:
            return read(name).flusher.alive
        except SegmentNotFoundError:
            return False

    wait_for(alive, what="the flusher")
    return proc


def produce(name: str, producer: int, phases: list[tuple[int, bool]], control: str, explore: float) -> None:
    """On-policy bandit feedback, phase by phase: ``(count, inverted)``; each phase starts when the file
    ``go<phase>`` appears in ``control``, and ends with ``done<phase>.<producer>`` once all of it was taken in.
    ``inverted``: the judge is broken, every reward is 1 - the right one."""
    world = task()
    rng = np.random.default_rng(producer)
    draws = random.Random(producer)
    client = attach(name, timeout=30)
    k = 0
    for phase, (count, inverted) in enumerate(phases):
        wait_for(lambda p=phase: os.path.exists(os.path.join(control, f"go{p}")), 300, what=f"go{phase}")
        x, y = world.sample(count, rng)
        for i in range(count):
            choice = client.route(x[i], explore=explore, rng=draws)
            reward = float((choice.index == y[i]) != inverted)
            traj = feedback_trajectory(
                client.routes, x[i], route=choice.index, reward=reward, best=None, unit_reward=True, probability=choice.probability
            )
            traj.id = producer * ID_BASE + k
            k += 1
            if not client.record(traj, timeout=60):
                raise SystemExit(f"producer {producer}: the lane stayed full for 60 s")
        client.sync(timeout=60)
        open(os.path.join(control, f"done{phase}.{producer}"), "w").close()
    client.close()


def go(control, phase: int) -> None:
    open(os.path.join(control, f"go{phase}"), "w").close()


def finished(control, phase: int, producers=(1,)) -> None:
    wait_for(lambda: all(os.path.exists(os.path.join(control, f"done{phase}.{p}")) for p in producers), 120, what=f"phase {phase}")


def accuracy(name: str, seed: int = 1234) -> float:
    x, y = task().sample(600, np.random.default_rng(seed))
    with attach(name) as client:
        return float((client.route(x).index == y).mean())


def learned_state(name: str) -> dict[str, np.ndarray]:
    segment = Segment.open(name, writable=False)
    ledger = Ledger(segment)
    try:
        return dict(zip(LEARNED + ("pending",), ledger.read(*LEARNED, "pending")))
    finally:
        ledger.close()
        segment.close()


def drained(name: str):
    assert read(name).buffer.dropped == 0
    with open_consumer(name) as consumer:
        return consumer.drain()


def new_loop() -> InstantLoop:
    return InstantLoop(H, 2, DEFAULT_LR["routing"], THRESHOLD, capacity=0, rule="routing", routes=task().routes, route_names=NAMES)


def loop_at(path: str) -> InstantLoop:
    """An InstantLoop whose learned state and window schedule are the checkpoint's."""
    checkpoint = read_checkpoint(path)
    loop = new_loop()
    learner = loop._learner
    for field, value in checkpoint.arrays.items():
        getattr(learner, field)[: len(value)] = value
    for counter in ("pending", "signals_accumulated", "updates_applied", "flushes_performed"):
        setattr(learner, counter, checkpoint.counters[counter])
    return loop


def assert_state(name: str, loop: InstantLoop) -> None:
    state = learned_state(name)
    assert state["pending"] == loop.pending
    for field in LEARNED:
        ours = getattr(loop._learner, field)
        np.testing.assert_allclose(state[field][: len(ours)], ours, atol=1e-5, err_msg=field)


def positions(tmp_path, pattern: str) -> list[int]:
    return [int(m) for m in re.findall(pattern, (tmp_path / "flusher.log").read_text())]


def cli(procs, *argv: str) -> str:
    proc = procs.start("-m", "sona_shm", *argv)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


@pytest.mark.guarantee("pausing-learning-loses-nothing")
def test_pause_and_resume_under_load_lose_nothing_and_learn_exactly_what_came_outside_the_pause(procs, children, name, tmp_path):
    flusher = start_flusher(procs, name, tmp_path)
    control = str(tmp_path)
    both = (1, 2)
    pids = [children.add(fork_child(produce, name, p, [(1500, False), (1000, False), (500, False)], control, 0.2)) for p in both]
    go(control, 0)
    wait_for(lambda: read(name).trajectories_processed >= 500, 60, what="learning")
    cli(procs, "pause", "--name", name)  # while both producers record (where it fell is in the log)
    go(control, 1)  # all of phase 1 is committed while paused
    finished(control, 1, both)
    go(control, 2)
    cli(procs, "resume", "--name", name)  # while both record again
    finished(control, 2, both)
    for pid in pids:
        assert children.wait(pid) == 0
    stats = read(name)
    (pause,) = positions(tmp_path, r"learning paused \(request \d+\) after (\d+) trajectories")
    (resume,) = positions(tmp_path, r"learning resumed \(request \d+\) after (\d+) trajectories")
    assert 500 <= pause <= 3000 <= 5000 <= resume <= 6000
    assert stats.recorded == stats.trajectories_processed == 6000 and stats.backlog == 0 and stats.lane_dropped == 0
    assert stats.learning.paused_skipped == resume - pause and stats.signals_accumulated == 6000 - (resume - pause)
    assert not stats.learning.paused
    trajectories = drained(name)
    ids = [t.id for t in trajectories]
    expected = [p * ID_BASE + k for p in both for k in range(3000)]
    assert len(ids) == len(set(ids)) == 6000 and sorted(ids) == expected  # every committed feedback taken in, once
    loop = new_loop()
    for t in trajectories[:pause] + trajectories[resume:]:
        loop.on_trajectory(t)
    assert_state(name, loop)  # learned exactly what came outside the pause
    assert stop_process(flusher) == 0


@pytest.mark.guarantee("a-rollback-loses-nothing-committed-and-learns-nothing-twice")
def test_rollbacks_while_producers_record_lose_nothing_and_learn_nothing_twice(procs, children, name, tmp_path):
    flusher = start_flusher(procs, name, tmp_path, "--checkpoint-keep", "50", "--checkpoint-interval", "0.2")
    control = str(tmp_path)
    both = (1, 2)
    pids = [children.add(fork_child(produce, name, p, [(1500, False), (1500, False), (1000, False)], control, 0.2)) for p in both]
    go(control, 0)
    finished(control, 0, both)
    good_checkpoint(name, 3000, note="")  # the newest kept holds all of phase 0
    kept = len(checkpoint_history(name))
    go(control, 1)
    out = cli(procs, "rollback", "--name", name, "--back", str(kept))  # the oldest; through the running flusher, while both record
    assert "rolled back to" in out
    finished(control, 1, both)
    rows = checkpoint_history(name)
    target = rows[-1].entry.path  # the oldest kept: the state of early on
    go(control, 2)
    out = cli(procs, "rollback", "--name", name, "--to", target)
    assert f"rolled back to {target}" in out
    finished(control, 2, both)
    for pid in pids:
        assert children.wait(pid) == 0
    stats = read(name)
    cuts = positions(tmp_path, r"rolled back to checkpoint .* \(request \d+\) after (\d+) trajectories")
    assert len(cuts) == 2 and stats.learning.rollbacks == 2
    assert 3000 <= cuts[0] <= 6000 <= cuts[1] <= 8000
    assert stats.recorded == stats.trajectories_processed == 8000 and stats.backlog == 0 and stats.lane_dropped == 0
    trajectories = drained(name)
    ids = [t.id for t in trajectories]
    expected = [p * ID_BASE + k for p in both for k in range(4000)]
    assert len(ids) == len(set(ids)) == 8000 and sorted(ids) == expected  # nothing lost, nothing taken in twice
    loop = loop_at(target)  # the checkpoint's state, then exactly what was taken in after the last rollback
    for t in trajectories[cuts[-1] :]:
        loop.on_trajectory(t)
    assert_state(name, loop)
    assert stats.signals_accumulated == read_checkpoint(target).counters["signals_accumulated"] + 8000 - cuts[-1]
    assert stop_process(flusher) == 0


def good_checkpoint(name: str, learned: int, note: str = "good"):
    """The kept checkpoint holding exactly the first ``learned`` trajectories (with ``note``: marked so)."""

    def found():
        for row in checkpoint_history(name):
            if row.entry.trajectories_processed == learned and note in row.note:
                return row.entry
        return None

    return wait_for(found, 60, what=f"a checkpoint of the first {learned} trajectories")


@pytest.mark.guarantee("the-reward-guard-stops-a-broken-judge")
def test_the_broken_judge_the_guard_freezes_learning_within_its_window_and_rolls_back(procs, children, name, tmp_path):
    window = 200
    flusher = start_flusher(
        procs, name, tmp_path, "--checkpoint-keep", "4", "--checkpoint-interval", "0.2",
        "--guard-reward", "0.3", "--guard-window", str(window), "--guard-rollback",
    )  # fmt: skip
    control = str(tmp_path)
    before_learning = accuracy(name)
    pid = children.add(fork_child(produce, name, 1, [(3000, False), (1500, True), (600, False)], control, 0.1))
    go(control, 0)
    finished(control, 0)
    good = good_checkpoint(name, 3000)  # written after the last good feedback: the state the fault will meet
    before_fault = accuracy(name)
    state = learned_state(name)
    assert before_fault >= 0.9 > before_learning and good.moving_reward is not None and good.moving_reward > 0.8
    go(control, 1)  # the judge breaks: every reward inverted
    finished(control, 1)
    # Everything recorded is taken in (the producer's sync); the guard's rollback and its log line follow it.
    trip = r"reward guard: .* learning paused after (\d+) trajectories"
    wait_for(lambda: positions(tmp_path, trip) and read(name).learning.rollbacks, 60, what="the reward guard to trip and roll back")
    stats = read(name)
    learning = stats.learning
    (tripped,) = positions(tmp_path, trip)
    assert learning.paused and learning.paused_by == "guard" and learning.guard_trips == 1 and learning.rollbacks == 1
    bad_learned = tripped - 3000
    assert 0 < bad_learned <= window  # frozen within the window
    assert learning.rolled_back_signals == bad_learned and learning.rollback_checkpoint_at == good.written_at
    assert stats.recorded == stats.trajectories_processed == 4500 and stats.backlog == 0
    assert learning.paused_skipped == 4500 - tripped and stats.signals_accumulated == 3000
    after = learned_state(name)
    for field in LEARNED:
        assert np.array_equal(after[field], state[field]), field  # exactly the good checkpoint's state again
    assert accuracy(name) == before_fault
    # The judge is mended: the operator resumes, and learning goes on from there.
    cli(procs, "resume", "--name", name)
    go(control, 2)
    finished(control, 2)
    assert children.wait(pid) == 0
    stats = read(name)
    assert not stats.learning.paused and stats.signals_accumulated == 3600 and stats.trajectories_processed == stats.recorded == 5100
    assert accuracy(name) >= before_fault - 0.02
    assert stop_process(flusher) == 0


def test_the_broken_judge_without_the_guard_a_pause_and_a_rollback_by_hand_restore_the_router(procs, children, name, tmp_path):
    flusher = start_flusher(procs, name, tmp_path, "--checkpoint-keep", "100", "--checkpoint-interval", "0.2")
    control = str(tmp_path)
    pid = children.add(fork_child(produce, name, 1, [(3000, False), (3000, True), (2000, True)], control, 0.1))
    go(control, 0)
    finished(control, 0)
    good = good_checkpoint(name, 3000, note="")
    before_fault, state = accuracy(name), learned_state(name)
    go(control, 1)
    finished(control, 1)
    broken = accuracy(name)
    assert broken < before_fault - 0.3  # learned from the broken judge: the router is wrecked
    go(control, 2)  # the judge is still broken, and producers keep recording while the operator acts
    wait_for(lambda: read(name).trajectories_processed >= 6300, 60, what="more broken feedback")
    cli(procs, "pause", "--name", name)
    signals = read(name).signals_accumulated
    out = cli(procs, "rollback", "--name", name, "--to", good.path)
    assert "learning stays paused (request)" in out
    assert accuracy(name) == before_fault
    after = learned_state(name)
    for field in LEARNED:
        assert np.array_equal(after[field], state[field]), field
    finished(control, 2)
    assert children.wait(pid) == 0
    stats = read(name)
    learning = stats.learning
    (paused,) = positions(tmp_path, r"learning paused \(request \d+\) after (\d+) trajectories")
    assert stats.recorded == stats.trajectories_processed == 8000 and stats.backlog == 0
    assert learning.paused_skipped == 8000 - paused and learning.rolled_back_signals == signals - 3000 == paused - 3000
    assert stats.signals_accumulated == 3000 and learning.rollbacks == 1 and learning.guard_trips == 0
    assert accuracy(name) == before_fault  # still paused: the rest of the broken feedback was counted, not learned
    assert stop_process(flusher) == 0


def refused(procs, code: int, *argv: str) -> str:
    """Run ``sona-shm ARGV``; assert it exits ``code`` and return what it wrote to stderr."""
    proc = procs.start("-m", "sona_shm", *argv)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (proc.returncode, out, err)
    return err


def test_bad_rollbacks_and_guard_options_are_refused_with_the_reason_before_anything_changes(procs, children, names, tmp_path):
    ours, other, never = names(3)
    flusher = start_flusher(procs, ours, tmp_path, "--checkpoint-keep", "3", "--checkpoint-interval", "0.2")
    control = str(tmp_path)
    pid = children.add(fork_child(produce, ours, 1, [(1000, False)], control, 0.1))
    go(control, 0)
    finished(control, 0)
    assert children.wait(pid) == 0
    good_checkpoint(ours, 1000, note="")
    kept = [row.entry.path for row in checkpoint_history(ours)]
    cli(procs, "create", "--name", other, "--rule", "routing", "--routes", str(tmp_path / "routes.npz"))
    foreign = str(tmp_path / "other.safetensors")
    cli(procs, "checkpoint", "--name", other, "--out", foreign)
    state, stats = learned_state(ours), read(ours)

    err = refused(procs, EXIT_CHECKPOINT, "rollback", "--name", ours, "--to", foreign)
    assert f"to: expected a checkpoint file of engine {ours!r}, got checkpoint {foreign}: written by another engine" in err, err
    missing = str(tmp_path / "router.safetensors.20260101T000000.000000Z")
    err = refused(procs, EXIT_CHECKPOINT, "rollback", "--name", ours, "--to", missing)
    assert f"to: expected a checkpoint file of engine {ours!r}, got {missing}: cannot read it" in err, err
    err = refused(procs, EXIT_USAGE, "rollback", "--name", ours, "--back", "9")
    assert f"--back: expected K in [1, {len(kept)}]" in err and err.rstrip().endswith("got 9"), err
    for drop in ("0", "1.5", "-0.1", "nan"):
        err = refused(
            procs, EXIT_USAGE, "flusher", "--name", never, "--rule", "routing", "--routes", str(tmp_path / "routes.npz"),
            "--checkpoint", str(tmp_path / "never.safetensors"), "--checkpoint-keep", "2", "--guard-reward", drop,
        )  # fmt: skip
        assert "--guard-reward: expected DROP in (0, 1]" in err and f"got {float(drop)!r}" in err, err
        assert not os.path.exists(f"/dev/shm/sona_shm.{never}")

    after = learned_state(ours)
    for field in (*LEARNED, "pending"):
        assert np.array_equal(after[field], state[field]), field
    now = read(ours)
    assert now.learning == stats.learning and now.learning.rollbacks == 0 and not now.learning.paused
    assert now.trajectories_processed == stats.trajectories_processed == 1000
    assert [row.entry.path for row in checkpoint_history(ours)] == kept
    assert not any(p.name.startswith("never.") for p in tmp_path.iterdir())
    assert stop_process(flusher) == 0
