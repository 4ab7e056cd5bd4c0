"""The producer: what a web worker holds to record trajectories and apply the adapter.

``attach(name)`` maps the segment and claims a lane — a single-producer ring of slots
that only this process writes. ``record()`` validates the trajectory, writes it into the
next free slot and publishes it by storing the lane head; it never waits for another
process (a full ring drops the trajectory and counts it). ``forward()`` applies the
newest adapter the flusher published, re-reading the weights only when their
generation changed.

Threads of one process share the client (a lock serialises the few microseconds of a
record). After ``fork()`` the child drops the parent's lane and claims its own on first
use; see :func:`_after_fork_in_child`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from typing import Any, NamedTuple

import numpy as np

from .. import native
from ..checks import check_timeout
from ..errors import ClosedError, FlusherTimeoutError, InvalidInputError, LayoutMismatchError, NoFreeLaneError
from ..learn.learner import F32
from ..learn.routes import ACTIVE, MODES, Router, RouteTable, adapt, check_exploration, choose, feedback_trajectory
from ..shm.lane import FULL, NOT_HANDLED, PUBLISHED_RING, make_writer
from ..shm.layout import (
    FLUSHER_WORDS,
    LOCK_FLUSHER,
    LOCK_LANE_BASE,
)
from ..shm.ledger import Ledger, TornRead, read_route_table
from ..shm.segment import Segment, start_ticks, wait_until
from ..shm.slots import LaneViews, encode
from ..stats import EngineStats, collect
from ..store.history import resolve_back
from ..trajectory import RouteChoice, Trajectory, TrajectoryBatch, check_vectors
from . import admin
from . import routes as route_changes
from .consumer import DRAIN_TIMEOUT, Consumer, buffer_stats

log = logging.getLogger("sona_shm.client")
_clients: weakref.WeakSet[Client] = weakref.WeakSet()
_INF = math.inf
#: route()'s default ``explore``; recognised by identity, so the common call costs no check.
_NO_EXPLORATION = 0.0
#: Seconds close() waits for a record() in progress in another thread (a few µs in practice:
#: no call holds the lock while it waits).
CLOSE_WAIT = 10.0
#: record() asks whether the engine was destroyed once every this many records (and on
#: every slow path): one fstat, ~0.5 µs, so ~2 ns a record.
DESTROYED_CHECK_EVERY = 256
#: The note an exception that interrupted record() (or feedback()) carries when the trajectory was
#: committed before it: it will be learned, although the call did not return True.
COMMITTED_NOTE = "sona_shm: record() was interrupted after it committed the trajectory; it will be learned"

# The C fast path of a one-vector forward() (see lane.py for record()), or None.
_speedups = native.speedups


class _Weights(NamedTuple):
    generation: int
    down: np.ndarray  # float32[R, h], C-contiguous
    down_t: np.ndarray  # float32[h, R], down transposed for x @ down_t
    up_scaled: np.ndarray  # float32[R, h], up * scale, C-contiguous
    routes_version: int
    table: RouteTable | None  # names, vectors as given, retirements (for feedback)
    router: Router | None  # what route() reads: the adapter and the published learned route table


def attach(name: str, *, timeout: float = 0.0, hidden_dim: int | None = None, rank: int | None = None) -> Client:
    """Attach to engine ``name`` as a producer.

    ``timeout``: seconds to wait for the flusher to create the segment (0: don't wait).
    ``hidden_dim``/``rank``: if given, refuse a segment with other dimensions.
    Raises :class:`SegmentNotFoundError`, :class:`LayoutMismatchError`,
    :class:`NoFreeLaneError`.
    """
    return Client(name, timeout=timeout, hidden_dim=hidden_dim, rank=rank)


class Client:
    """A producer attached to one engine; see the module docstring."""

    def __init__(self, name: str, *, timeout: float = 0.0, hidden_dim: int | None = None, rank: int | None = None) -> None:
        self._segment: Segment | None = None
        self._lane = -1
        self._writer: Any = None
        self._lock = threading.Lock()
        self._countdown = DESTROYED_CHECK_EVERY
        self._segment = seg = Segment.open(name, writable=True, timeout=timeout)
        try:
            layout = seg.layout
            for arg, expected in (("hidden_dim", hidden_dim), ("rank", rank)):
                actual = getattr(layout, arg)
                if expected is not None and expected != actual:
                    raise LayoutMismatchError(f"{arg}: expected {expected}, segment {name!r} has {actual}")
            self.name = name
            self.layout = layout
            self.hidden_dim = layout.hidden_dim
            self._where = f" of segment {name!r}"
            self._ring_slots = layout.lane_slots
            self._ledger = Ledger(seg)
            self._u64 = seg.u64
            self.rule = layout.config.rule
            self._temperature = layout.config.temperature
            rows = np.zeros((layout.rank, layout.hidden_dim), F32)
            self._weights = _Weights(-1, rows, rows.T, rows, -1, None, None)  # generation -1: loaded on first use
            self._claim()
        except BaseException:
            self.close()
            raise
        _clients.add(self)

    # ----------------------------------------------------------------- lanes

    def _claim(self) -> None:
        """Take the lock of a free lane and become its producer-line writer."""
        seg, layout = self._open_segment(), self.layout
        seg.reopen_fd()
        pid = os.getpid()
        for k in range(layout.lanes):
            lane = (pid + k) % layout.lanes
            if seg.try_lock(LOCK_LANE_BASE + lane):
                break
        else:
            raise NoFreeLaneError(
                f"segment {self.name!r}: all {layout.lanes} lanes are held by live processes; recreate it with a larger --lanes"
            )
        # Read first: if it raises (TornRead), no writer is left behind with _lane = -1 (whose
        # tail refresh would read lane_tail[-1]), and the lane is given back.
        try:
            tail = self._ledger.lane_tail(lane)
        except BaseException:
            seg.unlock(LOCK_LANE_BASE + lane)
            raise
        words = layout.lane_words[lane]
        u64 = self._u64
        head = u64[words.head]
        if not tail <= head <= tail + layout.lane_slots:
            # Written outside sona_shm (a previous owner publishes at most lane_slots past the
            # committed tail): the flusher counts it as corrupt and learns nothing of the lane
            # until its head is sane again. We own the lane's producer line: restart at the tail.
            log.warning(
                "segment %r lane %d: head %d is outside [%d, %d]; restarting it at the tail",
                self.name,
                lane,
                head,
                tail,
                tail + layout.lane_slots,
            )
            u64[words.head] = tail  # publishes nothing: the flusher's tail is already there
        u64[words.owner_pid] = pid
        u64[words.owner_start_ticks] = start_ticks(pid)
        u64[words.claims] += 1
        self._words = words
        self._w_drops = words.drops
        self._w_next_id = words.next_id
        self._views = LaneViews(seg, lane, self._where)
        writer = make_writer(seg, self._views)
        writer.tail = tail  # committed tail <= head, read before the writer read the head
        self._writer = writer
        self._lane = lane

    def _ensure_lane(self) -> None:
        if self._lane < 0:
            if self._segment is None or self._segment.closed:
                raise self._closed()
            self._claim()

    @property
    def lane(self) -> int:
        """The lane this process writes (claimed on first use after a fork)."""
        with self._lock:
            self._ensure_lane()
            return self._lane

    def release_lane(self) -> None:
        """Give this process's lane back but stay attached; the next record claims one again.

        For a process that attached but will not record itself, such as a gunicorn
        master that imported the app (``preload_app``) before forking its workers.
        What the lane committed is still learned.
        """
        with self._lock:
            if self._lane >= 0 and self._segment is not None:
                self._lane = -1
                self._drop_writer()
                self._segment.forget_inherited_fd()  # our descriptor's close drops the lane lock

    def _forked(self) -> None:
        """In a fork child: forget the parent's lane and lock; claim anew on first use."""
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._drop_writer()
        if self._segment is not None and not self._segment.closed:
            self._segment.forget_inherited_fd()
        self._lane = -1

    def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # releases its hold on the lane memory
        views = self.__dict__.pop("_views", None)
        if views is not None:
            views.release()

    # ----------------------------------------------------------------- recording

    def next_id(self) -> int:
        """A trajectory id unique across every process of this engine for the life of its segment.

        Lane counters are not in checkpoints: a segment destroyed and restored starts over.
        """
        with self._lock:
            self._ensure_lane()
            return self._take_id()

    def _take_id(self) -> int:
        k = self._u64[self._w_next_id]
        self._u64[self._w_next_id] = k + 1
        return k * self.layout.lanes + self._lane

    def record(self, traj: Trajectory, *, timeout: float = 0.0) -> bool:
        """Commit one finished trajectory for learning; False if the lane is full.

        A full lane means the flusher is behind: the trajectory is not learned and is
        counted in this lane's ``drops``. With ``timeout > 0`` the call waits up to that
        long for room instead, without holding up other threads of this process. Bad
        input raises :class:`InvalidInputError` and changes nothing;
        :class:`EngineDestroyedError` says the engine was removed (and nothing was written).
        """
        if timeout and not (type(timeout) is float and 0.0 < timeout < _INF):  # NaN would make the wait endless
            check_timeout(timeout)
        writer = None
        head = 0
        try:  # around the lock too: an interruption may come in its release, after the publish
            with self._lock:
                writer = self._writer
                if writer is None:
                    self._ensure_lane()
                    writer = self._writer
                head = writer.head
                self._countdown -= 1
                if not self._countdown:
                    self._check_destroyed()
                status = writer.record(traj)  # the whole call, in C for the common form
                if status <= 0:
                    status = self._record_slow(writer, traj, status)
                if status == PUBLISHED_RING:
                    self._open_segment().ring()  # the flusher sleeps: wake it (rare under load)
                if status != FULL:
                    return True
                if timeout <= 0:
                    self._u64[self._w_drops] += 1
                    return False
                self._open_segment().ring()  # the flusher may be asleep on work it has not seen
        except BaseException as exc:  # an interruption (KeyboardInterrupt, a time limit) may come after the publish
            if writer is not None and writer.head != head:
                exc.add_note(COMMITTED_NOTE)
            raise
        return self._record_when_room(traj, timeout)

    def _record_slow(self, writer: Any, traj: Trajectory, status: int) -> int:
        """A full ring (``FULL``) or a trajectory the C writer hands back (``NOT_HANDLED``).

        Returns ``FULL`` (nothing written, no drop counted yet) or the publish status.
        """
        if status == FULL:
            self._check_destroyed()  # a lane that stays full may be one nobody learns any more
            self._check(traj)  # bad input is refused, not counted as a drop
            self._refresh_tail()
            if writer.head - writer.tail >= self._ring_slots:
                return FULL
            status = writer.record(traj)
            if status != NOT_HANDLED:
                return status
        # Converts, or raises naming the field. Not scrubbed up front: the Python path rewrites
        # every value the C writer copied, and encode scrubs if what it left is not finite
        # (zeroing the whole payload each time would touch every page of the slot).
        encode(self._views, writer.head, traj)
        return writer.publish()

    def _record_when_room(self, traj: Trajectory, timeout: float) -> bool:
        """Wait up to ``timeout`` for room in the lane, then record (True) or count a drop (False).

        The lock is held only to look and to write, never while sleeping: other threads
        keep recording (a call with timeout 0 never waits on this one) and close() is not
        held up; after a close() this raises :class:`ClosedError`.
        """
        deadline = time.monotonic() + timeout
        delay = 0.0001
        while True:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.005)
            writer = None
            head = 0
            try:
                with self._lock:
                    writer = self._writer
                    if writer is None:  # closed, or the lane was given back meanwhile
                        self._ensure_lane()
                        writer = self._writer
                    head = writer.head
                    status = writer.record(traj)
                    if status <= 0:
                        status = self._record_slow(writer, traj, status)
                    if status == PUBLISHED_RING:
                        self._open_segment().ring()
                    if status != FULL:
                        return True
                    if time.monotonic() >= deadline:
                        self._u64[self._w_drops] += 1
                        return False
            except BaseException as exc:
                if writer is not None and writer.head != head:
                    exc.add_note(COMMITTED_NOTE)
                raise

    def _check(self, traj: Trajectory) -> None:
        self._views.check(traj)

    def _check_destroyed(self) -> None:
        """Raise :class:`EngineDestroyedError` if the segment was removed; call holding the lock."""
        if self._open_segment().destroyed():
            self._countdown = 1  # every later record() looks again, and raises again
            raise self._open_segment().destroyed_error()
        self._countdown = DESTROYED_CHECK_EVERY

    def _refresh_tail(self) -> None:
        try:
            self._writer.tail = self._ledger.lane_tail(self._lane)
        except TornRead:
            pass  # keep the older, smaller tail: it only makes the ring look fuller

    # ----------------------------------------------------------------- forward

    def _current_weights(self) -> _Weights:
        """The newest published adapter: the cached copy, re-read (consistently) only when its generation changed."""
        if self._segment is None:
            raise self._closed()
        w = self._weights
        try:
            generation, _ = self._ledger.generation()
        except TornRead:  # the flusher outran us: keep the last good copy, as _load_weights does
            return w
        except AttributeError:
            if self._segment is None:  # close() in another thread took the ledger away meanwhile
                raise self._closed() from None
            raise
        return w if generation == w.generation else self._load_weights()

    def forward(self, x: Any) -> np.ndarray:
        """``x + delta`` with the newest published adapter; ``x`` is ``[h]`` or ``[n, h]``.

        Lock-free: the weights are re-read (consistently) only when their generation
        changed, so an unchanged adapter costs no copy.
        """
        w = self._current_weights()
        if _speedups is not None:
            out = _speedups.adapt(x, w.down, w.up_scaled)
            if out is not None:  # x was a finite float32 [h] or [n, h] array; anything else is handled below
                return out
        return adapt(check_vectors(x, self.hidden_dim), w.down, w.up_scaled)

    # ----------------------------------------------------------------- routing

    @property
    def routes(self) -> RouteTable | None:
        """The engine's :class:`RouteTable` as it is now (routes added, renamed, retired included); None without one."""
        return self._current_weights().table

    def route(self, x: Any, *, explore: Any = _NO_EXPLORATION, sample: bool = False, rng: Any = None, gamma: Any = None) -> RouteChoice:
        """Choose one of the engine's routes for ``x`` (``[h]`` or ``[n, h]``): the best score of ``forward(x)``
        against the learned route table (:mod:`sona_shm.learn.routes`).

        Lock-free like :meth:`forward`. ``explore``: a probability (epsilon-greedy: serve a
        uniformly drawn route that often), ``"softmax"`` (draw from the rule's softmax) or
        ``"squarecb"`` (SquareCB with ``gamma``: explores where the router is unsure, the
        exploration measured best for bandit feedback); ``sample=True`` is ``explore="softmax"``.
        Give :meth:`feedback` the route actually served (``choice.index``) and its
        ``choice.probability``. ``rng``: a ``random.Random`` or numpy ``Generator`` for the draws
        (default: the C path's own generator, reseeded in every forked process, or ``random``).
        """
        w = self._current_weights()
        router = w.router
        if router is None:
            raise self._no_table("route")
        # The defaults (the common call) need no checking; anything else is checked as InstantLoop.route checks it.
        if explore is _NO_EXPLORATION and sample is False and rng is None and gamma is None:
            mode, parameter = "greedy", 0.0
        else:
            mode, parameter = check_exploration(explore, sample, rng, gamma)
        if _speedups is not None:  # one C call for one vector
            u = -1.0 if rng is None or mode == "greedy" else float(rng.random())
            done = _speedups.route(
                x,
                router.down,
                router.up_scaled,
                router.vectors,
                router.bias,
                router.active,
                router.names,
                MODES[mode],
                parameter,
                router.temperature,
                u,
            )
            if done is not None:  # x was a finite float32 [h] vector; anything else is handled below
                return done
        return choose(router, x, mode=mode, parameter=parameter, rng=rng)

    def feedback(
        self, x: Any, *, route: Any = None, reward: Any = None, best: Any = None, probability: Any = None, timeout: float = 0.0
    ) -> bool:
        """Record which route serves query ``x``; False if the lane is full (as :meth:`record`).

        Bandit: ``route=`` (the route served, by index or name) and ``reward=`` (how
        well it did; in [0, 1] under the routing rule). Full information: ``best=`` (the
        route that was right), optionally with ``route=`` (the one served). ``probability``:
        the probability the route served was chosen with (``RouteChoice.probability``), kept
        for off-policy evaluation. Recorded as a trajectory (encoding in
        :mod:`sona_shm.learn.routes`), so drain returns it. A feedback on a route retired
        meanwhile is recorded and counted, and teaches nothing. Bad input raises
        :class:`InvalidInputError` naming the argument, and nothing is written.
        """
        table = self.routes
        if table is None:
            raise self._no_table("feedback")
        traj = feedback_trajectory(
            table, x, route=route, reward=reward, best=best, unit_reward=self.rule == "routing", probability=probability
        )
        return self.record(traj, timeout=timeout)

    # ----------------------------------------------------------------- changing the routes

    def add_route(self, name: str, vector: Any, *, timeout: float = route_changes.DEFAULT_TIMEOUT) -> int:
        """Add route ``name`` with ``vector`` (``float[h]``, e.g. :meth:`RouteTable.from_examples`' mean of its
        examples' embeddings) to the engine's table; its index. Applied by the flusher between two scans (or
        here when none runs); every worker routes with it from its next :meth:`route`. Refused (nothing
        written) for a name in use, another width, or a table at its ``max_routes``."""
        return route_changes.change(self._open_segment(), "add", name=name, vector=vector, timeout=timeout)

    def rename_route(self, route: Any, name: str, *, timeout: float = route_changes.DEFAULT_TIMEOUT) -> int:
        """Rename ``route`` (index or name); what it learned and its counts stay. Its index."""
        return route_changes.change(self._open_segment(), "rename", route=route, name=name, timeout=timeout)

    def retire_route(self, route: Any, *, timeout: float = route_changes.DEFAULT_TIMEOUT) -> int:
        """Retire ``route`` (index or name): never chosen or learned again; its index, learned state and counts
        stay. Its index."""
        return route_changes.change(self._open_segment(), "retire", route=route, timeout=timeout)

    # ----------------------------------------------------------------- pausing and rolling back learning

    def pause(self, *, timeout: float = admin.DEFAULT_TIMEOUT) -> None:
        """Stop the engine learning: every worker keeps the adapter published now; what producers record meanwhile is
        taken in, counted and kept for consumers, and never learned (:mod:`sona_shm.engine.admin`). Kept across
        flusher restarts until :meth:`resume`. Refused on a host of a fleet."""
        admin.pause(self._open_segment(), timeout=timeout)

    def resume(self, *, timeout: float = admin.DEFAULT_TIMEOUT) -> None:
        """Learn again, from the next trajectory the flusher takes in (also after the reward guard paused learning)."""
        admin.resume(self._open_segment(), timeout=timeout)

    def rollback(self, to: Any = None, *, back: int | None = None, timeout: float = admin.DEFAULT_TIMEOUT) -> int:
        """Replace the engine's learned state by one of its checkpoints — ``to`` (a file) or ``back`` (the K-th newest
        kept checkpoint, 1: the newest; the default) — through the running flusher while producers keep recording;
        the number of signals whose learning it discarded. Every worker routes with it from its next call. Refused
        (:class:`CheckpointError`, nothing changed) for a file of another engine or one that does not fit."""
        segment = self._open_segment()
        if to is not None and back is not None:
            raise InvalidInputError(f"to, back: give one, got to={to!r} and back={back!r}")
        path = to if to is not None else resolve_back(segment, 1 if back is None else back, "back")
        return admin.rollback(segment, path, timeout=timeout).discarded

    def _no_table(self, what: str) -> InvalidInputError:
        return InvalidInputError(
            f"{what}(): engine {self.name!r} has no route table; create it with `sona-shm flusher --name {self.name} --routes FILE`"
        )

    def _load_weights(self) -> _Weights:
        """Read the published adapter and route table (consistently) and cache them by generation."""
        old, layout = self._weights, self.layout
        try:
            if not layout.max_routes:
                generation, down, up = self._ledger.read("generation", "down", "up")
                fields: list = []
            else:
                generation, down, up, *fields = self._ledger.read(
                    "generation", "down", "up", "routes_used", "routes_version", "route_vectors", "route_bias", "route_state"
                )
        except TornRead:
            return old  # the flusher outran us; the last good copy is still consistent
        scale = np.float32(1.0 / math.sqrt(layout.rank))
        up_scaled = up * scale
        table, router, version = None, None, -1
        if fields:
            used, version, vectors, bias, state = fields
            table = old.table
            if version != old.routes_version or table is None or len(table) != used:
                table = read_route_table(self._open_segment())  # names changed (rarely): read them with the table
                if table is None or len(table) != used:
                    return old  # a route change committed meanwhile: the next call reads both again
            router = Router(
                down,
                up_scaled,
                np.ascontiguousarray(vectors[:used]),
                np.ascontiguousarray(bias[:used]),
                (state[:used] == ACTIVE).astype(np.uint8),
                table.names,
                self._temperature,
            )
        w = _Weights(generation, down, np.ascontiguousarray(down.T), up_scaled, version, table, router)
        self._weights = w  # one reference store: other threads see the old or the new tuple
        return w

    # ----------------------------------------------------------------- waiting for the flusher

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until every trajectory this process committed has been learned.

        Raises :class:`FlusherTimeoutError` after ``timeout``, :class:`EngineDestroyedError`
        if the engine is removed (before or while waiting), :class:`ClosedError` after close().
        """
        check_timeout(timeout)
        with self._lock:
            self._check_open()
            if self._lane < 0:
                return  # nothing recorded since the lane was claimed (or since a fork)
            lane, target = self._lane, self._writer.head
            self._open_segment().ring()

        def learned() -> bool:
            with self._lock:  # held for the look only: close() and record() never wait on a sync
                self._check_open()
                return self._ledger.lane_tail(lane) >= target

        if not wait_until(learned, timeout):
            raise FlusherTimeoutError(self._timeout_message("sync", timeout))

    def flush(self, timeout: float = 5.0) -> None:
        """Ask the flusher to learn what is committed and apply pending gradients; wait for it.

        Raises as :meth:`sync` does.
        """
        check_timeout(timeout)
        with self._lock:
            self._check_open()
            self._ensure_lane()
            word = self._words.flush_request
            request = self._u64[word] + 1
            self._u64[word] = request  # after our records' heads, so the flusher sees them first
            ack = self._words.flush_ack
            self._open_segment().ring()

        def answered() -> bool:
            with self._lock:
                self._check_open()
                return self._u64[ack] >= request

        if not wait_until(answered, timeout):
            raise FlusherTimeoutError(self._timeout_message("flush", timeout))

    def _check_open(self) -> None:
        """Raise :class:`ClosedError` after close(), :class:`EngineDestroyedError` once the engine was removed."""
        if self._segment is None:
            raise self._closed()
        if self._segment.destroyed():
            raise self._segment.destroyed_error()

    def _timeout_message(self, what: str, timeout: float) -> str:
        with self._lock:
            self._check_open()
            alive = self._open_segment().is_locked(LOCK_FLUSHER)
            pid = self._u64[FLUSHER_WORDS.pid]
        state = f"its flusher (pid {pid}) is alive but busy" if alive else "no flusher is running"
        return f"{what}() on segment {self.name!r} timed out after {timeout} s: {state}; start `sona-shm flusher --name {self.name}`"

    # ----------------------------------------------------------------- the buffer, as a consumer

    def drain(self, *, timeout: float = DRAIN_TIMEOUT) -> list[Trajectory]:
        """Remove and return every learned trajectory in the engine's buffer, oldest first.

        Any process may drain (see :class:`sona_shm.Consumer`); none receives a
        trajectory another one got. ``timeout``: seconds to wait for another consumer.
        """
        return self._consumer().drain(timeout=timeout)

    def drain_n(self, n: int, *, timeout: float = DRAIN_TIMEOUT) -> list[Trajectory]:
        """Remove and return up to ``n`` learned trajectories, oldest first."""
        return self._consumer().drain_n(n, timeout=timeout)

    def drain_arrays(self, n: int | None = None, *, timeout: float = DRAIN_TIMEOUT) -> TrajectoryBatch:
        """Remove up to ``n`` learned trajectories (all when ``None``) as one :class:`TrajectoryBatch`."""
        return self._consumer().drain_arrays(n, timeout=timeout)

    def buffer_stats(self) -> tuple[int, int, float]:
        """``(len, dropped, success_rate)`` of the engine's buffer, as ``InstantLoop.buffer_stats``."""
        if self._segment is None:
            raise ClosedError(f"client of segment {getattr(self, 'name', '?')!r} is closed; attach again")
        return buffer_stats(self._segment, self._ledger)

    def _consumer(self) -> Consumer:
        # A consumer of its own (own mapping and descriptor): the drain lock and the lane
        # lock then never share a descriptor, and fork handling stays each one's own.
        with self._lock:
            consumer = self.__dict__.get("_drainer")
            if consumer is None:
                if self._segment is None:
                    raise ClosedError(f"client of segment {getattr(self, 'name', '?')!r} is closed; attach again")
                consumer = self._drainer = Consumer(self.name)
            return consumer

    # ----------------------------------------------------------------- stats and lifecycle

    def stats(self) -> dict[str, Any]:
        """Counters of the whole engine, read without locks: the dict ``sona-shm stats --json`` prints.

        Its keys are documented in docs/reference/stats.md; :meth:`statistics` is the
        same observation as a typed :class:`~sona_shm.stats.EngineStats`.
        """
        return self.statistics().as_dict()

    def statistics(self) -> EngineStats:
        """The engine observed now (no lock taken, nothing written), as a frozen :class:`~sona_shm.stats.EngineStats`."""
        if self._segment is None:
            raise self._closed()
        return collect(self._segment, self._ledger)

    def close(self) -> None:
        """Release the lane and unmap. Safe to call twice. Committed trajectories stay.

        Waits (up to ``CLOSE_WAIT`` seconds) for a ``record()`` another thread is in the
        middle of; calls made after ``close()`` raise :class:`ClosedError`. A
        ``forward()`` running concurrently with ``close()`` may fail instead.
        """
        seg = self._segment
        if seg is None:
            return
        locked = self._lock.acquire(timeout=CLOSE_WAIT)
        try:
            self._close(seg)
        finally:
            if locked:
                self._lock.release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the lane is given back)."""
        return self._segment is None

    def _open_segment(self) -> Segment:
        """The mapped segment; :class:`ClosedError` once the client is closed."""
        seg = self._segment
        if seg is None:
            raise self._closed()
        return seg

    def _closed(self) -> ClosedError:
        return ClosedError(f"client of segment {getattr(self, 'name', '?')!r} is closed; attach again")

    def _close(self, seg: Segment) -> None:
        self._lane = -1
        drainer = self.__dict__.pop("_drainer", None)
        if drainer is not None:
            drainer.close()
        self._drop_writer()
        self.__dict__.pop("_u64", None)
        ledger = self.__dict__.pop("_ledger", None)
        if ledger is not None:
            ledger.close()
        seg.close()  # closing our descriptor drops the lane lock
        self._segment = None
        _clients.discard(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sona_shm.Client {getattr(self, 'name', '?')!r} lane={self._lane}>"


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["Client", "attach", "InvalidInputError"]
