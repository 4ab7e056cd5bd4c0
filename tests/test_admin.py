"""Pause, resume and rollback through the admin mailbox, in one process: what a paused engine does with what it takes
in, that a rollback replaces the learned state and keeps what was observed, that the state equals a replay, and that
bad requests are refused before anything changes."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from sona_shm import CheckpointError, InstantLoop, InvalidInputError
from sona_shm.engine import admin
from sona_shm.engine.consumer import open_consumer
from sona_shm.engine.provision import create
from sona_shm.learn.routes import RouteTable
from sona_shm.shm.admin import Mailbox
from sona_shm.shm.layout import PAUSED_BY_REQUEST
from sona_shm.shm.ledger import Ledger
from sona_shm.shm.segment import Segment
from sona_shm.store.checkpoint import Checkpoint, read_checkpoint, write_checkpoint

from conftest import SMALL

H, K = 16, 4
F32 = np.float32
NAMES = ["code", "math", "chat", "search"]
#: The learned state a replay must reproduce (and a rollback replaces).
LEARNED = ("route_vectors", "route_bias", "work_vectors", "work_bias", "route_centre", "up", "down")


def table(seed: int = 3) -> RouteTable:
    return RouteTable.build(np.random.default_rng(seed).standard_normal((K, H)), NAMES)


class Scanning:
    """The in-process flusher scanning in a thread while a test waits for its answer."""

    def __init__(self, flusher) -> None:
        self.flusher, self.stop = flusher, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.flusher.scan()
            self.stop.wait(0.001)

    def __enter__(self) -> Scanning:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def feed(client, rng, n: int, *, reward: float | None = None) -> None:
    """``n`` feedbacks: bandit with ``reward`` (or a random one), every third one full information."""
    for i in range(n):
        x = rng.standard_normal(H).astype(F32)
        if reward is None and i % 3 == 2:
            assert client.feedback(x, best=int(rng.integers(0, K)), route=int(rng.integers(0, K)))
        else:
            r = float(rng.integers(0, 2)) if reward is None else reward
            assert client.feedback(x, route=int(rng.integers(0, K)), reward=r, probability=0.25)


def state(client) -> dict[str, np.ndarray]:
    return dict(zip(LEARNED, client._ledger.read(*LEARNED)))


def replay(trajectories, used: int = K) -> InstantLoop:
    t = table()
    loop = InstantLoop(
        H, 2, SMALL["lr"], SMALL["flush_threshold"], capacity=0, rule="routing", routes=t.vectors, route_names=t.names, max_routes=6
    )
    for traj in trajectories:
        loop.on_trajectory(traj)
    return loop


def assert_replayed(client, loop: InstantLoop) -> None:
    ours = state(client)
    pending = client._ledger.read("pending")[0]
    assert pending == loop.pending
    for field in LEARNED:
        theirs = getattr(loop._learner, field)
        np.testing.assert_allclose(ours[field][: len(theirs)], theirs, atol=1e-5, err_msg=field)


def drained(name: str):
    with open_consumer(name) as consumer:
        return consumer.drain()


def routing_engine(engine, tmp_path, **options):
    return engine(
        routes=table(),
        rule="routing",
        max_routes=6,
        lane_slots=64,
        capacity=1000,
        options={"checkpoint": str(tmp_path / "ck.safetensors"), "checkpoint_keep": 4, **options},
    )


# ----------------------------------------------------------------- pause and resume


@pytest.mark.guarantee("pausing-learning-loses-nothing")
def test_a_paused_engine_serves_its_adapter_takes_everything_in_and_learns_none_of_it(engine, name, tmp_path):
    flusher = routing_engine(engine, tmp_path)
    client = engine.attach()
    rng = np.random.default_rng(0)
    feed(client, rng, 30)
    flusher.scan()
    before, generation = state(client), client._ledger.generation()[0]
    signals, pending = client._ledger.read("signals_accumulated", "pending")
    with Scanning(flusher):
        client.pause()
        feed(client, rng, 40)
        client.flush(timeout=10)  # answered, and publishes nothing: the open window stays open
        client.sync(timeout=10)
    stats = client.statistics()
    learning = stats.learning
    assert learning.paused and learning.paused_by == "request" and learning.pauses == 1 and learning.paused_skipped == 40
    assert stats.trajectories_processed == stats.recorded == 70 and stats.backlog == 0 and stats.lane_dropped == 0
    assert (stats.signals_accumulated, stats.pending_signals) == (signals, pending) and stats.weights_generation == generation
    for field, value in state(client).items():
        assert np.array_equal(value, before[field]), field  # not a bit learned
    assert sum(r.chosen for r in stats.routes) == 70  # every feedback is counted per route, paused or not
    with Scanning(flusher):
        client.resume()
        feed(client, rng, 20)
        client.sync(timeout=10)
    stats = client.statistics()
    assert not stats.learning.paused and stats.learning.paused_skipped == 40 and stats.trajectories_processed == 90
    assert stats.signals_accumulated == 50
    trajectories = drained(name)
    assert len(trajectories) == 90 and len({t.id for t in trajectories}) == 90  # all kept for consumers, in order
    assert_replayed(client, replay(trajectories[:30] + trajectories[70:]))  # learned: exactly the ones outside the pause


def test_a_pause_outlives_the_flusher_and_is_applied_offline_without_one(engine, name, tmp_path):
    flusher = routing_engine(engine, tmp_path)
    client = engine.attach()
    with Scanning(flusher):
        client.pause()
        client.pause()  # again: done, nothing changes
    assert client.statistics().learning.pauses == 1
    flusher.close()
    again = routing_engine(engine, tmp_path)  # adopts the segment
    assert again.paused == PAUSED_BY_REQUEST
    feed(client, np.random.default_rng(1), 5)
    again.scan()
    assert client.statistics().learning.paused_skipped == 5 and client.statistics().signals_accumulated == 0
    again.close()
    admin.resume(client._segment)  # no flusher runs: applied here, under the flusher lock
    assert not client.statistics().learning.paused
    last = routing_engine(engine, tmp_path)
    feed(client, np.random.default_rng(2), 5)
    last.scan()
    assert client.statistics().signals_accumulated == 5


def test_a_paused_engine_made_from_its_checkpoint_is_paused(engine, name, names, tmp_path):
    flusher = routing_engine(engine, tmp_path)
    client = engine.attach()
    with Scanning(flusher):
        client.pause()  # the flusher writes a checkpoint at once: the file says it is paused
    assert read_checkpoint(str(tmp_path / "ck.safetensors")).paused == PAUSED_BY_REQUEST
    (other,) = names(1)
    from sona_shm.engine.flusher import Flusher

    restored = Flusher(other, checkpoint=str(tmp_path / "ck.safetensors"))
    try:
        assert restored.created and restored.restored and restored.paused == PAUSED_BY_REQUEST
    finally:
        restored.close()


# ----------------------------------------------------------------- rollback


@pytest.mark.guarantee("a-rollback-loses-nothing-committed-and-learns-nothing-twice")
def test_a_rollback_replaces_what_was_learned_keeps_what_was_observed_and_goes_on_learning(engine, name, tmp_path):
    flusher = routing_engine(engine, tmp_path)
    client = engine.attach()
    rng = np.random.default_rng(4)
    feed(client, rng, 40)
    flusher.scan()
    assert flusher.write_checkpoint()
    good = read_checkpoint(str(tmp_path / "ck.safetensors"))
    feed(client, rng, 35)
    flusher.scan()
    generation = client._ledger.generation()[0]
    chosen = client._ledger.read("route_chosen")[0].copy()
    with Scanning(flusher):
        discarded = client.rollback(back=1)
    assert discarded == 35
    stats = client.statistics()
    assert stats.weights_generation == generation + 1 and stats.learning.rollbacks == 1 and stats.learning.rolled_back_signals == 35
    assert stats.learning.rollback_checkpoint_at == good.written_at
    for field, value in state(client).items():
        assert np.array_equal(value[: len(good.arrays[field])], good.arrays[field]), field
    assert (stats.signals_accumulated, stats.pending_signals, stats.updates_applied) == (
        40,
        good.counters["pending"],
        good.counters["updates_applied"],
    )
    # What was observed goes on counting: taken in, per route.
    assert stats.trajectories_processed == stats.recorded == 75 and np.array_equal(client._ledger.read("route_chosen")[0], chosen)
    feed(client, rng, 25)
    flusher.scan()
    trajectories = drained(name)
    assert len(trajectories) == 100
    assert_replayed(client, replay(trajectories[:40] + trajectories[75:]))  # the checkpoint's 40, then what came after
    assert client.statistics().signals_accumulated == 65 and client.statistics().trajectories_processed == 100


def test_a_rollback_committed_but_not_answered_is_answered_by_the_next_scan_without_being_applied_twice(engine, tmp_path):
    flusher = routing_engine(engine, tmp_path)
    client = engine.attach()
    feed(client, np.random.default_rng(5), 20)
    flusher.scan()
    flusher.write_checkpoint()
    feed(client, np.random.default_rng(6), 20)
    flusher.scan()
    path = str(tmp_path / "ck.safetensors")
    mailbox = Mailbox(client._segment)
    try:
        request = mailbox.post("rollback", path=os.path.abspath(path))
        admin.apply(mailbox.open_request(), flusher.learner, flusher._state[0], flusher.segment)
        flusher._commit()  # ... and the flusher dies before answering
        generation = client._ledger.generation()[0]
        flusher.scan()
        reply = mailbox.reply()
        assert mailbox.answered == request and reply.done
        assert client._ledger.generation()[0] == generation and client.statistics().learning.rollbacks == 1
    finally:
        mailbox.close()


def test_the_flusher_checks_the_file_again_and_refuses_one_that_changed(engine, tmp_path):
    flusher = routing_engine(engine, tmp_path)
    client = engine.attach()
    bad = tmp_path / "gone.safetensors"
    mailbox = Mailbox(client._segment)
    try:
        mailbox.post("rollback", path=str(bad))  # as if the file was removed after the requester checked it
        before = client._ledger.read(*LEARNED)
        flusher.scan()
        reply = mailbox.reply()
        assert not reply.done and f"{bad}: cannot read it" in reply.message
        assert all(np.array_equal(a, b) for a, b in zip(client._ledger.read(*LEARNED), before))
    finally:
        mailbox.close()


#: (what, the error, a fragment of its message): rollbacks that must be refused before anything changes.
BAD_ROLLBACKS = [
    ("missing", CheckpointError, "cannot read it"),
    ("other engine", CheckpointError, "written by another engine"),
    ("no engine id", CheckpointError, "carries no engine id"),
    ("other width", CheckpointError, "hidden_dim is 8, the engine's is 16"),
    ("back 9", InvalidInputError, "back: expected K in [1, 1]"),
    ("not a file", InvalidInputError, "to: expected the path of a checkpoint file"),
]


@pytest.mark.parametrize("what, error, fragment", BAD_ROLLBACKS)
def test_bad_rollbacks_are_refused_before_anything_changes(engine, name, names, tmp_path, what, error, fragment):
    flusher = routing_engine(engine, tmp_path)
    client = engine.attach()
    feed(client, np.random.default_rng(7), 20)
    flusher.scan()
    flusher.write_checkpoint()
    ours = read_checkpoint(str(tmp_path / "ck.safetensors"))
    (other,) = names(1)
    path: object = str(tmp_path / "file.safetensors")
    if what == "missing":
        path = str(tmp_path / "missing.safetensors")
    elif what == "other engine":
        create(other, config_overrides={**SMALL, "rule": "routing", "max_routes": 6, "lane_slots": 64, "capacity": 1000}, routes=table())
        from sona_shm.store.checkpoint import checkpoint_segment

        checkpoint_segment(other, str(path))
    elif what == "no engine id":
        write_checkpoint(str(path), Checkpoint(**{**ours.__dict__, "engine_id": 0}), 0o600)
    elif what == "other width":
        create(
            other,
            config_overrides={**SMALL, "hidden_dim": 8, "rule": "routing", "max_routes": 6},
            routes=RouteTable.build(np.eye(K, 8), NAMES),
        )
        from sona_shm.store.checkpoint import checkpoint_segment

        checkpoint_segment(other, str(path))
    elif what == "not a file":
        path = ""
    before = bytes(client._segment.buf)
    with pytest.raises(error) as info:
        if what == "back 9":
            client.rollback(back=9, timeout=1)
        else:
            client.rollback(path, timeout=1)
    assert fragment in str(info.value), str(info.value)
    assert bytes(client._segment.buf) == before  # nothing written, not even the mailbox
    assert flusher.scan() == 0


def test_a_host_of_a_fleet_refuses_pause_resume_and_rollback(name):
    create(name, config_overrides={**SMALL}, routes=None)
    segment = Segment.open(name, writable=True)
    ledger = Ledger(segment)
    try:
        record = ledger.snapshot()
        record[0]["fleet_epoch"] = 7  # bound to a fleet
        ledger.publish(record)
        for ask in (admin.pause, admin.resume, lambda s, **kw: admin.rollback(s, "/nonexistent", **kw)):
            with pytest.raises(InvalidInputError, match="is a host of a fleet, and every host must apply the same windows"):
                ask(segment, timeout=1)
        assert not ledger.read("paused")[0]
    finally:
        ledger.close()
        segment.close()


def test_an_engine_without_routes_can_be_paused_too(engine):
    flusher = engine()  # the reference rule, no route table: it has the mailbox all the same
    client = engine.attach()
    with Scanning(flusher):
        client.pause()
    from sona_shm import Step, Trajectory

    assert client.record(Trajectory(np.ones(SMALL["hidden_dim"]), [Step(np.ones(SMALL["hidden_dim"]), None, 1.0)], 1.0))
    flusher.scan()
    stats = client.statistics()
    assert stats.learning.paused_skipped == 1 and stats.signals_accumulated == 0 and stats.trajectories_processed == 1
