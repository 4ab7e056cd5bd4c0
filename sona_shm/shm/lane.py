"""The producer's side of one lane: fill the head slot of its ring, stamp it, publish it.

:class:`PyLaneWriter` is the reference implementation; ``_speedups.LaneWriter`` (C) is
its twin for trajectories in the common form (float32 numpy arrays, Python floats and
ints) and hands everything else back (``record`` returns -1), so that
:func:`sona_shm.shm.slots.encode` stays the one authority on converting and refusing input. Both
publish in the order ``layout.py`` prescribes: payload and head fields, then the slot's
``seq`` stamp, then the lane head (the store that hands the slot to the flusher), then
the time of the record; then they report whether the flusher sleeps and must be rung.

A writer is used by one owner at a time (the client serialises its threads); ``head``
is this lane's published count, ``tail`` the committed tail the owner last read.
"""

from __future__ import annotations

import time
from typing import Protocol

from ..native import speedups as _speedups
from .segment import Segment
from .slots import LaneViews, encode

PUBLISHED = 1  #: the slot is published
PUBLISHED_RING = 2  #: the slot is published and the flusher sleeps: ring its doorbell
FULL = 0  #: the ring has no free slot (as far as ``tail`` says); nothing was written
NOT_HANDLED = -1  #: (C writer only) not the common form; fill with slots.encode(), then publish()


class Writer(Protocol):
    """What the client needs of a lane writer: :class:`PyLaneWriter` and ``_speedups.LaneWriter`` are both one."""

    @property
    def head(self) -> int: ...  # slots published by this lane, ever

    tail: int  # the committed tail the owner last read

    @property
    def slot_offset(self) -> int: ...  # byte offset in the segment of the head slot

    def record(self, traj: object, /) -> int: ...  # PUBLISHED, PUBLISHED_RING, FULL (or NOT_HANDLED: C only)

    def publish(self) -> int: ...  # publish the head slot filled by slots.encode

    def close(self) -> None: ...


class PyLaneWriter:
    """The reference lane writer (see the module docstring)."""

    def __init__(self, views: LaneViews) -> None:
        self.views = views
        self.head: int = views.u64[views.head_word]  # a previous owner's last publish; stable, it is dead
        self.tail = 0

    @property
    def slot_offset(self) -> int:
        layout = self.views.layout
        return self.views.slot0 + (self.head % layout.lane_slots) * layout.slot_bytes

    def record(self, traj: object, /) -> int:
        if self.head - self.tail >= self.views.layout.lane_slots:
            return FULL
        encode(self.views, self.head, traj)
        return self.publish()

    def publish(self) -> int:
        views = self.views
        u64 = views.u64
        head = self.head + 1
        u64[self.slot_offset // 8] = head  # stamps the slot (its first word): its payload is complete
        self.head = head
        u64[views.head_word] = head  # publishes the slot to the flusher
        views.f64[views.last_at_word] = time.time()
        if not u64[views.idle_word]:
            return PUBLISHED
        # The flusher sleeps: this producer rings, and takes the word back to 0 so that the others do not (one ring
        # per wake-up; the C writer does it with a compare-exchange, here two producers may both ring).
        u64[views.idle_word] = 0
        return PUBLISHED_RING

    def close(self) -> None:
        pass


def make_writer(segment: Segment, views: LaneViews) -> Writer:
    """The C writer when built, else the reference one; ``head`` is the lane's published count."""
    if _speedups is None:
        return PyLaneWriter(views)
    return _speedups.LaneWriter(segment.buf, segment.layout.geometry, views.lane)
