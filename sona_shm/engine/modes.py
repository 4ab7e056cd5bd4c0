"""A flusher's mode: what it does besides learning, at fixed points of its loop.

The flusher (:mod:`sona_shm.engine.flusher`) has one learning loop; what happens to a
closed window, when a producer's flush request is answered and what else a scan brings
in is its mode's business. :class:`Solo` is an engine alone: it applies its own windows
and answers a request in the scan that learned it. A fleet host
(:class:`sona_shm.fleet.member.FleetMode`) seals its windows for every host to apply
and answers a request once its windows came back from the fleet's stream.

The flusher calls its mode at these points, in this order, on every scan:

1. :meth:`Mode.take_requests`: the producers' flush requests read this scan, each with
   its lane's head at the time (every record before it is to be learned first).
2. :meth:`Mode.pump`: what the mode brought in meanwhile (a fleet: stream entries and
   snapshots); True if the record changed.
3. Learning, lane by lane: :meth:`Mode.may_learn` before a window opens (or goes on);
   :meth:`Mode.on_window` with each window the learner closed — a mode that
   :attr:`~Mode.takes_windows` gets every one, else the learner applies its threshold
   windows itself and only flush points close one here.
4. :meth:`Mode.flush_due`: a flush point the mode asks for.
5. The commit, if anything changed: :meth:`Mode.commit_points` names what it does (for the
   test-only pause hook of :mod:`sona_shm.shm.ledger`).
6. :meth:`Mode.answered`: the flush requests answered now (the flusher stores their acks).

When idle the flusher sleeps unless :meth:`Mode.has_news`; at shutdown it calls
:meth:`Mode.finish` (with its commit) and :meth:`Mode.stop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import FleetError
from ..learn.learner import Learner, Window
from ..learn.routes import RouteTable
from ..shm.ledger import Ledger
from ..shm.segment import Segment


@dataclass(frozen=True)
class ModeContext:
    """What a mode is started with.

    ``record``: the flusher's private ledger record, which it commits; a mode writes only the
    fields it owns there (a fleet's: its ``fleet_`` fields, and the published adapter when the
    learner does not publish its own). ``tails``: the lanes' learned tails (a read-only view
    the flusher keeps current). ``learner``: the flusher's learner (a mode changes it only
    through its methods: ``apply``, ``set_weights``).
    """

    segment: Segment
    ledger: Ledger
    record: np.ndarray
    tails: np.ndarray
    learner: Learner
    routes: RouteTable | None


class Mode(Protocol):
    """What the flusher calls (see the module docstring for when)."""

    #: Every closed window goes to :meth:`on_window` (the learner never applies one itself).
    takes_windows: bool

    def take_requests(self, requests: list[tuple[int, int, int]]) -> None:
        """New flush requests: ``(lane, request, the lane's head when it was read)``."""

    def pump(self) -> bool:
        """Apply what arrived from outside the loop; True if the record changed (commit it)."""

    def may_learn(self, window_open: bool) -> bool:
        """Whether learning may go on: open a new window (``window_open`` False) or fill the open one."""

    def on_window(self, window: Window) -> None:
        """A window the learner closed."""

    def flush_due(self) -> bool:
        """Whether this scan must close the open window (a flush point the mode asks for)."""

    def commit_points(self) -> tuple[str, ...]:
        """What the commit being made does (``seal``, ``apply``), for the test-only pause hook."""

    def answered(self) -> list[tuple[int, int]]:
        """After this scan's commit: the flush requests answered now, ``(lane, request)``."""

    def has_news(self) -> bool:
        """Something to do although no lane has work."""

    def finish(self, commit: Callable[[], None]) -> None:
        """At shutdown, after the last flush: wait (bounded) for what is in flight; ``commit`` commits the record."""

    def stop(self) -> None:
        """Release what the mode holds (threads, connections). Safe to call twice."""


class ModeFactory(Protocol):
    """What starts a mode: :data:`SOLO`, or a fleet's :class:`~sona_shm.fleet.member.FleetOptions`."""

    #: The learner's weights are the engine's published adapter (else the mode publishes one).
    learner_publishes: bool

    def start_mode(self, context: ModeContext) -> Mode: ...


class Solo:
    """An engine alone: its learner applies every window (the seed's flush) and publishes the weights."""

    takes_windows = False

    def __init__(self, context: ModeContext) -> None:
        self.learner = context.learner
        self._requests: list[tuple[int, int]] = []
        # A segment bound to a fleet may be opened (and checkpointed, destroyed), but not learned alone.
        self._fleet_replica = bool(context.record[0]["fleet_epoch"])
        self._name = context.segment.name

    def take_requests(self, requests: list[tuple[int, int, int]]) -> None:
        # Answered by this scan's commit: the flusher learns every lane up to its head in the same scan.
        self._requests.extend((lane, request) for lane, request, _ in requests)

    def pump(self) -> bool:
        if self._fleet_replica:
            raise FleetError(
                f"segment {self._name!r} is a replica of a fleet: its adapter changes only through the fleet's stream, and its "
                f"outbox may hold windows not yet published. Start its flusher with --fleet (the same --fleet-key and --host-id), "
                f"or checkpoint it, destroy it and restore the checkpoint into a new engine to learn alone"
            )
        return False

    def may_learn(self, window_open: bool) -> bool:
        return True

    def on_window(self, window: Window) -> None:
        self.learner.apply(window)

    def flush_due(self) -> bool:
        return bool(self._requests)

    def commit_points(self) -> tuple[str, ...]:
        return ()

    def answered(self) -> list[tuple[int, int]]:
        answered, self._requests = self._requests, []
        return answered

    def has_news(self) -> bool:
        return False

    def finish(self, commit: Callable[[], None]) -> None:
        pass

    def stop(self) -> None:
        pass


class _SoloFactory:
    learner_publishes = True

    def start_mode(self, context: ModeContext) -> Mode:
        return Solo(context)


#: The mode of an engine that is not part of a fleet.
SOLO: ModeFactory = _SoloFactory()
