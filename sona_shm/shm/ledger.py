"""The flusher's state in shared memory, published whole by one word (a seqcount latch).

Layout and protocol are in :mod:`sona_shm.shm.layout` ("Ledger copy"). In short: two copies,
the flusher writes the one not current and then stores ``commit + 1``; readers read
``commit``, the copy ``commit & 1``, then ``commit`` again. No reader ever waits for the
writer and a writer killed at any instant leaves the current copy intact.
"""

from __future__ import annotations

import os
import signal

import numpy as np

from ..config import EngineConfig
from ..errors import InvalidInputError, LayoutMismatchError, TornRead
from ..learn.learner import STATE_ARRAYS, Learner
from ..learn.routes import RouteTable
from .layout import COMMIT_WORD, given_vectors
from .segment import Segment

#: Reader retries before giving up on a consistent read. A retry means the flusher
#: committed while we copied a few KiB; it commits at most once per scan of the lanes.
READ_RETRIES = 1000


#: Test-only fault hook: with ``SONA_SHM_TEST_PAUSE=publish`` in its environment a process
#: stops itself (SIGSTOP) in its first :meth:`Ledger.publish`, after writing the inactive
#: copy and before the commit store, so a test can SIGKILL it exactly mid-publish. With
#: ``seal`` (or ``apply``) it stops so in the first publish whose caller names that point: a
#: fleet flusher's first commit that seals a window (applies stream entries).
_PAUSE_AT = os.environ.get("SONA_SHM_TEST_PAUSE", "")


class Ledger:
    """Views over the two ledger copies of ``segment`` and the latch protocol."""

    def __init__(self, segment: Segment) -> None:
        layout = segment.layout
        self._u64 = segment.u64
        self._commit = COMMIT_WORD
        self.copies = np.ndarray((2,), dtype=layout.ledger_dtype, buffer=segment.numpy_buffer(), offset=layout.ledger_offset)
        # Word indexes of fields the hot paths read one at a time.
        self._generation = layout.generation_words
        self._tail = layout.lane_tail_words
        names = layout.ledger_dtype.names
        assert names is not None  # a structured dtype
        # Field views of each copy, made once: a read must be short to fit between commits.
        # Scalars stay shape-(1,) views (indexing one would copy it); arrays drop that axis.
        dtype = layout.ledger_dtype
        self._scalars = frozenset(n for n in names if dtype[n].shape == ())
        self._fields = [{n: (v if n in self._scalars else v[0]) for n in names for v in [self.copies[i : i + 1][n]]} for i in (0, 1)]

    @property
    def commit(self) -> int:
        return self._u64[self._commit]

    def generation(self) -> tuple[int, int]:
        """``(generation, commit)`` of the current copy, read consistently."""
        u64, c_idx, gen = self._u64, self._commit, self._generation
        for _ in range(READ_RETRIES):
            c = u64[c_idx]
            g = u64[gen[c & 1]]
            if u64[c_idx] == c:
                return g, c
        raise TornRead("ledger generation")

    def lane_tail(self, lane: int) -> int:
        """Slots of ``lane`` learned and committed: the producer may reuse slots below it."""
        u64, c_idx, tail = self._u64, self._commit, self._tail
        for _ in range(READ_RETRIES):
            c = u64[c_idx]
            t = u64[tail[c & 1] + lane]
            if u64[c_idx] == c:
                return t
        raise TornRead("lane tail")

    def read(self, *names: str) -> tuple:
        """Consistent copies of the named fields of the current copy (arrays copied)."""
        u64, c_idx, fields, scalars = self._u64, self._commit, self._fields, self._scalars
        for _ in range(READ_RETRIES):
            c = u64[c_idx]
            current = fields[c & 1]
            values = tuple(current[n].item() if n in scalars else current[n].copy() for n in names)
            if u64[c_idx] == c:
                return values
        raise TornRead(", ".join(names))

    def snapshot(self) -> np.ndarray:
        """A consistent private copy of the whole current record (shape ``(1,)``)."""
        u64, c_idx, copies = self._u64, self._commit, self.copies
        for _ in range(READ_RETRIES):
            c = u64[c_idx]
            record = copies[c & 1 : (c & 1) + 1].copy()
            if u64[c_idx] == c:
                return record
        raise TornRead("ledger snapshot")

    def publish(self, record: np.ndarray, points: tuple[str, ...] = ()) -> int:
        """Make ``record`` (shape ``(1,)``) current. Only the flusher calls this.

        ``points``: what this commit does, for the test-only pause hook (``seal``, ``apply``).
        """
        global _PAUSE_AT
        c = self._u64[self._commit]
        self.copies[(c + 1) & 1] = record[0]
        if _PAUSE_AT and (_PAUSE_AT == "publish" or _PAUSE_AT in points):
            _PAUSE_AT = ""
            os.kill(os.getpid(), signal.SIGSTOP)
        self._u64[self._commit] = c + 1  # publishes the copy written above
        return c + 1

    def close(self) -> None:
        self.__dict__.pop("_fields", None)
        self.__dict__.pop("copies", None)


# ----------------------------------------------------------------- the learner's state in a record

#: The published state a learner learns into only when it publishes its own (a solo engine); a fleet host's are the fleet's.
PUBLISHED_ARRAYS = ("down", "up", "route_vectors", "route_bias")
#: The learner's counters in a ledger record (``generation`` goes with the weights).
LEARNER_COUNTERS = ("pending", "trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied", "routes_used")


def learner_over(record: np.ndarray, config: EngineConfig, *, weights: bool) -> Learner:
    """The :class:`~sona_shm.learn.learner.Learner` of a private ledger ``record`` (shape ``(1,)``), learning into it.

    Its arrays (:data:`~sona_shm.learn.learner.STATE_ARRAYS`) are views into the record, so what it learns is in
    the record without a copy; its counters are read from it and written back by :func:`store_learner`.
    ``weights``: the learner's published arrays (:data:`PUBLISHED_ARRAYS`) are the record's — the engine
    publishes what it learns (a solo engine) — or else private copies that start as the record's (a fleet host,
    whose published adapter and route table are the fleet's).
    """
    st = record[0]
    arrays = {name: st[name] if weights or name not in PUBLISHED_ARRAYS else np.array(st[name]) for name in STATE_ARRAYS}
    learner = Learner.for_engine(config, **arrays)
    for name in (*LEARNER_COUNTERS, "generation"):
        setattr(learner, name, int(st[name]))
    return learner


def store_learner(record: np.ndarray, learner: Learner, *, weights: bool) -> None:
    """Write the learner's counters into ``record`` (its arrays are views there already: :func:`learner_over`);
    with ``weights``, also its ``generation`` — the version of the adapter the record publishes."""
    st = record[0]
    for name in LEARNER_COUNTERS:
        st[name] = getattr(learner, name)
    if weights:
        st["generation"] = learner.generation


def read_route_table(segment: Segment) -> RouteTable | None:
    """The route table of a mapped segment as its committed ledger has it (:func:`route_table_of` the current copy)."""
    if not segment.layout.max_routes:
        return None
    ledger = Ledger(segment)
    try:
        used, names, states = ledger.read("routes_used", "route_names", "route_state")
    finally:
        ledger.close()
    return _table(segment, used, names, states)


def route_table_of(segment: Segment, record: np.void) -> RouteTable | None:
    """The route table a ledger ``record`` of ``segment`` has — names and states from the record, each route's
    vector as given from the route region — or None if it has none; private copies.

    A table that fails validation can only come from memory corruption: it is a :class:`LayoutMismatchError`.
    """
    if not segment.layout.max_routes:
        return None
    return _table(segment, int(record["routes_used"]), record["route_names"], record["route_state"])


def _table(segment: Segment, used: int, names: np.ndarray, states: np.ndarray) -> RouteTable:
    vectors = np.array(given_vectors(segment.numpy_buffer(), segment.layout)[:used])
    try:
        return RouteTable.from_stored(vectors, names[:used], f"segment {segment.name!r}", states[:used])
    except InvalidInputError as exc:
        raise LayoutMismatchError(f"{exc}: its route table is corrupt; remove it with `sona-shm destroy --name {segment.name}`") from None
