"""The flusher: the one process per engine that learns from every committed trajectory.

It opens its engine (:mod:`sona_shm.engine.provision` creates or adopts the segment), then
loops: read the lanes' flush requests, learn every slot between each lane's tail and head
in vectorised batches, close a window every ``flush_threshold`` signals (and on the
interval timer and on request), copy learned trajectories into the buffer for consumers,
and publish everything — weights, gradients, counters and lane tails — in one ledger
commit. Because the tails are committed together with the gradients they produced, a
flusher killed at any instant leaves a state where each trajectory is either fully
learned or not at all; the next flusher picks up from there.

What becomes of a closed window and when a flush request is answered is the flusher's
*mode* (:mod:`sona_shm.engine.modes`): alone, the learner applies it; in a fleet it is
sealed for every host (:mod:`sona_shm.fleet`). The loop below is the same for both, with
one learning path per implementation: the C learners read the slots where they lie, the
numpy path checks and decodes them first (:mod:`sona_shm.shm.slots`).

With nothing to do it announces that it is idle, looks once more, and sleeps on the
doorbell with a timeout (``WAKE_TIMEOUT``): a producer that publishes into an idle
engine rings the bell. Full fences on both sides (the C writer's publish, the
semaphore round trip in _sleep) make the handshake lose nothing; a producer on the
pure-Python path has no fence, and a ring it misses costs at most that timeout.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import posix_ipc

from ..checks import check_timeout
from ..config import EngineConfig
from ..errors import CheckpointError, ClosedError, InvalidInputError
from ..learn.routes import RouteTable
from ..native import IMPLEMENTATION
from ..native import speedups as _speedups
from ..shm import slots
from ..shm.admin import Mailbox
from ..shm.layout import CONSUMER_WORDS, FLUSHER_WORDS
from ..shm.ledger import Ledger, learner_over, route_table_of, store_learner
from ..shm.segment import DEFAULT_MODE, Segment, start_ticks
from ..store.checkpoint import Checkpoint, write_checkpoint
from . import routes as route_changes
from .modes import SOLO, ModeContext, ModeFactory
from .provision import EngineSpec, open_engine

log = logging.getLogger("sona_shm.flusher")

#: Longest sleep on the doorbell: bounds the cost of a lost ring and the heartbeat age.
WAKE_TIMEOUT = 0.05
#: Passes over the lanes when draining at shutdown (live producers may keep writing).
DRAIN_PASSES = 64
#: Seconds between two looks at whether the segment was destroyed under the flusher.
DESTROYED_CHECK_INTERVAL = 0.1


class Flusher:
    """Owns one engine's learning; see the module docstring.

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
    ``mode``: the segment's file mode (0600, or 0660 for a ``--group`` engine).

    ``fleet``: what makes this flusher one host of a fleet —
    :class:`~sona_shm.fleet.member.FleetOptions` (any :class:`~sona_shm.engine.modes.ModeFactory`);
    None: the engine learns alone (:data:`~sona_shm.engine.modes.SOLO`).
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
        fleet: ModeFactory | None = None,
    ) -> None:
        self.name = name
        self.segment: Segment | None = None
        self.mode: Any = None  # the Mode, once started
        self.stop_requested = False
        self.flush_interval = check_timeout(flush_interval, "flush_interval")  # NaN would never flush, inf neither
        self.checkpoint_interval = check_timeout(checkpoint_interval, "checkpoint_interval")
        factory = fleet if fleet is not None else SOLO
        spec = EngineSpec.resolve(
            name, config=config, config_overrides=config_overrides, routes=routes, checkpoint=checkpoint, outbox=factory is not SOLO
        )
        self.checkpoint_path = spec.checkpoint_path
        opened = open_engine(spec, mode)
        self.segment, self.created, self.restored = opened.segment, opened.created, opened.restored
        try:
            self._setup(factory)
        except BaseException:
            self.close()
            raise

    def _mapped(self) -> Segment:
        """The segment, while this flusher has it mapped (it is None after :meth:`close`)."""
        if self.segment is None:
            raise ClosedError(f"flusher of segment {self.name!r} is closed")
        return self.segment

    def _setup(self, factory: ModeFactory) -> None:
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

        # The private state: one ledger record, with the learner's arrays as views into it.
        self._state = self.ledger.snapshot()
        st = self._state[0]
        self.routes = route_table_of(seg, st)
        self.learner = learner_over(self._state, layout.config, weights=factory.learner_publishes)
        self._learner_publishes = factory.learner_publishes
        self._mailbox = Mailbox(seg) if layout.max_routes else None
        self._tails = st["lane_tail"]
        self._committed_generation = int(st["generation"])
        self.buffer_head = int(st["buffer_head"])
        self.buffer_dropped = int(st["buffer_dropped"])
        self.corrupt = int(st["corrupt"])
        self._bad_heads: dict[int, int] = {}  # lane -> the corrupt head last counted
        self.last_flush_at = float(st["last_flush_at"])
        self._last_flush_mono = time.monotonic()
        u64, f64 = self._u64, self._f64
        self._seen_requests = [int(u64[w]) for w in self._ack_words]  # the last flush request of each lane taken in

        pid = os.getpid()
        fl = FLUSHER_WORDS
        u64[fl.pid] = pid
        u64[fl.start_ticks] = start_ticks(pid)
        f64[fl.started_at] = time.time()
        u64[fl.idle] = 0
        f64[fl.heartbeat] = time.time()
        log.info(
            "%s segment %r (pid %d): %s; %s; hot paths in %s",
            "created" if self.created else "adopted",
            self.name,
            pid,
            layout.config.describe(),
            layout.describe_size(),
            IMPLEMENTATION,
        )
        self._checkpointed_commit: int | None = None
        self._next_checkpoint = math.inf
        if self.checkpoint_path:
            if self.restored:
                log.info(
                    "restored %r from %s: generation %d, %d trajectories processed",
                    self.name,
                    self.checkpoint_path,
                    self._committed_generation,
                    self.learner.trajectories_processed,
                )
            elif not self.created:
                log.info("adopted %r keeps its own state (newer than any checkpoint); %s is not read", self.name, self.checkpoint_path)
            if self.checkpoint_interval > 0:
                self._next_checkpoint = time.monotonic() + self.checkpoint_interval
        self.mode = factory.start_mode(ModeContext(seg, self.ledger, self._state, self._tails, self.learner, self.routes))

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
        """One pass: take flush requests, let the mode bring in what it has, learn what every lane
        committed, flush if due, commit, answer requests. Returns the number learned."""
        u64, mode = self._u64, self.mode
        # Requests are read before heads: a producer stores its heads before its request,
        # so every record it made before asking is learned in this same pass.
        requests = []
        for lane, word in enumerate(self._req_words):
            request = u64[word]
            if request > self._seen_requests[lane]:
                self._seen_requests[lane] = request
                requests.append((lane, request, u64[self._head_words[lane]]))
        if requests:
            mode.take_requests(requests)
        mailbox = self._mailbox
        if mailbox is not None and mailbox.request > mailbox.answered:
            self._change_routes(mailbox)
        changed = mode.pump()
        learned = 0
        moved = False  # tails advance also past slots that fail their check: that must be committed too
        tails = self._tails
        slots_per_lane = self.layout.lane_slots
        for lane, word in enumerate(self._head_words):
            head = u64[word]
            tail = int(tails[lane])
            if head > tail + slots_per_lane or head < tail:
                self._corrupt_head(lane, head, tail)  # a producer publishes at most slots ahead of the committed tail
            elif head > tail:
                got, consumed = self._learn_lane(lane, tail, head)
                learned += got
                moved |= consumed
        flushed = False
        due = self.flush_interval > 0 and self.learner.pending and time.monotonic() - self._last_flush_mono >= self.flush_interval
        if mode.flush_due() or due:
            flushed = self._flush()
        if moved or flushed or changed:
            self._commit()
        for lane, request in mode.answered():
            u64[self._ack_words[lane]] = request  # after the commit: the requester now sees what it asked for
        u64[FLUSHER_WORDS.scans] += 1
        self._f64[FLUSHER_WORDS.heartbeat] = time.time()
        return learned

    def _change_routes(self, mailbox: Mailbox) -> None:
        """Apply the open route-change request (:mod:`sona_shm.engine.routes`): commit, then answer it."""
        request = mailbox.open_request()
        assert request is not None
        if not self._learner_publishes:  # a fleet host: its table is the fleet's
            mailbox.answer(request.id, False, 0, route_changes.FLEET_REFUSAL.format(name=self.name))
            return
        try:
            index, self.routes = route_changes.apply(request, self.learner, self._state[0], self._mapped())
        except InvalidInputError as exc:
            mailbox.answer(request.id, False, 0, str(exc))
            log.warning("route change %d (%s) refused: %s", request.id, request.op, exc)
            return
        self._commit()
        mailbox.answer(request.id, True, index, "")
        log.info(
            "route %d %r: %s (request %d) after %d trajectories",
            index,
            self.routes.names[index],
            {"add": "added", "rename": "renamed", "retire": "retired"}[request.op],
            request.id,
            self.learner.trajectories_processed,
        )

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
        """Learn the lane's slots ``[tail, head)`` as far as the mode lets windows open; the number
        learned, and whether the tail moved."""
        n_slots = self.layout.lane_slots
        self._bad_heads.pop(lane, None)
        learned = 0
        start = tail
        while start < head:
            first = start % n_slots
            count = min(head - start, n_slots - first)
            run = self._learn_run_c if _speedups is not None else self._learn_run_numpy
            got, consumed = run(lane, first, count, start)
            learned += got
            start += consumed
            if consumed < count:
                break  # the mode lets no new window open: the rest waits in the lane
        self._tails[lane] = start
        return learned, start > tail

    def _learn_run_c(self, lane: int, first: int, count: int, index: int) -> tuple[int, int]:
        """Learn ``count`` contiguous slots of ``lane`` from ring slot ``first`` (lane index ``index``) with the C
        learner, where they lie; the number learned and the slots consumed."""
        layout, learner, mode = self.layout, self.learner, self.mode
        flat = lane * layout.lane_slots + first
        learned = done = 0
        while done < count:
            if not mode.may_learn(learner.pending > 0):
                break
            block = self._slot_bytes[flat + done : flat + count]
            width, corrupt, consumed = learner.learn_slots(block, layout.geometry, index + done + 1, stop=mode.takes_windows)
            if learner.window_full:
                mode.on_window(learner.close_window())
            valid = np.ones(consumed, bool)
            valid[corrupt] = False
            learned += self._account_slots(lane, flat + done, valid, width, index + done)
            done += consumed
        return learned, done

    def _learn_run_numpy(self, lane: int, first: int, count: int, index: int) -> tuple[int, int]:
        """:meth:`_learn_run_c` with the numpy learner: the slots are checked and decoded once, then learned
        window by window (the same sums: the learner cuts its batches where a one-by-one replay would)."""
        layout, learner, mode = self.layout, self.learner, self.mode
        flat = lane * layout.lane_slots + first
        rec = self._slots[lane, first : first + count]
        ok = slots.check(rec, index + 1, layout, learner.routes_used)
        at_slot = np.flatnonzero(ok)  # the block position of every learnable row
        rows = slots.learning_rows(learner, rec[ok])
        n_steps = rec["n_steps"]
        learned = done = at = 0  # at: the next row
        while done < count:
            if not mode.may_learn(learner.pending > 0):
                break
            taken = learner.learn_rows(rows, at, stop=mode.takes_windows)
            if learner.window_full:
                mode.on_window(learner.close_window())
            end = count if at + taken == len(rows) else int(at_slot[at + taken - 1]) + 1  # a full window ends at its last signal
            part = ok[done:end]
            width = int(n_steps[done:end][part].max()) if part.any() else 0
            learned += self._account_slots(lane, flat + done, part, width, index + done)
            at += taken
            done = end
        return learned, done

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

    def _keep_in_buffer(self, flat_slot: int, count: int, width: int) -> None:
        """Copy learned slots into the buffer while it has room; count the rest as dropped."""
        capacity = self.layout.capacity
        room = capacity - (self.buffer_head - self._u64[CONSUMER_WORDS.tail])
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
        """A flush point: close the open window (if any, and if the mode lets it) and hand it to the mode."""
        self._last_flush_mono = time.monotonic()
        if not self.learner.pending or not self.mode.may_learn(True):
            return False
        self.mode.on_window(self.learner.close_window())
        return True

    def _commit(self) -> None:
        """Publish the private record: the learner's state, the mode's, the flusher's positions and counts."""
        st = self._state[0]
        store_learner(self._state, self.learner, weights=self._learner_publishes)
        generation = int(st["generation"])
        if generation != self._committed_generation:
            self.last_flush_at = time.time()  # the adapter changed (a flush, or windows from elsewhere)
            self._committed_generation = generation
        st["buffer_head"] = self.buffer_head
        st["buffer_dropped"] = self.buffer_dropped
        st["corrupt"] = self.corrupt
        st["last_flush_at"] = self.last_flush_at
        self.ledger.publish(self._state, self.mode.commit_points())

    def _has_work(self) -> bool:
        u64, tails, mode = self._u64, self._tails, self.mode
        if mode.has_news():
            return True
        # A lane's backlog is work only while learning may go on (a fleet host may be paused).
        learning = mode.may_learn(self.learner.pending > 0)
        for lane, word in enumerate(self._head_words):
            if (learning and u64[word] > tails[lane]) or u64[self._req_words[lane]] > self._seen_requests[lane]:
                return True
        return False

    def _sleep(self) -> None:
        u64, bell = self._u64, self._mapped().bell
        u64[FLUSHER_WORDS.idle] = 1  # from here on producers ring the bell
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
            u64[FLUSHER_WORDS.idle] = 0
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
        """Learn everything committed, close the open window and publish (used at shutdown); then let the
        mode finish what is in flight (a fleet host waits, bounded, for its windows to come back)."""
        self.scan()
        if self._flush():
            self._commit()
        self.mode.answered()

        def commit() -> None:
            self._commit()
            for lane, request in self.mode.answered():
                self._u64[self._ack_words[lane]] = request

        self.mode.finish(commit)
        self.mode.stop()

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
        mode = self.__dict__.get("mode")
        if mode is not None:
            mode.stop()  # a fleet's threads read the ledger: they end before it is unmapped
            self.mode = None
        for attr in ("_slots", "_slot_bytes", "_buffer_bytes", "_buffer_seq", "_state", "_tails", "learner"):
            self.__dict__.pop(attr, None)
        ledger = self.__dict__.pop("ledger", None)
        if ledger is not None:
            ledger.close()
        mailbox = self.__dict__.pop("_mailbox", None)
        if mailbox is not None:
            mailbox.close()
        self.__dict__.pop("_u64", None)
        self.__dict__.pop("_f64", None)
        if self.segment is not None:
            self.segment.close()
            self.segment = None
