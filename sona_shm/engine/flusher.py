"""The flusher: the one process per engine that learns from every committed trajectory.

It creates the segment (or adopts one left by an earlier flusher), then loops: read
the lanes' flush requests, learn every slot between each lane's tail and head in
vectorised batches, flush at every ``flush_threshold`` signals (and on the interval
timer and on request), copy learned trajectories into the buffer for consumers, and
publish everything — weights, gradients, counters and lane tails — in one ledger
commit. Because the tails are committed together with the gradients they produced, a
flusher killed at any instant leaves a state where each trajectory is either fully
learned or not at all; the next flusher picks up from there.

With nothing to do it announces that it is idle, looks once more, and sleeps on the
doorbell with a timeout (``WAKE_TIMEOUT``): a producer that publishes into an idle
engine rings the bell. Full fences on both sides (the C writer's publish, the
semaphore round trip in _sleep) make the handshake lose nothing; a producer on the
pure-Python path has no fence, and a ring it misses costs at most that timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import posix_ipc

from ..config import DEFAULT_FLEET_OUTBOX
from ..errors import (
    CheckpointError,
    ClosedError,
    FleetError,
    FlusherRunningError,
    InvalidInputError,
    LayoutMismatchError,
    SegmentNotFoundError,
)
from ..learn.learner import Learner, initial_down, learning_signals
from ..learn.routes import RouteTable, read_route_table
from ..native import speedups as _speedups
from ..shm.layout import (
    CONSUMER_WORDS,
    FL_PID,
    FLUSHER_LINE,
    FLUSHER_WORDS,
    HEADER_BYTES,
    LOCK_FLUSHER,
    MAGIC,
    EngineConfig,
    Layout,
)
from ..shm.ledger import Ledger
from ..shm.segment import (
    DEFAULT_MODE,
    GROUP_MODE,
    Segment,
    check_name,
    check_timeout,
    create_bell,
    create_fd,
    open_fd,
    reserve,
    start_ticks,
    try_lock_fd,
    unlink_created,
)
from ..shm.space import check_room
from ..store.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from ..trajectory import ROUTE_MAX_BYTES

log = logging.getLogger("sona_shm.flusher")

#: Longest sleep on the doorbell: bounds the cost of a lost ring and the heartbeat age.
WAKE_TIMEOUT = 0.05
#: Passes over the lanes when draining at shutdown (live producers may keep writing).
DRAIN_PASSES = 64
#: Seconds between two looks at whether the segment was destroyed under the flusher.
DESTROYED_CHECK_INTERVAL = 0.1


class Flusher:
    """Owns one segment's learning; see the module docstring.

    ``config``: the :class:`EngineConfig` fields to create the segment with. When the
    segment already exists, only the fields in ``config_overrides`` are compared with
    it (a mismatch is refused), so a restarted flusher adopts whatever it finds.

    ``checkpoint``: a file path. If the segment is new and the file exists, the engine
    is created with the file's configuration (``config_overrides`` win) and its learned
    state, before any worker can attach; a file that cannot be restored is refused with
    :class:`CheckpointError` and the new segment is removed again. An adopted segment is
    newer than any checkpoint, so the file is then not read. The state is written there
    every ``checkpoint_interval`` seconds (0: only at shutdown) and at shutdown.

    ``routes``: the engine's :class:`RouteTable` (the routing rule needs one). A new
    segment stores it (or the checkpoint's); an existing one must hold the same table.

    ``fleet``: :class:`~sona_shm.fleet.FleetOptions` to learn as one host of a fleet
    (:mod:`sona_shm.fleet.member`): flush points seal windows into the outbox instead of
    applying them, and the adapter changes only by applying the fleet's stream. A new
    segment then gets an outbox of ``fleet_outbox`` entries (default
    :data:`~sona_shm.config.DEFAULT_FLEET_OUTBOX`); an existing one must have one.
    """

    def __init__(
        self,
        name: str,
        *,
        config: EngineConfig | None = None,
        config_overrides: dict[str, Any] | None = None,
        routes: RouteTable | None = None,
        flush_interval: float = 0.0,
        mode: int = DEFAULT_MODE,
        checkpoint: str | None = None,
        checkpoint_interval: float = 0.0,
        fleet: Any = None,
    ) -> None:
        check_name(name)
        self.fleet_options = fleet
        self.fleet: Any = None  # the FleetMember, in fleet mode
        self.name = name
        self.flush_interval = check_timeout(flush_interval, "flush_interval")  # NaN would never flush, inf neither
        self.stop_requested = False
        self.created = False
        self.restored = False
        self.segment: Segment | None = None
        self.checkpoint_path = _check_checkpoint_path(checkpoint)
        self.checkpoint_interval = check_timeout(checkpoint_interval, "checkpoint_interval")
        if config is not None:
            overrides = dict(config_overrides) if config_overrides is not None else dataclasses.asdict(config)
        else:
            overrides = dict(config_overrides or {})
        if routes is not None:
            overrides["routes"] = len(routes)
        saved, problem = _load_checkpoint(self.checkpoint_path)
        if saved is not None and saved.routes is not None and routes is not None and not saved.routes.same_as(routes):
            problem = CheckpointError(f"checkpoint {self.checkpoint_path}: its route table differs from --routes; nothing restored")
        table = routes if routes is not None else saved.routes if saved is not None else None
        # A new segment is the checkpoint's engine (if any) with the options given on top.
        base = dataclasses.asdict(saved.config) if saved is not None else {}
        if config is not None and saved is None:
            base = dataclasses.asdict(config)
        if fleet is not None and not base.get("fleet_outbox") and "fleet_outbox" not in overrides:
            base["fleet_outbox"] = DEFAULT_FLEET_OUTBOX  # a segment created for a fleet gets an outbox
        try:
            requested: EngineConfig | InvalidInputError = EngineConfig(**{**base, **overrides})
        except InvalidInputError as exc:
            requested = exc  # only an error if the segment must be created: adopting compares the options given
        if fleet is not None and isinstance(requested, EngineConfig) and requested.fleet_outbox == 0:
            raise InvalidInputError("fleet_outbox: a host of a fleet needs an outbox (--fleet-outbox N >= 1, default 4096), got 0")

        def restore_into(layout: Layout) -> Checkpoint | None:
            """Only for a new segment, before its header is published."""
            if problem is not None:
                raise problem
            if saved is not None:
                saved.check_fits(layout, f"checkpoint {self.checkpoint_path}")
            return saved

        self.segment, self.created = _create_or_adopt(name, requested, overrides, table, mode, restore_into)
        self.restored = self.created and saved is not None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _mapped(self) -> Segment:
        """The segment, while this flusher has it mapped (it is None after :meth:`close`)."""
        if self.segment is None:
            raise ClosedError(f"flusher of segment {self.name!r} is closed")
        return self.segment

    def _setup(self) -> None:
        seg = self._mapped()
        layout = self.layout = seg.layout
        self.ledger = Ledger(seg)
        self._u64, self._f64 = seg.u64, seg.f64
        buf = seg.numpy_buffer()
        L, N, C = layout.lanes, layout.lane_slots, layout.capacity
        self._slots = np.ndarray((L, N), dtype=layout.slot_dtype, buffer=buf, offset=layout.slots_offset)
        self._slot_bytes = np.ndarray((L * N, layout.slot_bytes), dtype=np.uint8, buffer=buf, offset=layout.slots_offset)
        self._buffer_bytes = np.ndarray((C, layout.slot_bytes), dtype=np.uint8, buffer=buf, offset=layout.buffer_offset)
        self._buffer_seq = np.ndarray((C,), dtype=np.uint64, buffer=buf, offset=layout.buffer_offset, strides=(layout.slot_bytes,))
        self._head_words = [w.head for w in layout.lane_words]
        self._req_words = [w.flush_request for w in layout.lane_words]
        self._ack_words = [w.flush_ack for w in layout.lane_words]
        self._consumer_tail = CONSUMER_WORDS.tail
        fl = FLUSHER_WORDS
        self._w_heartbeat, self._w_idle, self._w_scans = fl.heartbeat, fl.idle, fl.scans

        # The private state: one ledger record, with the learner's arrays as views into it.
        self._state = self.ledger.snapshot()
        st = self._state[0]
        cfg = layout.config
        self.routes = read_route_table(seg)
        # In fleet mode the record's up/down are the fleet's adapter, changed only by applying the
        # stream; the learner computes with private copies (replica.speculate).
        private = ("down", "up") if self.fleet_options is not None else ()
        self.learner = Learner.for_engine(
            cfg,
            None if self.routes is None else self.routes.unit,
            **{
                field: np.array(st[field]) if field in private else st[field]
                for field in ("down", "up", "grad_up", "grad_down", "route_chosen", "route_best", "route_reward")
            },
        )
        for field in ("generation", "pending", "trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied"):
            setattr(self.learner, field, int(st[field]))
        self._tails = st["lane_tail"]
        self._fleet_replica = bool(st["fleet_epoch"])  # bound to a fleet: only a flusher with --fleet may learn here
        self.buffer_head = int(st["buffer_head"])
        self.buffer_dropped = int(st["buffer_dropped"])
        self.corrupt = int(st["corrupt"])
        self._bad_heads: dict[int, int] = {}  # lane -> the corrupt head last counted
        self.last_flush_at = float(st["last_flush_at"])
        self._last_flush_mono = time.monotonic()

        pid = os.getpid()
        u64, f64 = self._u64, self._f64
        u64[fl.pid] = pid
        u64[fl.start_ticks] = start_ticks(pid)
        f64[fl.started_at] = time.time()
        u64[self._w_idle] = 0
        f64[self._w_heartbeat] = time.time()
        log.info("%s segment %r (pid %d): %s", "created" if self.created else "adopted", self.name, pid, layout.describe_size())
        self._checkpointed_commit: int | None = None
        self._next_checkpoint = math.inf
        if self.checkpoint_path:
            if self.restored:
                log.info(
                    "restored %r from %s: generation %d, %d trajectories processed",
                    self.name,
                    self.checkpoint_path,
                    self.learner.generation,
                    self.learner.trajectories_processed,
                )
            elif not self.created:
                log.info("adopted %r keeps its own state (newer than any checkpoint); %s is not read", self.name, self.checkpoint_path)
            if self.checkpoint_interval > 0:
                self._next_checkpoint = time.monotonic() + self.checkpoint_interval
        self._seen_requests = [0] * layout.lanes  # fleet mode: the last flush request of each lane taken in
        if self.fleet_options is not None:
            from ..fleet.member import FleetMember

            self._seen_requests = [int(u64[w]) for w in self._ack_words]
            self.fleet = FleetMember(self.fleet_options, seg, self._state, self.learner, self.routes, self.ledger, self._tails)
            self.learner.sealer = self.fleet.seal
            if cfg.rule == "routing":
                self.fleet.replica.speculate(self.learner.up, self.learner.down)
            self.fleet.start()

    # ----------------------------------------------------------------- the loop

    def run(self) -> None:
        """Loop until :attr:`stop_requested`; then drain, flush and release the segment.

        If the segment is destroyed meanwhile (``sona-shm destroy --force``), release it
        and raise :class:`EngineDestroyedError` at once: nothing committed to it can be
        learned for anyone any more, and a flusher learning out of sight of a new engine
        of the same name would be a split brain. No checkpoint is written then.
        """
        next_look = 0.0
        while not self.stop_requested:
            if self.scan() == 0:
                self._sleep()
            now = time.monotonic()
            if now >= self._next_checkpoint:
                self._periodic_checkpoint()
            if now >= next_look:
                next_look = now + DESTROYED_CHECK_INTERVAL
                self._exit_if_destroyed()
        self._exit_if_destroyed()
        self.shutdown()

    def _exit_if_destroyed(self) -> None:
        if self.segment is not None and self.segment.destroyed():
            error = self.segment.destroyed_error()
            log.error(
                "segment %r was destroyed under this flusher (pid %d); stopping without drain or checkpoint: %d trajectories processed",
                self.name,
                os.getpid(),
                self.learner.trajectories_processed,
            )
            self.close()
            raise error

    def scan(self) -> int:
        """One pass: learn what every lane committed, flush if due, commit. Returns #learned.

        In fleet mode also: apply what the stream brought first, seal instead of applying,
        and answer a flush request only once its lane's windows came back applied.
        """
        u64 = self._u64
        fleet = self.fleet
        if fleet is None and self._fleet_replica:
            raise FleetError(
                f"segment {self.name!r} is a replica of a fleet: its adapter changes only through the fleet's stream, and its "
                f"outbox may hold windows not yet published. Start its flusher with --fleet (the same --fleet-key and --host-id), "
                f"or checkpoint it, destroy it and restore the checkpoint into a new engine to learn alone"
            )
        # Requests are read before heads: a producer stores its heads before its request,
        # so every record it made before asking is learned in this same pass.
        requests = [(lane, u64[w]) for lane, w in enumerate(self._req_words) if u64[w] > u64[self._ack_words[lane]]]
        changed = False
        if fleet is not None:
            for lane, request in requests:
                if request > self._seen_requests[lane]:
                    self._seen_requests[lane] = request
                    fleet.request_flush(lane, request, u64[self._head_words[lane]])
            changed = fleet.pump()  # the stream's entries and snapshots, applied to the private record
        learned = 0
        moved = False  # tails advance also past slots that fail their check: that must be committed too
        tails = self._tails
        slots = self.layout.lane_slots
        for lane, word in enumerate(self._head_words):
            head = u64[word]
            tail = int(tails[lane])
            if head > tail + slots or head < tail:
                self._corrupt_head(lane, head, tail)  # a producer publishes at most slots ahead of the committed tail
            elif head > tail:
                got, consumed = self._learn_lane(lane, tail, head)
                learned += got
                moved |= consumed
        flushed = False
        due = self.flush_interval > 0 and self.learner.pending and time.monotonic() - self._last_flush_mono >= self.flush_interval
        if (requests if fleet is None else fleet.flush_wanted()) or due:
            flushed = self._flush()
        if moved or flushed or changed:
            self._commit()
        if fleet is None:
            for lane, request in requests:
                u64[self._ack_words[lane]] = request  # after the commit: the requester now sees the weights
        else:
            for lane, request in fleet.after_commit():
                u64[self._ack_words[lane]] = request  # after the commit that applied its windows back from the stream
            fleet.write_stats()
        u64[self._w_scans] += 1
        self._f64[self._w_heartbeat] = time.time()
        return learned

    def _corrupt_head(self, lane: int, head: int, tail: int) -> None:
        """A lane head outside ``[tail, tail + lane_slots]``: not a stall, memory written outside sona_shm.

        Nothing of the lane is learned while it lasts; it is counted once (in ``corrupt``)
        and the tail stays. The lane's owner overwrites the head with its next record (its
        own count lives in its writer), and a process that claims the lane repairs it.
        """
        if self._bad_heads.get(lane) == head:
            return
        self._bad_heads[lane] = head
        self.corrupt += 1
        self._commit()
        log.error(
            "lane %d: head %d is outside [%d, %d] (tail + lane_slots); counted as corrupt, nothing learned until it is rewritten",
            lane,
            head,
            tail,
            tail + self.layout.lane_slots,
        )

    def _learn_lane(self, lane: int, tail: int, head: int) -> tuple[int, bool]:
        """Learn the lane's slots ``[tail, head)`` (in fleet mode, as far as the outbox has room);
        the number learned, and whether the tail moved."""
        slots = self.layout.lane_slots
        self._bad_heads.pop(lane, None)
        learned = 0
        start = tail
        while start < head:
            first = start % slots
            count = min(head - start, slots - first)
            if self.fleet is None:
                got, consumed = self._learn_slots(lane, first, count, start), count
            else:
                got, consumed = self._learn_slots_fleet(lane, first, count, start)
            learned += got
            start += consumed
            if consumed < count:
                break  # the outbox is full: the rest waits in the lane
        self._tails[lane] = start
        return learned, start > tail

    def _learn_slots_fleet(self, lane: int, first: int, count: int, index: int) -> tuple[int, int]:
        """:meth:`_learn_slots` in fleet mode: a window that reaches ``flush_threshold`` is sealed
        (:meth:`FleetMember.seal`) where the engine would apply it, and a new window starts only
        while the outbox has room. Returns the number learned and the slots consumed.

        The sums are those of the engine without a fleet, bit for bit: the C learners stop
        exactly where they would apply; the numpy path computes the block's signals at once,
        as :meth:`_learn_slots` does, and cuts the learning at each window's last signal.
        """
        if _speedups is None:
            return self._learn_numpy_fleet(lane, first, count, index)
        layout, learner, fleet = self.layout, self.learner, self.fleet
        learned = done = 0
        while done < count:
            if not (fleet.may_open_window() if learner.pending == 0 else fleet.bound):
                break  # no room for a new window (or not joined yet): the rest waits in the lane
            flat = lane * layout.lane_slots + first + done
            block = self._slot_bytes[flat : flat + count - done]
            width, corrupt, consumed = learn_block(learner, layout, block, index + done + 1, stop=True)
            if learner.pending == learner.flush_threshold:
                fleet.seal()
            if corrupt:
                valid = np.ones(consumed, bool)
                valid[corrupt] = False
                learned += self._account_slots(lane, flat, valid, width, index + done)
            else:  # the common case, without building a mask
                self._keep_in_buffer(flat, consumed, max(1, width))
                learned += consumed
            done += consumed
        return learned, done

    def _learn_numpy_fleet(self, lane: int, first: int, count: int, index: int) -> tuple[int, int]:
        layout, learner, fleet = self.layout, self.learner, self.fleet
        rec = self._slots[lane, first : first + count]
        ok = slot_checks(rec, index + 1, layout)
        valid = rec[ok]  # the learned slots, in order
        routing = learner.rule == "routing"
        n_steps = valid["n_steps"].astype(np.int64)
        route_index = valid["route_index"].astype(np.int64) - 1
        best_index = valid["best_index"].astype(np.int64) - 1
        signals = None
        if not routing and len(valid):
            w = max(1, int(n_steps.max()))
            signals = learning_signals(valid["query"], valid["meta"]["reward"][:, :w], valid["steps"]["act"][:, :w], n_steps)
        is_signal = ok & ((rec["route_index"] > 0) | (rec["best_index"] > 0)) if routing else ok
        signal_at = np.flatnonzero(is_signal)  # block positions of the signals
        learned = done = at = 0  # at: position in ``valid``
        while done < count:
            if not (fleet.may_open_window() if learner.pending == 0 else fleet.bound):
                break  # no room for a new window (or not joined yet): the rest waits in the lane
            need = learner.flush_threshold - learner.pending
            ahead = signal_at[signal_at >= done]
            cut = int(ahead[need - 1]) + 1 if len(ahead) >= need else count  # the window's last signal ends this part
            part_ok = ok[done:cut]
            part = slice(at, at + int(part_ok.sum()))
            if routing:
                learner.learn_feedback(valid["query"][part], route_index[part], best_index[part], valid["quality"][part])
            elif signals is not None and part.stop > part.start:
                learner.learn(signals[part], valid["quality"][part])  # seals through learner.sealer at the threshold
            learner.count_routes(route_index[part], best_index[part], valid["quality"][part])
            width = int(n_steps[part].max()) if part.stop > part.start else 0
            learned += self._account_slots(lane, lane * layout.lane_slots + first + done, part_ok, width, index + done)
            at, done = part.stop, cut
        return learned, done

    def _learn_numpy(self, rec: np.ndarray) -> int:
        """Learn valid lane slots ``rec`` with the numpy learner; the most steps one had."""
        learner = self.learner
        n_steps = rec["n_steps"].astype(np.int64)
        route_index = rec["route_index"].astype(np.int64) - 1
        best_index = rec["best_index"].astype(np.int64) - 1
        width = int(n_steps.max()) if len(rec) else 0
        if learner.rule == "routing":
            learner.learn_feedback(rec["query"], route_index, best_index, rec["quality"])
        elif len(rec):
            w = max(1, width)
            learner.learn(learning_signals(rec["query"], rec["meta"]["reward"][:, :w], rec["steps"]["act"][:, :w], n_steps), rec["quality"])
        learner.count_routes(route_index, best_index, rec["quality"])
        return width

    def _account_slots(self, lane: int, flat: int, valid: np.ndarray, width: int, index: int) -> int:
        """Count the corrupt slots among ``valid`` (lane slots from flat index ``flat``, lane index ``index``) and keep
        the learned ones for consumers; the number learned."""
        count = len(valid)
        learned = int(valid.sum())
        if learned < count:
            # A slot inside [tail, head) always carries its stamp and the values its producer
            # checked: this is memory written outside sona_shm.
            bad = count - learned
            log.error("lane %d: %d slots in [%d, %d) fail their checks; counted as corrupt, not learned", lane, bad, index, index + count)
            self.corrupt += bad
        if learned == count:
            self._keep_in_buffer(flat, count, max(1, width))
            return learned
        # Runs of learned slots go to the buffer in order; corrupt ones are left out.
        edges = np.flatnonzero(np.diff(np.concatenate(([0], valid.view(np.int8), [0]))))
        for start, stop in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            self._keep_in_buffer(flat + start, stop - start, max(1, width))
        return learned

    def _learn_slots(self, lane: int, first: int, count: int, index: int) -> int:
        """Learn ``count`` contiguous slots of ``lane`` starting at ring slot ``first``; the number learned.

        A slot that fails :func:`slot_checks` is counted as corrupt and neither learned nor
        kept for consumers.
        """
        layout = self.layout
        flat = lane * layout.lane_slots + first
        learner = self.learner
        if _speedups is not None:
            width, corrupt, _ = learn_block(learner, layout, self._slot_bytes[flat : flat + count], index + 1)
            valid = np.ones(count, bool)
            valid[corrupt] = False
        else:
            rec = self._slots[lane, first : first + count]
            valid = slot_checks(rec, index + 1, layout)
            width = self._learn_numpy(rec[valid])
        return self._account_slots(lane, flat, valid, width, index)

    def _keep_in_buffer(self, flat_slot: int, count: int, width: int) -> None:
        """Copy learned slots into the buffer while it has room; count the rest as dropped."""
        capacity = self.layout.capacity
        room = capacity - (self.buffer_head - self._u64[self._consumer_tail])
        take = max(0, min(count, room))
        prefix = self.layout.prefix_bytes(width)
        done = 0
        while done < take:
            at = (self.buffer_head + done) % capacity
            n = min(take - done, capacity - at)
            self._buffer_bytes[at : at + n, :prefix] = self._slot_bytes[flat_slot + done : flat_slot + done + n, :prefix]
            self._buffer_seq[at : at + n] = np.arange(self.buffer_head + done + 1, self.buffer_head + done + n + 1, dtype=np.uint64)
            done += n
        self.buffer_head += take
        self.buffer_dropped += count - take

    def _flush(self) -> bool:
        self._last_flush_mono = time.monotonic()
        if self.fleet is not None:
            # A window in progress has its outbox entry (it was opened only with room): seal it.
            if not self.learner.pending or not self.fleet.bound:
                return False
            self.fleet.seal()
            return True
        generation = self.learner.generation
        self.learner.flush()
        if self.learner.generation != generation:
            self.last_flush_at = time.time()
            return True
        return False

    def _commit(self) -> None:
        st = self._state[0]
        learner = self.learner
        if learner.generation != st["generation"]:
            self.last_flush_at = time.time()  # threshold flushes inside learn() change the weights too
        st["generation"] = learner.generation
        st["pending"] = learner.pending
        st["trajectories_processed"] = learner.trajectories_processed
        st["signals_accumulated"] = learner.signals_accumulated
        st["flushes_performed"] = learner.flushes_performed
        st["updates_applied"] = learner.updates_applied
        st["buffer_head"] = self.buffer_head
        st["buffer_dropped"] = self.buffer_dropped
        st["corrupt"] = self.corrupt
        st["last_flush_at"] = self.last_flush_at
        if self.fleet is not None:
            self.ledger.publish(self._state, self.fleet.commit_points())
        else:
            self.ledger.publish(self._state)

    def _has_work(self) -> bool:
        u64, tails, fleet = self._u64, self._tails, self.fleet
        if fleet is not None:
            # Requests taken in wait for the stream, and while learning is paused the lanes'
            # backlog waits too: only news from the threads, a new request or (when learning
            # may go on) a new record is work.
            if fleet.has_news():
                return True
            learning = fleet.bound and (self.learner.pending > 0 or not fleet.paused)
            for lane, word in enumerate(self._head_words):
                if (learning and u64[word] > tails[lane]) or u64[self._req_words[lane]] > self._seen_requests[lane]:
                    return True
            return False
        for lane, word in enumerate(self._head_words):
            if u64[word] > tails[lane] or u64[self._req_words[lane]] > u64[self._ack_words[lane]]:
                return True
        return False

    def _sleep(self) -> None:
        u64, bell = self._u64, self._mapped().bell
        u64[self._w_idle] = 1  # from here on producers ring the bell
        try:
            # A full fence between that store and the reads of the heads below: sem_post
            # and sem_trywait are atomic read-modify-writes (locked instructions). With the
            # fence in the C writer's publish(), either the producer sees idle = 1 and
            # rings, or we see its head here; the pure-Python writer has no fence, and a
            # ring it misses costs at most WAKE_TIMEOUT.
            bell.release()
            bell.acquire(0)
            if self._has_work():  # published before they could see idle = 1
                return
            timeout = WAKE_TIMEOUT
            if self.flush_interval > 0 and self.learner.pending:
                due = self._last_flush_mono + self.flush_interval - time.monotonic()
                timeout = max(0.0, min(timeout, due))
            try:
                bell.acquire(timeout)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass
        finally:
            u64[self._w_idle] = 0
        # Several producers may have rung for the same wake-up; swallow the extra rings.
        while True:
            try:
                bell.acquire(0)
            except posix_ipc.BusyError:
                break

    # ----------------------------------------------------------------- checkpoints

    def write_checkpoint(self) -> bool:
        """Write the committed state to :attr:`checkpoint_path`; False if unchanged since the last write."""
        if not self.checkpoint_path:
            raise InvalidInputError("checkpoint: this flusher was started without a checkpoint path")
        record = self.ledger.snapshot()
        commit = self.ledger.commit  # we are the only writer, so this is the commit of the snapshot
        if commit == self._checkpointed_commit:
            return False
        write_checkpoint(self.checkpoint_path, Checkpoint.from_record(record[0], self.layout.config, self.routes), self._mapped().mode)
        self._checkpointed_commit = commit
        return True

    def _periodic_checkpoint(self) -> None:
        self._next_checkpoint = time.monotonic() + self.checkpoint_interval
        try:
            if self.write_checkpoint():
                log.info("checkpoint written to %s", self.checkpoint_path)
        except CheckpointError as exc:
            # A full disk must not stop the learning: say so and try again next interval.
            log.error("%s; learning goes on, next attempt in %g s", exc, self.checkpoint_interval)

    def flush_now(self) -> None:
        """Learn everything committed, apply pending gradients and publish (used at shutdown).

        In fleet mode the pending window is sealed, and the flusher waits a bounded time
        (:data:`~sona_shm.fleet.FINISH_TIMEOUT`) for its outbox to reach the stream and come back.
        """
        self.scan()
        if self._flush():
            self._commit()
        if self.fleet is not None:
            self.fleet.after_commit()

            def commit() -> None:
                self._commit()
                self.fleet.after_commit()

            self.fleet.finish(commit)
            self.fleet.stop()

    def shutdown(self) -> None:
        """Drain what producers committed, flush, publish, answer requests, release."""
        if self.segment is None:
            return
        for _ in range(DRAIN_PASSES):
            if self.scan() == 0:
                break
        self.flush_now()
        try:
            if self.checkpoint_path and self.write_checkpoint():
                log.info("checkpoint written to %s", self.checkpoint_path)
        finally:
            log.info(
                "stopped segment %r: %d trajectories processed, %d flushes",
                self.name,
                self.learner.trajectories_processed,
                self.learner.flushes_performed,
            )
            self.close()

    def close(self) -> None:
        """Release the segment and the flusher lock without draining. Safe to call twice."""
        fleet = self.__dict__.get("fleet")
        if fleet is not None:
            fleet.stop()  # its threads read the ledger: they end before it is unmapped
            self.fleet = None
        for attr in ("_slots", "_slot_bytes", "_buffer_bytes", "_buffer_seq", "_state", "_tails", "learner"):
            self.__dict__.pop(attr, None)
        ledger = self.__dict__.pop("ledger", None)
        if ledger is not None:
            ledger.close()
        self.__dict__.pop("_u64", None)
        self.__dict__.pop("_f64", None)
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def slot_checks(rec: np.ndarray, first_seq: int, layout: Layout) -> np.ndarray:
    """Which of the lane slots ``rec`` (stamped from ``first_seq``) may be learned: ``bool[n]``.

    A slot is corrupt if its stamp, step count, route length, step lengths or route
    indices are out of bounds, its quality or a step's reward is not finite, or a value the
    engine's rule learns from is NaN or infinite: under the reference rule the activations
    of its steps (or its query, without steps); under the routing rule a feedback's query,
    and a bandit reward outside [0, 1]. Producers never publish such a slot; the C learners
    make the same checks (``_speedups.learn_slots``/``learn_routing``).
    """
    n = len(rec)
    n_steps = rec["n_steps"].astype(np.int64)
    route_index = rec["route_index"].astype(np.int64) - 1
    best_index = rec["best_index"].astype(np.int64) - 1
    S, h, A = layout.max_steps, layout.hidden_dim, layout.attention_dim
    ok = (rec["seq"] == np.arange(first_seq, first_seq + n, dtype=np.uint64)) & (n_steps <= S) & (rec["route_len"] <= ROUTE_MAX_BYTES)
    ok &= (route_index < layout.routes) & (best_index < layout.routes) & np.isfinite(rec["quality"])
    in_use = np.arange(S) < np.minimum(n_steps, S)[:, None]  # [n, S]: the steps each slot has
    meta = rec["meta"]
    step_ok = (meta["act_len"] <= h) & (meta["att_len"] <= A) & np.isfinite(meta["reward"])
    ok &= (step_ok | ~in_use).all(axis=1)
    if layout.config.rule == "routing":
        feedback = (route_index >= 0) | (best_index >= 0)
        quality = rec["quality"]
        ok &= ~feedback | (np.isfinite(rec["query"]).all(axis=1) & ((best_index >= 0) | ((quality >= 0) & (quality <= 1))))
    else:
        acts_ok = np.isfinite(rec["steps"]["act"]).all(axis=2) | ~in_use  # [n, S]
        ok &= np.where(n_steps == 0, np.isfinite(rec["query"]).all(axis=1), acts_ok.all(axis=1))
    return ok


def learn_block(learner: Learner, layout: Layout, block: np.ndarray, first_seq: int, stop: bool = False) -> tuple[int, list[int], int]:
    """Learn consecutive lane slots (``block``: ``uint8[count, slot_bytes]``, stamped from
    ``first_seq``) with the C learner of ``learner``'s rule, in place. Returns the most
    steps a learned slot had, the indices of the slots that failed :func:`slot_checks`
    (learned from nothing) and the number of slots consumed. Needs ``_speedups``.

    ``stop`` (fleet mode): return as soon as ``pending`` reaches the flush threshold, without
    applying (the caller seals the window); fewer than ``count`` slots may then be consumed."""
    head = (block, block.shape[0], layout.hidden_dim, layout.max_steps, layout.payload_offset, layout.step_bytes, first_seq)
    tail = (learner.lr, learner.flush_threshold, learner.pending, learner.route_chosen, learner.route_best, learner.route_reward, stop)
    if learner.rule == "routing":
        result = _speedups.learn_routing(
            *head, learner.grad_up, learner.grad_down, learner.up, learner.down, learner.unit, learner.temperature, *tail
        )
    else:
        result = _speedups.learn_slots(*head, learner.grad_up, learner.up, *tail)
    pending, flushes, width, signals, corrupt, consumed = result
    learner.account(consumed - len(corrupt), signals, pending, flushes)
    return width, corrupt, consumed


def _check_checkpoint_path(path: str | None) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise InvalidInputError(f"checkpoint: expected a file path, got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InvalidInputError(f"checkpoint: directory {directory} does not exist")
    if os.path.isdir(path):
        raise InvalidInputError(f"checkpoint: {path} is a directory; give a file path")
    return path


def _load_checkpoint(path: str | None) -> tuple[Checkpoint | None, CheckpointError | None]:
    """The checkpoint at ``path`` or why it cannot be restored (raised only if a new segment needs it)."""
    if path is None or not os.path.exists(path):
        return None, None
    try:
        return read_checkpoint(path), None
    except CheckpointError as exc:
        return None, exc


def _create_or_adopt(
    name: str,
    requested: EngineConfig | InvalidInputError,
    overrides: dict[str, Any],
    routes: RouteTable | None,
    mode: int,
    restore_into: Callable[[Layout], Checkpoint | None] | None = None,
) -> tuple[Segment, bool]:
    """Create segment ``name`` or adopt the existing one; hold the flusher lock on return.

    ``requested``: the configuration of a new segment, or why the options given do not
    make one (raised only if the segment does not exist). A new segment gets the route
    table ``routes`` and the state ``restore_into(layout)`` returns (if any) before its
    header is published; if that raises, the segment is removed again — no worker can
    have attached to it — and the error propagates.
    """
    config_error = requested if isinstance(requested, InvalidInputError) else None
    layout = None if isinstance(requested, InvalidInputError) else Layout(requested)
    try:
        fd = open_fd(name, writable=True, engine_mode=mode)  # only our own user's object, never wider than mode
        created = False
    except SegmentNotFoundError:
        if config_error is not None:
            raise config_error from None  # the options given do not make an engine to create
        assert layout is not None
        check_room(layout, name, group=mode == GROUP_MODE)  # before anything is created
        try:
            fd = create_fd(name, layout.total_bytes, mode)  # O_EXCL, reserved whole: no SIGBUS on a full /dev/shm
            created = True
        except FileExistsError:  # another creator was quicker
            fd = open_fd(name, writable=True, engine_mode=mode)
            created = False
    try:
        if not try_lock_fd(fd, LOCK_FLUSHER):
            pid = int.from_bytes(os.pread(fd, 8, FLUSHER_LINE + FL_PID), "little") if os.fstat(fd).st_size > FLUSHER_LINE else 0
            raise FlusherRunningError(
                f"segment {name!r} already has a live flusher (pid {pid}); stop it first (SIGTERM) or use another --name"
            )
        raw = os.pread(fd, HEADER_BYTES, 0)
        # Zero magic: a creator died before finishing. Any other magic that is not ours is
        # another program's (or another version's) object: refused below, never overwritten.
        fresh = created or len(raw) < HEADER_BYTES or raw[:8] == b"\0" * 8
        if fresh:
            if config_error is not None or layout is None:
                raise config_error or InvalidInputError("config: no engine configuration")  # re-initialising needs one
            if not created:
                log.warning("segment %r was never completed (its creator died); initialising it again", name)
                os.ftruncate(fd, 0)  # back to all zeros
                reserve(fd, layout.total_bytes, name)
        else:
            existing = Layout.from_header(raw, name, os.fstat(fd).st_size)
            differences = existing.differences(overrides)
            if differences:
                diffs = "; ".join(differences)
                raise LayoutMismatchError(
                    f"segment {name!r} exists with another configuration ({diffs}); start the flusher without "
                    f"those options to adopt it, or remove it with `sona-shm destroy --name {name}` (its learned state is lost)"
                )
            layout = existing
            # An older sona_shm only sized the segment: reserve what it left sparse, or refuse.
            reserve(fd, layout.total_bytes, name)
        segment = Segment(name, fd, layout, writable=True)  # owns fd from here on
        # What the flusher writes — the ledger copies and, above all, the buffer, where each
        # learned trajectory would otherwise land on a page touched for the first time — is
        # faulted in now, once, rather than one page per trajectory (Segment.populate). A new
        # segment is populated before its magic is published, so no producer waits for it.
        segment.populate(layout.ledger_offset, layout.lanes_offset - layout.ledger_offset)
        segment.populate(layout.buffer_offset, layout.total_bytes - layout.buffer_offset)
    except BaseException:
        if created:
            unlink_created(name, fd)  # nobody can have attached: its header has no magic
        os.close(fd)
        raise
    if fresh:
        try:
            _initialise(segment, mode, routes, restore_into(segment.layout) if restore_into else None)
        except BaseException:
            # No worker can have attached (no magic). The doorbell is not removed: if it
            # exists it was there before (create_bell is the last step that can fail).
            unlink_created(name, segment.fileno())
            segment.close()
            raise
    else:
        try:
            table = read_route_table(segment) if routes is not None else None
            if routes is not None and (table is None or not table.same_as(routes)):
                raise LayoutMismatchError(
                    f"segment {name!r} exists with another route table; start the flusher without --routes to adopt it, "
                    f"or remove it with `sona-shm destroy --name {name}` (its learned state is lost)"
                )
            create_bell(name, mode)  # kept if it exists; recreated if someone removed it
        except BaseException:
            segment.close()
            raise
    return segment, fresh


def _initialise(segment: Segment, mode: int, routes: RouteTable | None, checkpoint: Checkpoint | None = None) -> None:
    """Write header, route table, first ledger copy and doorbell of a zeroed segment; the magic goes last."""
    layout = segment.layout
    if (routes is None) != (layout.routes == 0):
        raise InvalidInputError(
            f"routes: the engine's configuration says {layout.routes} routes, but {'no' if routes is None else 'a'} table was given"
        )
    segment.buf[: len(layout.pack_header())] = layout.pack_header()
    if routes is not None:
        routes.write(segment.numpy_buffer(), layout)
    record = np.zeros(1, dtype=layout.ledger_dtype)
    record[0]["down"] = initial_down(layout.hidden_dim, layout.rank)
    if checkpoint is not None:
        checkpoint.apply(record[0], checkpoint.generation)  # no worker has seen this segment: keep its generation
    ledger = Ledger(segment)
    ledger.copies[0] = record[0]
    ledger.close()
    create_bell(segment.name, mode)
    segment.buf[:8] = MAGIC  # publishes the header: attach() accepts the segment from now on
