"""Changing a running engine: its routes, whether it learns, its learned state — one request at a time, through the flusher.

:func:`ask` is what every such request goes through (``sona-shm routes add|rename|retire``,
``pause``, ``resume``, ``rollback``, and the client's methods of the same names). It checks
the request against the engine's committed record (bad input is refused before anything is
written), posts it into the segment's admin mailbox (:mod:`sona_shm.shm.admin`), rings the
doorbell and waits for the flusher's answer. With no flusher running it applies the request
itself, holding the flusher lock for the duration, with one ledger commit — as ``sona-shm
restore`` does.

:func:`apply` is what the flusher (and that path) does with a request: its learner and
ledger record change, the caller commits. What the requests do:

- a route change: :mod:`sona_shm.engine.routes`;
- ``pause``: learning stops (``paused`` in the ledger, so it outlives the flusher). The flusher
  keeps serving the adapter it published and keeps taking what producers commit — counted
  in ``trajectories_processed``, ``paused_skipped`` and per route, kept in the buffer for
  consumers — but learns none of it, ever: a paused engine's open window stays open and
  publishes nothing;
- ``resume``: learning goes on from the next trajectory committed;
- ``rollback``: the learned state (the adapter, the route table's learned vectors and biases,
  the open window and the counters that schedule it) becomes a checkpoint's of this engine
  (:meth:`~sona_shm.store.checkpoint.Checkpoint.roll_back`), in one commit between two scans,
  while producers keep recording: lane positions are the engine's, so what was committed and
  not yet learned is learned on top of it, and nothing taken in before it is taken in again.
  What the engine observed — ``trajectories_processed``, ``corrupt``, the per-route feedback
  counts — goes on counting; ``rollbacks`` and ``rolled_back_signals`` say what was discarded.

A host of a fleet refuses all of them: every host must apply the same windows, so one host
can neither change the table they learn, nor stop learning while it still applies the
other hosts' windows, nor replace the state every replica shares.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import check_timeout
from ..errors import CheckpointError, FlusherTimeoutError, InvalidInputError
from ..learn.learner import Learner
from ..learn.routes import RouteTable
from ..shm.admin import OPERATIONS, ROUTE_OPERATIONS, Mailbox, Reply, Request
from ..shm.layout import ADMIN_PATH_BYTES, LEARNING, LOCK_ADMIN, LOCK_FLUSHER, PAUSED_BY_REQUEST, given_vectors
from ..shm.ledger import LEARNER_COUNTERS, Ledger, learner_over, route_table_of, store_learner
from ..shm.segment import Segment, wait_until
from ..store.checkpoint import Checkpoint, read_checkpoint
from . import routes as route_changes

#: Seconds a request waits for the flusher's answer (and for another request to finish) unless told otherwise.
DEFAULT_TIMEOUT = 10.0
#: The admin lock is per open file description: threads of one process take turns here first.
_local = threading.Lock()

FLEET_REFUSAL = (
    "{op}: engine {name!r} is a host of a fleet, and every host must apply the same windows: one host can neither "
    "{what}. Do it on a fleet of its own (checkpoint, destroy, start the flusher with --checkpoint and without --fleet)"
)
_FLEET_WHAT = {
    "routes": "change the route table the fleet learns",
    "pause": "pause (it would still apply the other hosts' windows) nor roll back (its replica would differ from the others)",
    "resume": "pause nor resume learning alone",
    "rollback": "roll back (its replica would differ from the others) nor pause (it would still apply the other hosts' windows)",
}


def fleet_refusal(op: str, name: str) -> str:
    """Why a host of a fleet refuses ``op`` (the error the requester gets)."""
    kind = "routes" if op in ROUTE_OPERATIONS else op
    return FLEET_REFUSAL.format(op=f"routes {op}" if kind == "routes" else op, name=name, what=_FLEET_WHAT[kind])


@dataclass(frozen=True)
class Posted:
    """A request checked against the committed record, ready to post: the mailbox's fields."""

    route: int = -1
    name: str = ""
    vector: np.ndarray | None = None
    path: str = ""


def ask(segment: Segment, op: str, check: Callable[[np.void], Posted], *, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Post request ``op`` to the engine of ``segment`` (mapped writable) and wait for the answer.

    ``check(record)``: validates the request against the engine's committed ledger record and
    returns its fields (raising names what is wrong; nothing is written then). With no flusher
    running the request is applied here, under the flusher lock. Raises
    :class:`InvalidInputError` (or :class:`CheckpointError`) if it is refused, and
    :class:`FlusherTimeoutError` if the flusher does not answer within ``timeout`` (the
    request stays asked for: the flusher applies it when it gets to it).
    """
    if op not in OPERATIONS:
        raise InvalidInputError(f"op: expected one of {sorted(OPERATIONS)}, got {op!r}")
    timeout = check_timeout(timeout, "timeout")
    what = f"routes {op}" if op in ROUTE_OPERATIONS else op
    deadline = time.monotonic() + timeout
    if not _local.acquire(timeout=timeout):
        raise FlusherTimeoutError(f"{what}: another request of this process to the engine did not finish within {timeout:g} s")
    try:
        if not wait_until(lambda: segment.try_lock(LOCK_ADMIN), timeout):
            raise FlusherTimeoutError(f"{what}: another request to engine {segment.name!r} did not finish within {timeout:g} s")
        mailbox = Mailbox(segment)
        try:
            if mailbox.request != mailbox.answered:
                raise FlusherTimeoutError(
                    f"{what}: engine {segment.name!r} has a request its flusher has not answered yet (request "
                    f"{mailbox.request}); start the flusher, or wait for it, and try again"
                )
            ledger = Ledger(segment)
            try:
                record = ledger.snapshot()[0]
                if record["fleet_epoch"]:
                    raise InvalidInputError(fleet_refusal(op, segment.name))
                posted = check(record)
                request = mailbox.post(op, posted.route, posted.name, posted.vector, posted.path)
                if segment.try_lock(LOCK_FLUSHER):  # no flusher runs: apply it here
                    try:
                        return _apply_offline(segment, ledger, mailbox)
                    finally:
                        segment.unlock(LOCK_FLUSHER)
            finally:
                ledger.close()
            segment.ring()
            remaining = max(0.0, deadline - time.monotonic())
            if not wait_until(lambda: mailbox.answered >= request, remaining, max_delay=0.01):
                raise FlusherTimeoutError(
                    f"{what}: the flusher of engine {segment.name!r} did not answer within {timeout:g} s; "
                    "the request stays asked for and is applied when it gets to it"
                )
            reply = mailbox.reply()
            if not reply.done:
                raise _refusal(op, reply.message)
            return reply
        finally:
            mailbox.close()
            segment.unlock(LOCK_ADMIN)
    finally:
        _local.release()


def _refusal(op: str, message: str) -> Exception:
    """The error a refused request raises: a checkpoint that cannot be rolled back to is a :class:`CheckpointError`."""
    return CheckpointError(message) if op == "rollback" and message.startswith("checkpoint ") else InvalidInputError(message)


# ----------------------------------------------------------------- the requests


def pause(segment: Segment, *, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Stop learning (see the module docstring); done at once if it is paused already."""
    return ask(segment, "pause", lambda record: Posted(), timeout=timeout)


def resume(segment: Segment, *, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Learn again from the next trajectory committed; done at once if it is learning."""
    return ask(segment, "resume", lambda record: Posted(), timeout=timeout)


def rollback(segment: Segment, path: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Replace the engine's learned state by the checkpoint at ``path`` (one of this engine's); the reply says the
    new weights generation and the signals whose learning was discarded.

    The file is read and checked whole here first (:class:`CheckpointError`, nothing changed, for one that is
    unreadable, corrupt, of another engine or that does not fit it); the flusher reads and checks it again."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InvalidInputError(f"to: expected the path of a checkpoint file, got {path!r}")
    absolute = os.path.abspath(os.fspath(path))
    if len(absolute.encode("utf-8", "surrogateescape")) >= ADMIN_PATH_BYTES:
        raise InvalidInputError(f"to: expected a path of fewer than {ADMIN_PATH_BYTES} bytes, got {len(absolute.encode())} bytes")

    def check(record: np.void) -> Posted:
        try:
            checked_rollback(read_checkpoint(absolute), record, segment, absolute)
        except CheckpointError as exc:  # the message names the argument, what it takes and what it got
            raise CheckpointError(f"to: expected a checkpoint file of engine {segment.name!r}, got {exc}") from None
        return Posted(path=absolute)

    return ask(segment, "rollback", check, timeout=timeout)


def checked_rollback(checkpoint: Checkpoint, record: np.void, segment: Segment, path: str) -> Checkpoint:
    """``checkpoint`` if the engine of ``segment`` (its committed ``record``) may roll back to it, else raise
    :class:`CheckpointError` naming ``path`` and why."""
    where = f"checkpoint {path}"
    checkpoint.check_fits(segment.layout, where, route_table_of(segment, record))
    ours = int(record["engine_id"])
    if not checkpoint.engine_id:
        raise CheckpointError(
            f"{where}: it carries no engine id (written by an older sona_shm), so it may be another engine's; nothing restored. "
            f"Restore it with `sona-shm restore --name {segment.name} --from {path}` while the flusher is stopped"
        )
    if checkpoint.engine_id != ours:
        raise CheckpointError(
            f"{where}: written by another engine (engine id {checkpoint.engine_id:016x}, engine {segment.name!r} is "
            f"{ours:016x}); nothing restored. A rollback takes only this engine's checkpoints (`sona-shm checkpoints "
            f"--name {segment.name}` lists them); `sona-shm restore` replaces the state by any that fits"
        )
    return checkpoint


# ----------------------------------------------------------------- applying a request (the flusher, or a caller holding its lock)


@dataclass(frozen=True)
class Applied:
    """What applying a request did: the route's ``index`` and the new ``table`` (route changes), the signals a
    rollback ``discarded`` and the checkpoint it restored."""

    index: int = 0
    table: RouteTable | None = None
    discarded: int = 0
    checkpoint: Checkpoint | None = None


def apply(request: Request, learner: Learner, record: np.void, segment: Segment, *, now: float | None = None) -> Applied:
    """Apply ``request`` to ``learner`` and its ledger ``record`` (not committed); raise :class:`InvalidInputError`
    or :class:`CheckpointError` (nothing changed) for a request the committed record refuses.

    With ``record["admin_request"] >= request.id`` it was applied already (by a flusher killed before it
    answered): nothing changes, and the answer is the one it had.
    """
    now = time.time() if now is None else now
    if request.op in ROUTE_OPERATIONS:
        index, table = route_changes.apply(request, learner, record, segment)
        return Applied(index, table)
    if int(record["admin_request"]) >= request.id:
        return Applied()
    if request.op == "pause":
        if int(record["paused"]) == LEARNING:
            set_paused(record, PAUSED_BY_REQUEST, now)
    elif request.op == "resume":
        record["paused"] = LEARNING
    elif request.op == "rollback":
        checkpoint = checked_rollback(read_checkpoint(request.path), record, segment, request.path)
        discarded = roll_back(checkpoint, learner, record, segment, now)
        record["admin_request"] = request.id
        return Applied(discarded=discarded, checkpoint=checkpoint)
    else:
        raise InvalidInputError(f"admin: unknown operation in the mailbox ({request.op!r}); the segment was written outside sona_shm")
    record["admin_request"] = request.id
    return Applied()


def set_paused(record: np.void, why: int, now: float) -> None:
    """Pause learning in ``record`` (``why``: by a request, or by the guard)."""
    record["paused"] = why
    record["paused_at"] = now
    record["pauses"] += 1


def roll_back(checkpoint: Checkpoint, learner: Learner, record: np.void, segment: Segment, now: float) -> int:
    """Replace the learned state of ``learner`` and its ``record`` by ``checkpoint``'s (checked); the signals discarded.

    The weights generation becomes ``max(engine's, file's) + 1``, so every worker reloads. The learner's arrays are
    views into the record, so they change with it; its counters are read back from it.
    """
    for name in (*LEARNER_COUNTERS, "generation"):  # the learner's counters as they are now (the record has them at commits)
        record[name] = getattr(learner, name)
    generation = max(int(record["generation"]), checkpoint.generation) + 1
    discarded = checkpoint.roll_back(record, generation, given_vectors(segment.numpy_buffer(), segment.layout))
    for name in (*LEARNER_COUNTERS, "generation"):
        setattr(learner, name, int(record[name]))
    record["rollbacks"] += 1
    record["rolled_back_signals"] += discarded
    record["last_rollback_at"] = now
    record["rollback_checkpoint_at"] = checkpoint.written_at
    record["last_flush_at"] = now  # the published adapter changed
    return discarded


def _apply_offline(segment: Segment, ledger: Ledger, mailbox: Mailbox) -> Reply:
    """Apply the open request with no flusher running (the caller holds the flusher lock): one commit, then the answer."""
    request = mailbox.open_request()
    assert request is not None
    state = ledger.snapshot()
    learner = learner_over(state, segment.layout.config, weights=True)
    try:
        applied = apply(request, learner, state[0], segment)
    except (InvalidInputError, CheckpointError) as exc:
        mailbox.answer(request.id, False, message=str(exc))
        raise
    store_learner(state, learner, weights=True)
    ledger.publish(state)
    mailbox.answer(request.id, True, applied.index, "", int(state[0]["generation"]), applied.discarded)
    return mailbox.reply()
