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

from ..checks import check_int, check_timeout
from ..config import EngineConfig
from ..errors import CheckpointError, ClosedError, FleetError, InvalidInputError
from ..learn.routes import RouteTable
from ..native import IMPLEMENTATION
from ..native import speedups as _speedups
from ..shm import segment as segment_module
from ..shm import slots
from ..shm.admin import ROUTE_OPERATIONS, Mailbox, Settings, write_settings
from ..shm.layout import ADMIN_PATH_BYTES, CONSUMER_WORDS, FLUSHER_WORDS, PAUSED_BY_GUARD
from ..shm.ledger import Ledger, learner_over, route_table_of, store_learner
from ..shm.segment import DEFAULT_MODE, Segment, start_ticks
from ..store import history
from ..store.checkpoint import Checkpoint, read_checkpoint
from . import admin
from .guard import DEFAULT_WINDOW, GuardOptions, MovingReward
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

    ``checkpoint_keep``: keep the last K checkpoints, timestamped, beside ``checkpoint``
    (:mod:`sona_shm.store.history`; 0: the file alone). ``guard``: the reward guard
    (:mod:`sona_shm.engine.guard`; it needs a route table, ``checkpoint`` and
    ``checkpoint_keep``, and no fleet). ``moving_window``: the feedbacks of the moving
    reward without a guard (the guard's window otherwise).

    Learning can be paused, resumed and rolled back while it runs, through the admin
    mailbox (:mod:`sona_shm.engine.admin`); a paused engine takes what producers commit,
    counts it and keeps it for consumers, and learns none of it.
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
        checkpoint_keep: int = 0,
        guard: GuardOptions | None = None,
        moving_window: int = DEFAULT_WINDOW,
    ) -> None:
        self.name = name
        self.segment: Segment | None = None
        self.mode: Any = None  # the Mode, once started
        self.stop_requested = False
        self.flush_interval = check_timeout(flush_interval, "flush_interval")  # NaN would never flush, inf neither
        self.checkpoint_interval = check_timeout(checkpoint_interval, "checkpoint_interval")
        self.checkpoint_keep = check_int("checkpoint_keep", checkpoint_keep, 0, history.MAX_KEEP)
        factory = fleet if fleet is not None else SOLO
        _check_safety_options(checkpoint, self.checkpoint_keep, guard, factory is not SOLO)
        self.guard = guard
        self.moving_window = guard.window if guard is not None else check_int("moving_window", moving_window, 1, 10_000_000)
        spec = EngineSpec.resolve(
            name, config=config, config_overrides=config_overrides, routes=routes, checkpoint=checkpoint, outbox=factory is not SOLO
        )
        self.checkpoint_path = os.path.abspath(spec.checkpoint_path) if spec.checkpoint_path else None
        opened = open_engine(spec, mode)
        self.segment, self.created, self.restored = opened.segment, opened.created, opened.restored
        try:
            if guard is not None and not self.segment.layout.max_routes:
                raise InvalidInputError(
                    f"--guard-reward: engine {name!r} has no route table, so no feedback names the route taken and there is no "
                    "reward to guard; create it with --routes FILE"
                )
            self._setup(factory)
        except BaseException:
            created = self.created
            self.close()
            if created:
                segment_module.unlink(name)  # made for nothing: this flusher refused to run it
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
        self._mailbox = Mailbox(seg)
        self.paused = int(st["paused"])
        if self.paused and factory is not SOLO:
            raise FleetError(
                f"engine {self.name!r} is paused, and a host of a fleet cannot be (it would still apply the other hosts' "
                f"windows): resume it first (`sona-shm resume --name {self.name}`, no flusher running), then start it with --fleet"
            )
        self.moving = MovingReward(self.moving_window)
        self.moving.reset(*self._feedback_totals())
        self._batch = self.guard.batch if self.guard is not None else layout.lane_slots
        self._checkpoint_due = False  # write one after the next commit (learning paused, resumed, rolled back)
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
        guard = self.guard
        write_settings(
            seg,
            Settings(
                self.checkpoint_path or "",
                self.checkpoint_keep,
                self.checkpoint_interval,
                guard.drop if guard else 0.0,
                self.moving_window,
                bool(guard and guard.rollback),
                pid,
            ),
        )
        if self.paused:
            log.warning(
                "learning is paused (%s, since %s): what producers commit is counted and kept, not learned; "
                "`sona-shm resume --name %s` learns again",
                "by the reward guard" if self.paused == PAUSED_BY_GUARD else "by a request",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(st["paused_at"]))),
                self.name,
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
        if mailbox.request > mailbox.answered:
            self._admin(mailbox)
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
        due = (
            self.flush_interval > 0
            and self.learner.pending
            and not self.paused
            and time.monotonic() - self._last_flush_mono >= self.flush_interval
        )
        if mode.flush_due() or due:
            flushed = self._flush()
        if moved or flushed or changed:
            self._commit()
        for lane, request in mode.answered():
            u64[self._ack_words[lane]] = request  # after the commit: the requester now sees what it asked for
        if self._checkpoint_due:
            self._transition_checkpoint()
        u64[FLUSHER_WORDS.scans] += 1
        self._f64[FLUSHER_WORDS.heartbeat] = time.time()
        return learned

    def _admin(self, mailbox: Mailbox) -> None:
        """Apply the open admin request (:mod:`sona_shm.engine.admin`): commit, then answer it."""
        request = mailbox.open_request()
        assert request is not None
        if not self._learner_publishes:  # a fleet host: its table and its state are the fleet's
            mailbox.answer(request.id, False, message=admin.fleet_refusal(request.op, self.name))
            return
        st = self._state[0]
        was_paused, processed = self.paused, self.learner.trajectories_processed
        try:
            applied = admin.apply(request, self.learner, st, self._mapped())
        except (InvalidInputError, CheckpointError) as exc:
            mailbox.answer(request.id, False, message=str(exc))
            log.warning("admin request %d (%s) refused: %s", request.id, request.op, exc)
            return
        if applied.table is not None:
            self.routes = applied.table
        self.paused = int(st["paused"])
        if request.op in ("resume", "rollback"):
            self.moving.reset(*self._feedback_totals())  # another policy from here on: measure it afresh
        self._commit()
        mailbox.answer(request.id, True, applied.index, "", int(st["generation"]), applied.discarded)
        if request.op in ROUTE_OPERATIONS:
            log.info(
                "route %d %r: %s (request %d) after %d trajectories",
                applied.index,
                self.routes.names[applied.index] if self.routes is not None else "?",
                {"add": "added", "rename": "renamed", "retire": "retired"}[request.op],
                request.id,
                processed,
            )
            return
        if request.op == "pause":
            log.warning(
                "learning paused (request %d) after %d trajectories%s", request.id, processed, " (it was already)" if was_paused else ""
            )
        elif request.op == "resume":
            log.warning(
                "learning resumed (request %d) after %d trajectories; %d taken in while paused (ever) were not learned",
                request.id,
                processed,
                int(st["paused_skipped"]),
            )
        elif applied.checkpoint is not None:
            self._log_rollback(f"request {request.id}", request.path, applied.checkpoint, applied.discarded, processed)
        self._checkpoint_due = True

    def _log_rollback(self, why: str, path: str, checkpoint: Checkpoint, discarded: int, processed: int) -> None:
        log.warning(
            "rolled back to checkpoint %s (written at %s, generation %d) (%s) after %d trajectories: discarded the learning of "
            "%d signals; weights generation %d",
            path,
            history.stamp(checkpoint.written_at) if checkpoint.written_at else "?",
            checkpoint.generation,
            why,
            processed,
            discarded,
            self.learner.generation,
        )

    def _feedback_totals(self) -> tuple[int, float]:
        """Feedbacks naming the route taken, ever, and their summed reward (the moving reward's running totals)."""
        used = self.learner.routes_used
        if not used:
            return 0, 0.0
        return int(self.learner.route_chosen[:used].sum()), float(self.learner.route_reward[:used].sum())

    def _watch(self) -> None:
        """After a batch: update the moving reward; the guard pauses learning if it fell more than DROP below its level."""
        self.moving.observe(*self._feedback_totals())
        guard = self.guard
        if guard is None or self.paused:
            return
        st = self._state[0]
        level = float(st["guard_level"]) if st["guard_checkpoint_at"] > 0 else None
        if guard.tripped(self.moving.mean, level):
            self._trip(float(self.moving.mean or 0.0), float(level or 0.0))

    def _trip(self, moving: float, level: float) -> None:
        """The reward guard pauses learning (and, with ``--guard-rollback``, rolls back to the last good checkpoint)."""
        guard = self.guard
        assert guard is not None and self.checkpoint_path
        st = self._state[0]
        now = time.time()
        admin.set_paused(st, PAUSED_BY_GUARD, now)
        st["guard_trips"] += 1
        self.paused = PAUSED_BY_GUARD
        self._checkpoint_due = True
        good_at = float(st["guard_checkpoint_at"])
        processed = self.learner.trajectories_processed
        log.error(
            "reward guard: the moving reward of the last %d feedbacks is %.4f, more than %g below %.4f at the last good "
            "checkpoint (written at %s); learning paused after %d trajectories (`sona-shm resume --name %s` learns again)",
            self.moving.feedbacks,
            moving,
            guard.drop,
            level,
            history.stamp(good_at),
            processed,
            self.name,
        )
        if not guard.rollback:
            return
        path = history.find(self.checkpoint_path, good_at)
        if path is None:
            log.error("reward guard: the last good checkpoint (written at %s) is no longer there; not rolled back", history.stamp(good_at))
            return
        try:
            checkpoint = admin.checked_rollback(read_checkpoint(path), st, self._mapped(), path)
            discarded = admin.roll_back(checkpoint, self.learner, st, self._mapped(), now)
        except CheckpointError as exc:
            log.error("reward guard: cannot roll back (%s); learning stays paused", exc)
            return
        self.moving.reset(*self._feedback_totals())
        self._log_rollback("the reward guard", path, checkpoint, discarded, processed)

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
            count = min(head - start, n_slots - first, self._batch)  # the guard looks at the reward between batches
            if self.paused:
                got, consumed = self._skip_run(lane, first, count, start)
            else:
                run = self._learn_run_c if _speedups is not None else self._learn_run_numpy
                got, consumed = run(lane, first, count, start)
            learned += got
            start += consumed
            self._watch()
            if consumed < count:
                break  # the mode lets no new window open: the rest waits in the lane
        self._tails[lane] = start
        return learned, start > tail

    def _skip_run(self, lane: int, first: int, count: int, index: int) -> tuple[int, int]:
        """Learning is paused: take ``count`` slots of ``lane`` from ring slot ``first`` (lane index ``index``) without
        learning them — checked (corrupt ones counted), counted as processed, as skipped and per route, and kept in the
        buffer for consumers. The number taken in (not learned), and the slots consumed (all)."""
        layout, learner = self.layout, self.learner
        rec = self._slots[lane, first : first + count]
        ok = slots.check(rec, index + 1, layout, learner.routes_used)
        good = rec[ok]
        learner.count_routes(good["route_index"].astype(np.int64) - 1, good["best_index"].astype(np.int64) - 1, good["quality"])
        width = int(rec["n_steps"][ok].max()) if ok.any() else 0
        taken = self._account_slots(lane, lane * layout.lane_slots + first, ok, width, index)
        learner.trajectories_processed += taken
        self._state[0]["paused_skipped"] += taken
        return taken, count

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
        """A flush point: close the open window (if any, and if the mode lets it) and hand it to the mode. A paused
        engine publishes nothing: its open window stays open until learning resumes."""
        self._last_flush_mono = time.monotonic()
        if not self.learner.pending or self.paused or not self.mode.may_learn(True):
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
        mean = self.moving.partial
        st["moving_reward"] = 0.0 if mean is None else mean
        st["moving_feedbacks"] = self.moving.feedbacks
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
            if self.flush_interval > 0 and self.learner.pending and not self.paused:
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
        """Write the committed state to :attr:`checkpoint_path` (into its history with ``checkpoint_keep``); False if
        unchanged since the last write.

        A checkpoint written while learning, with the moving reward known and not below the guard's threshold, is
        *good*: with a guard, the moving reward then becomes its level (committed with the time of the file).
        """
        if not self.checkpoint_path:
            raise InvalidInputError("checkpoint: this flusher was started without a checkpoint path")
        record = self.ledger.snapshot()
        commit = self.ledger.commit  # we are the only writer, so this is the commit of the snapshot
        if commit == self._checkpointed_commit:
            return False
        st = record[0]
        known = int(st["moving_feedbacks"]) >= self.moving_window
        moving = float(st["moving_reward"]) if known else None
        checkpoint = Checkpoint.from_record(st, self.layout.config, self.routes, moving_reward=moving)
        good_at = float(st["guard_checkpoint_at"])
        protect = history.find(self.checkpoint_path, good_at) if good_at > 0 else None
        written = history.write(self.checkpoint_path, checkpoint, self._mapped().mode, self.checkpoint_keep, protect)
        self._checkpointed_commit = commit
        guard = self.guard
        level = float(st["guard_level"]) if good_at > 0 else None
        if guard is not None and not st["paused"] and moving is not None and not guard.tripped(moving, level):
            ours = self._state[0]
            ours["guard_level"] = moving
            ours["guard_checkpoint_at"] = checkpoint.written_at
            self._commit()
            self._checkpointed_commit = self.ledger.commit  # the file holds everything but the guard's note of it
            log.info("checkpoint written to %s: good, moving reward %.4f (the guard's level now)", written, moving)
        else:
            log.info("checkpoint written to %s", written)
        return True

    def _periodic_checkpoint(self) -> None:
        self._next_checkpoint = time.monotonic() + self.checkpoint_interval
        if self.paused:
            return  # nothing is learned: the state a checkpoint would keep was kept when learning paused
        try:
            self.write_checkpoint()
        except CheckpointError as exc:
            # A full disk must not stop the learning: say so and try again next interval.
            log.error("%s; learning goes on, next attempt in %g s", exc, self.checkpoint_interval)

    def _transition_checkpoint(self) -> None:
        """Learning paused, resumed or rolled back: the checkpoint file says so at once (a new engine made from it
        after a reboot is paused, or rolled back, too)."""
        self._checkpoint_due = False
        if not self.checkpoint_path:
            return
        try:
            self.write_checkpoint()
        except CheckpointError as exc:
            log.error("%s; the next checkpoint is written at the next interval", exc)

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
            if self.checkpoint_path:
                self.write_checkpoint()
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


def _check_safety_options(checkpoint: str | None, keep: int, guard: GuardOptions | None, fleet: bool) -> None:
    """Refuse options that do not go together, before anything is created."""
    if checkpoint is not None and len(os.path.abspath(checkpoint).encode("utf-8", "surrogateescape")) >= ADMIN_PATH_BYTES:
        raise InvalidInputError(f"--checkpoint: expected a path of fewer than {ADMIN_PATH_BYTES} bytes, got {checkpoint!r}")
    if keep and checkpoint is None:
        raise InvalidInputError(f"--checkpoint-keep: needs --checkpoint PATH (the kept files go beside it), got {keep}")
    if guard is None:
        return
    if fleet:
        raise InvalidInputError(
            "--guard-reward: not with --fleet; every host must apply the same windows, so one host cannot pause or roll back"
        )
    if checkpoint is None or not keep:
        raise InvalidInputError(
            "--guard-reward: needs --checkpoint PATH and --checkpoint-keep K (the guard compares the moving reward with its "
            "level at the last good checkpoint, and the history keeps that checkpoint)"
        )
