"""The producer's side of one lane: fill the head slot of its ring, stamp it, publish it.

:class:`PyLaneWriter` is the reference implementation; ``_speedups.LaneWriter`` (C) is
its twin for trajectories in the common form (float32 numpy arrays, Python floats and
ints) and hands everything else back (``record`` returns -1), so that
:func:`fill_slot` here stays the one authority on converting and refusing input. Both
publish in the order ``layout.py`` prescribes: payload and head fields, then the slot's
``seq`` stamp, then the lane head (the store that hands the slot to the flusher), then
the time of the record; then they report whether the flusher sleeps and must be rung.

A writer is used by one owner at a time (the client serialises its threads); ``head``
is this lane's published count, ``tail`` the committed tail the owner last read.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np

from ..learn.learner import F32
from ..native import speedups as _speedups
from ..trajectory import CheckedTrajectory, all_finite, check_finite, check_trajectory
from .layout import FLUSHER_WORDS, Layout
from .segment import Segment

PUBLISHED = 1  #: the slot is published
PUBLISHED_RING = 2  #: the slot is published and the flusher sleeps: ring its doorbell
FULL = 0  #: the ring has no free slot (as far as ``tail`` says); nothing was written
NOT_HANDLED = -1  #: (C writer only) not the common form; fill with fill_slot(), then publish()

#: struct formats of a slot's head from ``traj_id`` on, by step count (layout.py, "Slot").
_HEAD_FORMATS = ["<QQfHHHHI" + "fHH" * n for n in range(1025)]


class LaneViews:
    """The views of one lane that writing needs (made once per claim)."""

    def __init__(self, segment: Segment, lane: int, where: str) -> None:
        layout = segment.layout
        self.layout = layout
        self.lane = lane
        self.where = where
        self.u64, self.f64, self.buf = segment.u64, segment.f64, segment.buf
        self.slot0 = layout.lane_slot(lane, 0)
        words = layout.lane_words[lane]
        self.head_word = words.head
        self.next_id_word = words.next_id
        self.last_at_word = words.last_record_at
        self.idle_word = FLUSHER_WORDS.idle
        self.floats = np.ndarray((layout.lane_slots * layout.slot_bytes) // 4, dtype=F32, buffer=segment.numpy_buffer(), offset=self.slot0)
        self.words: Any = self.floats.data  # a memoryview: its slice stores cost half of numpy's
        self.zeros: Any = np.zeros(layout.hidden_dim, dtype=F32).data

    def check(self, traj: Any, *, finite: bool = True) -> CheckedTrajectory:
        """:func:`check_trajectory` against this engine (its bounds, route table and rule)."""
        layout = self.layout
        return check_trajectory(
            traj,
            layout.hidden_dim,
            max_steps=layout.max_steps,
            attention_dim=layout.attention_dim,
            where=self.where,
            finite=finite,
            routes=layout.routes,
            unit_reward=layout.config.rule == "routing",
        )

    def release(self) -> None:
        self.words.release()
        self.zeros.release()
        del self.floats


def fill_slot(views: LaneViews, head: int, traj: Any) -> None:
    """Fill lane slot ``head`` (payload and head fields, all but ``seq``) or raise.

    Converts what :func:`check_trajectory` converts and raises what it refuses, naming
    the field; nothing visible changes either way (the slot is unpublished). ``traj`` is
    read once: what is checked is what is written.
    The one-pass scan below covers whole steps, attention past ``att_len`` included, so
    it may see what an earlier writer left in this unpublished slot: the C writer giving
    up after copying part of a refused trajectory, or a writer killed or interrupted
    between copying one and refusing it. When what was read is finite, the payload (now
    zeroed) is filled again from it.
    """
    layout = views.layout
    h = layout.hidden_dim
    slot = (head % layout.lane_slots) * layout.slot_bytes
    first = (slot + layout.payload_offset) >> 2
    payload = views.floats[first : first + h + layout.max_steps * (layout.step_bytes >> 2)]
    # Everything but the NaN/Inf scan; that is done below in one pass over the slot.
    checked = views.check(traj, finite=False)
    used, meta = _copy_payload(views, first, checked)
    if not all_finite(payload[:used]):
        payload[...] = 0.0
        # Name the field with the value as the caller gave it (this read is only for the message) ...
        views.check(traj)
        check_finite(checked)  # ... or, if the input changed meanwhile, refuse what was read
        # What was read is finite: the scan saw stale values an earlier writer left in the slot.
        _copy_payload(views, first, checked)
    tid = checked.id
    if tid is None:
        u64 = views.u64
        k = u64[views.next_id_word]
        u64[views.next_id_word] = k + 1
        tid = k * layout.lanes + views.lane
    route = checked.route
    base = views.slot0 + slot
    buf = views.buf
    if route:
        buf[base + layout.route_offset : base + layout.route_offset + len(route)] = route
    n = len(checked.rewards)
    ri = 0 if checked.route_index is None else checked.route_index + 1
    bi = 0 if checked.best_index is None else checked.best_index + 1
    struct.pack_into(_HEAD_FORMATS[n], buf, base + 8, tid, checked.latency_us, checked.quality, n, len(route), ri, bi, 0, *meta)


def _copy_payload(views: LaneViews, first: int, checked: CheckedTrajectory) -> tuple[int, list]:
    """Copy the query and steps of ``checked`` to the payload at float index ``first``.

    Returns the floats the steps span and the ``(reward, act_len, att_len)`` of each step.
    """
    h = views.layout.hidden_dim
    step_words = views.layout.step_bytes >> 2
    words = views.words
    at = first
    words[at : at + h] = checked.query
    at += h
    meta: list = []
    for act, att, reward in zip(checked.activations, checked.attention, checked.rewards):
        n_act = act.shape[0]
        n_att = att.shape[0]
        words[at : at + n_act] = act
        if n_act < h:
            words[at + n_act : at + h] = views.zeros[: h - n_act]  # short activations add to the first entries only
        if n_att:
            words[at + h : at + h + n_att] = att
        meta += (reward, n_act, n_att)
        at += step_words
    return at - first, meta


class PyLaneWriter:
    """The reference lane writer (see the module docstring)."""

    def __init__(self, views: LaneViews) -> None:
        self.views = views
        self.head = views.u64[views.head_word]  # a previous owner's last publish; stable, it is dead
        self.tail = 0

    @property
    def slot_offset(self) -> int:
        layout = self.views.layout
        return self.views.slot0 + (self.head % layout.lane_slots) * layout.slot_bytes

    def record(self, traj: Any) -> int:
        if self.head - self.tail >= self.views.layout.lane_slots:
            return FULL
        fill_slot(self.views, self.head, traj)
        return self.publish()

    def publish(self) -> int:
        views = self.views
        u64 = views.u64
        head = self.head + 1
        u64[self.slot_offset >> 3] = head  # stamps the slot: its payload is complete
        self.head = head
        u64[views.head_word] = head  # publishes the slot to the flusher
        views.f64[views.last_at_word] = time.time()
        return PUBLISHED_RING if u64[views.idle_word] else PUBLISHED

    def close(self) -> None:
        pass


def make_writer(segment: Segment, views: LaneViews) -> Any:
    """The C writer when built, else the reference one; ``head`` is the lane's published count."""
    if _speedups is None:
        return PyLaneWriter(views)
    layout: Layout = segment.layout
    return _speedups.LaneWriter(
        segment.buf, views.slot0, layout.lane_slots, layout.slot_bytes, layout.hidden_dim, layout.max_steps,
        layout.attention_dim, layout.payload_offset, layout.route_offset, layout.step_bytes, views.head_word * 8,
        views.next_id_word * 8, views.last_at_word * 8, views.idle_word * 8, layout.lanes, views.lane,
        layout.routes, layout.config.rule == "routing",
    )  # fmt: skip
