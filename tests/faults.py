"""Helpers of the fault-injection tests: forked producers that report progress, and learned-set readers.

A producer here is a ``fork()`` of the test process (like a gunicorn worker of its
arbiter) that attaches, writes ``LANE\\n`` to its progress file, then records trajectory
``k`` of its list and appends one byte per *returned* ``record()`` (``1``: committed,
``0``: dropped), and a final ``\\n`` when it finished cleanly. Appends are single
``write()`` calls, so the file survives SIGKILL with exactly what the producer saw
returned. Trajectory ``k`` of producer ``p`` carries the id ``p * ID_BASE + k``, so
the learned set can be read back from the buffer and checked against the expectation.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from sona_shm import Trajectory
from sona_shm.engine.client import attach
from sona_shm.shm import lane as lane_module
from sona_shm.shm.layout import LOCK_LANE_BASE
from sona_shm.shm.segment import Segment

from children import fork_child
from support import make_trajectories

ID_BASE = 1 << 24
#: Distinct trajectories per producer; trajectory ``k`` is ``base[k % CYCLE]`` with its own id.
CYCLE = 97


def trajectories_of(producer: int, hidden_dim: int) -> list[Trajectory]:
    return make_trajectories(1000 + producer, CYCLE, hidden_dim)


def expected(tid: int, hidden_dim: int, cache: dict[int, list[Trajectory]]) -> Trajectory:
    """The trajectory a producer recorded under id ``tid``."""
    producer, k = divmod(tid, ID_BASE)
    if producer not in cache:
        cache[producer] = trajectories_of(producer, hidden_dim)
    base = cache[producer][k % CYCLE]
    return Trajectory(base.query, base.steps, base.quality, id=tid)


def fork_producer(
    name: str,
    producer: int,
    progress: str,
    *,
    limit: int = 10**9,
    timeout: float = 0.0,
    stop_file: str | None = None,
    pause: str | None = None,
    pause_at: int = 0,
    pace: float = 0.0,
) -> int:
    """Fork a producer process; return its pid. ``pause``: ``"claim"`` stops it (SIGSTOP)
    right after it took a lane lock, ``"head"`` just before the head store that would
    publish trajectory ``pause_at`` — for the test to SIGKILL it exactly there. ``pace``:
    seconds to rest between records (a witness that should not hog a core)."""
    return fork_child(_produce, name, producer, progress, limit, timeout, stop_file, pause, pause_at, pace)


def _produce(name, producer, progress, limit, timeout, stop_file, pause, pause_at, pace) -> None:
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    if pause == "claim":
        original = Segment.try_lock

        def try_lock(self, byte):
            taken = original(self, byte)
            if taken and byte >= LOCK_LANE_BASE:
                os.kill(os.getpid(), signal.SIGSTOP)  # holding the lane lock, owner fields not yet written
            return taken

        Segment.try_lock = try_lock
    if pause == "head":
        # Stop between the slot's stamp and the head store. The C writer makes those two
        # stores in one call, so this producer uses the reference (Python) writer, whose
        # stores go through the word view patched here; both publish in the same order.
        lane_module._speedups = None
    client = attach(name)
    os.write(fd, b"%d\n" % client.lane)
    if pause == "head":
        views = client._writer.views
        views.u64 = _PauseBeforeStore(views.u64, views.head_word, pause_at + 1)
    base = trajectories_of(producer, client.hidden_dim)
    first = producer * ID_BASE
    for k in range(limit):
        if stop_file and k % 64 == 0 and os.path.exists(stop_file):
            break
        t = base[k % CYCLE]
        ok = client.record(Trajectory(t.query, t.steps, t.quality, id=first + k), timeout=timeout)
        os.write(fd, b"1" if ok else b"0")
        if pace:
            time.sleep(pace)
    client.sync(timeout=60)
    os.write(fd, b"\n")
    client.close()


class _PauseBeforeStore:
    """The client's word view, stopping the process before it stores ``value`` at ``index``."""

    def __init__(self, words, index: int, value: int) -> None:
        self.words, self.index, self.value = words, index, value

    def __getitem__(self, i):
        return self.words[i]

    def __setitem__(self, i, v):
        if i == self.index and v == self.value:
            os.kill(os.getpid(), signal.SIGSTOP)
        self.words[i] = v


@dataclass
class Progress:
    lane: int | None  # None: killed before attach() returned
    results: str  # one "1"/"0" per returned record()
    finished: bool

    @classmethod
    def read(cls, path: str) -> Progress:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        if b"\n" not in data:
            return cls(None, "", False)
        lane, rest = data.split(b"\n", 1)
        finished = rest.endswith(b"\n")
        return cls(int(lane), rest.rstrip(b"\n").decode(), finished)

    @property
    def committed(self) -> set[int]:
        return {k for k, r in enumerate(self.results) if r == "1"}

    @property
    def dropped(self) -> set[int]:
        return {k for k, r in enumerate(self.results) if r == "0"}


def learned(name: str) -> list[tuple[int, np.void]]:
    """``(trajectory id, buffer slot)`` of every learned trajectory, in learning order.

    Needs a buffer large enough never to drop (``buffer_dropped == 0``) nor wrap.
    """
    seg = Segment.open(name, writable=False)
    try:
        layout = seg.layout
        from sona_shm.shm.ledger import Ledger

        ledger = Ledger(seg)
        head, dropped = ledger.read("buffer_head", "buffer_dropped")
        ledger.close()
        assert dropped == 0 and head <= layout.capacity, "the test's buffer must hold every learned trajectory"
        slots = np.ndarray((head,), dtype=layout.slot_dtype, buffer=seg.numpy_buffer(), offset=layout.buffer_offset).copy()
    finally:
        seg.close()
    assert slots["seq"].tolist() == list(range(1, head + 1))
    return [(int(s["traj_id"]), s) for s in slots]


def check_slot(slot: np.void, traj: Trajectory, where: str) -> None:
    """The learned slot holds exactly ``traj`` (no half-written or foreign bytes)."""
    n = len(traj.steps)
    assert int(slot["n_steps"]) == n, where
    assert np.array_equal(slot["query"], traj.query), where
    assert np.float32(slot["quality"]) == np.float32(traj.quality), where
    for i, step in enumerate(traj.steps):
        act = np.asarray(step.activations, np.float32)
        assert np.float32(slot["meta"]["reward"][i]) == np.float32(step.reward), where
        assert int(slot["meta"]["act_len"][i]) == act.shape[0], where
        assert np.array_equal(slot["steps"]["act"][i][: act.shape[0]], act), where
