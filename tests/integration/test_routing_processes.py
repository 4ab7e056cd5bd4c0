"""The routing rule with real processes: a CLI flusher, forked producers routing and giving feedback with the
probability of the route served, SIGKILLed flushers, routes added, renamed and retired under load.

Accounting is exact: every feedback a producer's ``feedback()`` returned True for is
learned once (read back from the buffer by id, with its probability), and the engine's learned
route table — published and working copy, centre and counters — equals an in-process
:class:`InstantLoop` replaying the learned feedback in learning order.
"""

from __future__ import annotations

import os
import random
import re
import signal

import numpy as np
import pytest

from sona_shm import InstantLoop
from sona_shm.config import DEFAULT_LR
from sona_shm.engine.client import attach
from sona_shm.engine.consumer import open_consumer
from sona_shm.errors import SegmentNotFoundError
from sona_shm.learn.routes import feedback_trajectory
from sona_shm.shm.ledger import Ledger, read_route_table
from sona_shm.shm.segment import Segment
from sona_shm.stats import read_stats
from sona_shm.supervise import stop_process

from children import fork_child
from support import wait_for

H, K = 32, 4
ID_BASE = 1 << 24
EXTRA = 5  #: feedbacks the test itself records while the flusher is down
NAMES = ["code", "math", "chat", "search"]


class Task:
    """Queries in clusters; two clusters are best served by another route than the nearest."""

    def __init__(self, seed: int = 21) -> None:
        rng = np.random.default_rng(seed)
        routes = rng.standard_normal((K, H))
        self.routes = (routes / np.linalg.norm(routes, axis=1, keepdims=True)).astype(np.float32)
        centres = 0.6 * self.routes[rng.integers(0, K, 6)] + 0.8 * rng.standard_normal((6, H)) / np.sqrt(H)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.best = np.argmax(self.centres @ self.routes.T, axis=1)
        self.best[:2] = (self.best[:2] + 1) % K

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        j = rng.integers(0, len(self.centres), n)
        x = self.centres[j] + 0.3 * rng.standard_normal((n, H)) / np.sqrt(H)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), self.best[j]


def write_routes(task: Task, path) -> str:
    np.savez(path, vectors=task.routes, names=np.array(NAMES))
    return str(path)


def flusher_options(routes: str, threshold: int = 50) -> list[str]:
    # no --hidden-dim: the routes file says how wide the embeddings are; a buffer (a routing engine has none by
    # default), since the tests read every learned feedback back from it
    return ["--rule", "routing", "--routes", routes, "--flush-threshold", str(threshold), "--lanes", "4", "--capacity", "10000"]


def produce(name: str, task: Task, producer: int, count: int, progress: str, explore) -> None:
    """On-policy feedback: route with the current route table, serve, report whether it was right and with
    which probability the route served was chosen."""
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    rng = np.random.default_rng(producer)
    draws = random.Random(producer)
    client = attach(name, timeout=30)
    x, y = task.sample(rng, count)
    for k in range(count):
        choice = client.route(x[k], explore=explore, rng=draws)
        if k % 4 == 3:  # now and then the right answer is known: full information
            feedback = dict(route=choice.index, reward=None, best=int(y[k]))
        else:
            feedback = dict(route=choice.index, reward=float(choice.index == y[k]), best=None)
        traj = feedback_trajectory(client.routes, x[k], unit_reward=True, probability=choice.probability, **feedback)
        traj.id = producer * ID_BASE + k
        os.write(fd, b"1" if client.record(traj, timeout=60) else b"0")
    client.sync(timeout=60)
    os.write(fd, b"\n")
    client.close()


def wait_stopped(pid: int, timeout: float = 60.0) -> None:
    """Wait until child ``pid`` stopped itself (SIGSTOP); fail if it exits or ``timeout`` passes."""

    def stopped() -> bool:
        got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if got and not os.WIFSTOPPED(status):
            raise AssertionError(f"process {pid} exited ({os.waitstatus_to_exitcode(status)}) instead of stopping")
        return bool(got)

    wait_for(stopped, timeout, what=f"process {pid} to stop")


def committed(progress: str) -> int:
    with open(progress, "rb") as f:
        return f.read().rstrip(b"\n").count(b"1")


def learned_in_order(name: str):
    """Every learned trajectory, in learning order (the buffer never drops or wraps in these tests)."""
    assert read_stats(name)["buffer"]["dropped"] == 0
    with open_consumer(name) as consumer:
        return consumer.drain()


#: What a replay must reproduce: the published route table, the open window's working copy and centre, the adapter.
REPLAYED = ("route_vectors", "route_bias", "work_vectors", "work_bias", "route_centre", "up", "down")


def replay(name: str, trajectories, threshold: int) -> None:
    """The engine's learned state equals an InstantLoop fed the learned trajectories in order (the same C learner)."""
    seg = Segment.open(name, writable=False)
    ledger = Ledger(seg)
    try:
        state = dict(zip(REPLAYED + ("pending", "routes_used"), ledger.read(*REPLAYED, "pending", "routes_used")))
        table = read_route_table(seg)
    finally:
        ledger.close()
        seg.close()
    k = state["routes_used"]
    loop = InstantLoop(H, 2, DEFAULT_LR["routing"], threshold, capacity=0, rule="routing", routes=table.vectors[:K], route_names=NAMES)
    for t in trajectories:
        loop.on_trajectory(t)
    assert loop.pending == state["pending"] and loop.metrics.flushes_performed > 0
    for field in REPLAYED:
        ours = getattr(loop._learner, field)
        theirs = state[field][:k] if field in ("route_vectors", "route_bias", "work_vectors", "work_bias") else state[field]
        np.testing.assert_allclose(theirs, ours[: len(theirs)], atol=1e-5, err_msg=field)


def test_on_policy_bandit_feedback_from_two_processes_learns_to_route(procs, children, name, tmp_path):
    task = Task()
    flusher = procs.flusher(name, *flusher_options(write_routes(task, tmp_path / "routes.npz")), "--capacity", "20000")
    rng = np.random.default_rng(99)
    x_test, y_test = task.sample(rng, 1000)
    with attach(name) as client:
        before = float((client.route(x_test).index == y_test).mean())
    count = 2500
    explore = {1: 0.1, 2: "squarecb"}  # epsilon-greedy and SquareCB, each with the probability of the route served
    pids = [children.add(fork_child(produce, name, task, p, count, str(tmp_path / f"p{p}"), explore[p])) for p in (1, 2)]
    for pid in pids:
        assert children.wait(pid) == 0
    stats = read_stats(name)
    total = committed(str(tmp_path / "p1")) + committed(str(tmp_path / "p2"))
    assert total == 2 * count and stats["lane_dropped"] == 0  # producers waited for room
    assert stats["trajectories_processed"] == stats["signals_accumulated"] == stats["recorded"] == total
    assert sum(r["chosen"] for r in stats["routes"]) == total and sum(r["best"] for r in stats["routes"]) == 2 * (count // 4)
    trajectories = learned_in_order(name)
    ids = [t.id for t in trajectories]
    assert len(ids) == len(set(ids)) == total
    assert sorted(ids) == sorted(p * ID_BASE + k for p in (1, 2) for k in range(count))
    probabilities = np.array([t.probability for t in trajectories])
    assert ((probabilities > 0) & (probabilities <= 1)).all() and (probabilities < 1).any()  # every one recorded, some explored
    replay(name, trajectories, threshold=50)
    with attach(name) as client:
        after = float((client.route(x_test).index == y_test).mean())
    assert after >= 0.9 > before, (before, after)
    assert stop_process(flusher) == 0


@pytest.mark.guarantee("committed-means-learned-once")
def test_flusher_killed_under_the_routing_rule_loses_and_repeats_nothing(procs, children, name, tmp_path):
    """Two producers give 2000 feedbacks each while the flusher is SIGKILLed 6 times, once
    mid-publish; each feedback is learned exactly once and U and D equal a replay."""
    task = Task(22)
    routes = write_routes(task, tmp_path / "routes.npz")
    flusher = procs.flusher(name, *flusher_options(routes, threshold=30), "--capacity", "20000", "--lane-slots", "64")
    count = 2000
    pids = [children.add(fork_child(produce, name, task, p, count, str(tmp_path / f"p{p}"), 0.2)) for p in (1, 2)]
    rng = np.random.default_rng(5)
    done = 0
    for kill in range(6):
        target = min(done + int(rng.integers(100, 500)), 2 * count - 50)
        wait_for(lambda t=target: read_stats(name)["trajectories_processed"] >= t, what="learning progress")
        if kill == 3:
            flusher.send_signal(signal.SIGKILL)
            flusher.wait()
            with attach(name) as client:  # something to learn, whether or not the producers are done
                x, y = task.sample(rng, EXTRA)
                for k in range(EXTRA):
                    traj = feedback_trajectory(client.routes, x[k], route=int(y[k]), reward=1.0, best=None, unit_reward=True)
                    traj.id = 3 * ID_BASE + k
                    assert client.record(traj, timeout=30)
            paused = procs.start("-m", "sona_shm", "flusher", "--name", name, "--quiet", extra_env={"SONA_SHM_TEST_PAUSE": "publish"})
            wait_stopped(paused.pid)  # between writing a ledger copy and committing it
            flusher = paused
        flusher.send_signal(signal.SIGKILL)
        flusher.wait()
        done = read_stats(name)["trajectories_processed"]
        flusher = procs.flusher(name)  # adopts the segment: no options
    for pid in pids:
        assert children.wait(pid) == 0
    total = committed(str(tmp_path / "p1")) + committed(str(tmp_path / "p2"))
    trajectories = learned_in_order(name)
    ids = [t.id for t in trajectories]
    assert total == 2 * count and len(ids) == len(set(ids)) == total + EXTRA
    replay(name, trajectories, threshold=30)
    assert stop_process(flusher) == 0


def test_routes_added_renamed_and_retired_under_load(procs, children, name, tmp_path):
    """Two producers route (SquareCB) and give feedback while a route is added, another renamed and a third
    retired: every feedback is learned once, the retired route is never chosen again, and the learned state
    equals a replay that makes the same changes after the same trajectories (the flusher logs where)."""
    task = Task(23)
    routes = write_routes(task, tmp_path / "routes.npz")
    log_path = tmp_path / "flusher.log"
    with open(log_path, "w") as log:
        flusher = procs.start(
            "-m", "sona_shm", "flusher", "--name", name, *flusher_options(routes, threshold=30),
            "--capacity", "20000", "--max-routes", "6", stderr=log,
        )  # fmt: skip
    wait_for(lambda: alive(name), what="flusher")
    count = 2000
    pids = [children.add(fork_child(produce, name, task, p, count, str(tmp_path / f"p{p}"), "squarecb")) for p in (1, 2)]
    extra = (task.centres[0] * 3).astype(np.float32)  # the direction of a cluster: the new route gets chosen
    with attach(name) as admin:
        for at, change in ((500, lambda: admin.add_route("extra", extra)), (1500, lambda: admin.rename_route("math", "maths")),
                           (2500, lambda: admin.retire_route("chat"))):  # fmt: skip
            wait_for(lambda at=at: read_stats(name)["trajectories_processed"] >= at, what=f"{at} trajectories learned")
            change()
        x, _ = task.sample(np.random.default_rng(7), 500)
        chosen = admin.route(x).index
        assert 2 not in set(chosen.tolist()) and 4 in set(chosen.tolist())
    for pid in pids:
        assert children.wait(pid) == 0
    total = committed(str(tmp_path / "p1")) + committed(str(tmp_path / "p2"))
    trajectories = learned_in_order(name)
    ids = [t.id for t in trajectories]
    assert total == 2 * count and len(ids) == len(set(ids)) == total
    stats = read_stats(name)
    by_name = {r["name"]: r for r in stats["routes"]}
    assert list(by_name) == ["code", "maths", "chat", "search", "extra"] and by_name["chat"]["retired"]
    for index, r in enumerate(stats["routes"]):  # counted per route exactly: what was learned with that index
        assert r["chosen"] == sum(t.route_index == index for t in trajectories)
    changes = [
        (int(m.group(3)), m.group(2), int(m.group(1)))
        for m in re.finditer(r"route (\d+) '[^']*': (\w+) \(request \d+\) after (\d+) trajectories", log_path.read_text())
    ]
    assert [(op, index) for _, op, index in changes] == [("added", 4), ("renamed", 1), ("retired", 2)]
    replay_with_changes(name, trajectories, changes, extra, threshold=30)
    assert stop_process(flusher) == 0


def alive(name: str) -> bool:
    try:
        return read_stats(name)["flusher"]["alive"]
    except SegmentNotFoundError:  # not there yet, or not finished yet
        return False


def replay_with_changes(name: str, trajectories, changes, extra: np.ndarray, threshold: int) -> None:
    loop = InstantLoop(
        H, 2, DEFAULT_LR["routing"], threshold, capacity=0, rule="routing", routes=Task(23).routes, route_names=NAMES, max_routes=6
    )
    pending = list(changes)
    for i, t in enumerate(trajectories):
        while pending and pending[0][0] == i:
            _, op, index = pending.pop(0)
            if op == "added":
                assert loop.add_route("extra", extra) == index
            elif op == "renamed":
                loop.rename_route(index, "maths")
            else:
                loop.retire_route(index)
        loop.on_trajectory(t)
    assert not pending
    seg = Segment.open(name, writable=False)
    ledger = Ledger(seg)
    try:
        state = dict(zip(REPLAYED, ledger.read(*REPLAYED)))
    finally:
        ledger.close()
        seg.close()
    for field in REPLAYED:
        ours = getattr(loop._learner, field)
        np.testing.assert_allclose(state[field][: len(ours)], ours, atol=1e-5, err_msg=field)
