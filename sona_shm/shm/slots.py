"""A slot: encoding a trajectory into one, checking one, decoding slots back — the one module that does each.

The bytes of a slot are written down in :mod:`sona_shm.shm.layout` ("Slot"). A producer
*encodes* a trajectory into the head slot of its lane (:func:`encode`, called by the lane
writers of :mod:`sona_shm.shm.lane`, which then stamp and publish it); the flusher *checks*
the slots it learns (:func:`check`) and hands the learnable ones to the learner
(:func:`learning_rows`); a consumer *decodes* the buffer's slots back into trajectories
(:func:`decode`). The C twins (``_speedups.LaneWriter``, the learners' ``slot_ok``) make the
same checks on the same bytes; tests compare both ways.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ..learn.learner import Learner, Rows
from ..trajectory import F32, ROUTE_MAX_BYTES, CheckedTrajectory, TrajectoryBatch, all_finite, check_finite, check_trajectory
from .layout import COMMIT_WORD, FLUSHER_WORDS, Layout
from .segment import Segment

#: struct formats of a slot's head from ``traj_id`` on, by step count (layout.py, "Slot").
_HEAD_FORMATS = ["<QQfHHHHf" + "fHH" * n for n in range(1025)]


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
        self.used_words = layout.routes_used_words

    def routes_used(self) -> int:
        """The routes the engine has now (read alone; see ``Layout.routes_used_words``)."""
        return int(self.u64[self.used_words[self.u64[COMMIT_WORD] & 1]])

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
            routes=self.routes_used(),
            unit_reward=layout.config.rule == "routing",
        )

    def release(self) -> None:
        self.words.release()
        self.zeros.release()
        del self.floats


def encode(views: LaneViews, head: int, traj: Any) -> None:
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
    struct.pack_into(
        _HEAD_FORMATS[n], buf, base + 8, tid, checked.latency_us, checked.quality, n, len(route), ri, bi, checked.probability, *meta
    )


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


def check(rec: np.ndarray, first_seq: int, layout: Layout, routes: int) -> np.ndarray:
    """Which of the lane slots ``rec`` (stamped from ``first_seq``) may be learned: ``bool[n]``; ``routes``: the
    routes in use (a route index at or above it names no route).

    A slot is corrupt if its stamp, step count, route length, step lengths or route
    indices are out of bounds, its quality or a step's reward is not finite, or a value the
    engine's rule learns from is NaN or infinite: under the reference rule the activations
    of its steps (or its query, without steps); under the routing rule a feedback's query,
    and a bandit reward outside [0, 1]. Producers never publish such a slot; the C learners
    make the same checks (``slot_ok`` in ``_speedups.c``).
    """
    n_steps = rec["n_steps"].astype(np.int64)
    route_index = rec["route_index"].astype(np.int64) - 1
    best_index = rec["best_index"].astype(np.int64) - 1
    S, h, A = layout.max_steps, layout.hidden_dim, layout.attention_dim
    ok = _head_ok(rec["seq"], first_seq, n_steps, rec["route_len"], layout)
    probability = rec["probability"]
    ok &= (route_index < routes) & (best_index < routes) & np.isfinite(rec["quality"])
    ok &= (probability == 0) | ((probability > 0) & (probability <= 1))  # 0: not recorded
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


def _head_ok(seq: np.ndarray, first_seq: int, n_steps: np.ndarray, route_len: np.ndarray, layout: Layout) -> np.ndarray:
    """The checks every reader of slots makes before it reads further: the stamp, the step count and the route length."""
    stamps = np.arange(first_seq, first_seq + len(seq), dtype=np.uint64)
    return (seq == stamps) & (n_steps <= layout.max_steps) & (route_len <= ROUTE_MAX_BYTES)


def learning_rows(learner: Learner, rec: np.ndarray) -> Rows:
    """The learner's :class:`~sona_shm.learn.learner.Rows` of lane slots ``rec`` that passed :func:`check`."""
    n_steps = rec["n_steps"].astype(np.int64)
    route_index = rec["route_index"].astype(np.int64) - 1
    best_index = rec["best_index"].astype(np.int64) - 1
    if learner.rule == "routing":
        return learner.rows(rec["query"], rec["quality"], route_index, best_index)
    w = max(1, int(n_steps.max())) if len(rec) else 1
    rewards, activations = rec["meta"]["reward"][:, :w], rec["steps"]["act"][:, :w]
    return learner.rows(rec["query"], rec["quality"], route_index, best_index, rewards, activations, n_steps)


def decode(ring: np.ndarray, pos: np.ndarray, first_seq: int, layout: Layout) -> tuple[TrajectoryBatch, np.ndarray]:
    """Private copies of the slots at positions ``pos`` of ``ring`` (a structured view of slots), stamped from
    ``first_seq`` on, as a :class:`~sona_shm.trajectory.TrajectoryBatch` of those that pass their checks (padding
    zeroed), and which did (``bool[len(pos)]``).

    Only the steps each trajectory has are read (a slot's unused tail may never have been written).
    """
    S, h, A = layout.max_steps, layout.hidden_dim, layout.attention_dim
    n_steps = ring["n_steps"][pos].astype(np.int32)
    route_len = ring["route_len"][pos].astype(np.int32)
    ok = _head_ok(ring["seq"][pos], first_seq, n_steps, route_len, layout)
    n_steps[~ok] = 0
    k = len(pos)
    rows, steps = np.nonzero(np.arange(S) < n_steps[:, None])  # every (trajectory, step) it has
    src = pos[rows]
    meta = ring["meta"]
    rewards = np.zeros((k, S), F32)
    act_len = np.zeros((k, S), np.int32)
    att_len = np.zeros((k, S), np.int32)
    rewards[rows, steps] = meta["reward"][src, steps]
    act_len[rows, steps] = meta["act_len"][src, steps]
    att_len[rows, steps] = meta["att_len"][src, steps]
    ok &= ((act_len <= h) & (att_len <= A)).all(axis=1)
    activations = np.zeros((k, S, h), F32)
    attention = np.zeros((k, S, A), F32)
    activations[rows, steps] = ring["steps"]["act"][src, steps]  # zero-padded past act_len by the producer
    attention[rows, steps] = ring["steps"]["att"][src, steps]
    attention[np.arange(A) >= att_len[:, :, None]] = 0.0  # past att_len a slot holds stale values
    probability = ring["probability"][pos][ok]
    raw_route = ring["route"][pos].view(np.uint8)
    routes = [raw_route[i, :n].tobytes().decode("utf-8", "replace") for i, n in enumerate(route_len.tolist()) if ok[i]]
    batch = TrajectoryBatch(
        traj_id=ring["traj_id"][pos][ok],
        query=ring["query"][pos][ok],
        quality=ring["quality"][pos][ok],
        latency_us=ring["latency_us"][pos][ok],
        route=np.array(routes, dtype=f"<U{ROUTE_MAX_BYTES}"),
        n_steps=n_steps[ok],
        rewards=rewards[ok],
        act_len=act_len[ok],
        activations=activations[ok],
        att_len=att_len[ok],
        attention=attention[ok],
        route_index=ring["route_index"][pos][ok].astype(np.int32) - 1,
        best_index=ring["best_index"][pos][ok].astype(np.int32) - 1,
        probability=np.where(probability > 0, probability, np.float32(np.nan)),
    )
    return batch, ok
