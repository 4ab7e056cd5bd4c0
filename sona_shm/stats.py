"""The read model: what an engine is doing, as frozen dataclasses, read without a lock or a write.

:func:`collect` builds one :class:`EngineStats` from a mapped segment and its ledger;
:func:`read` opens an engine read-only to do so. Everything that shows an engine —
``client.stats()``, ``sona-shm stats`` (table, ``--json``, ``--watch``), the
Prometheus collector, ``sona-shm list``, gunicorn's ``child_exit`` — is built on it, and
renders it; nothing else reads the counters.

How it reads: totals are sums of one-writer words (the pattern of prometheus_client's
multiprocess mode); the flusher's figures and the adapter come from one consistent
ledger read (the seqcount latch of :mod:`sona_shm.shm.ledger`); liveness comes from the
kernel's lock table (who holds the flusher lock and each lane lock), so a pid recycled
by the OS never looks alive. Lane words are read one by one while producers write
them, so two lanes' figures may be a few records apart, never torn.

``EngineStats.as_dict()`` is the JSON interface (``client.stats()``, ``sona-shm stats
--json``, the example apps' ``/stats``); its keys are documented in docs/reference/stats.md
and only ever grow. Rates need two observations: :meth:`EngineStats.since`
returns the later one with :class:`Rates` filled in.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .errors import LayoutMismatchError, SegmentNotFoundError, SonaShmError, TornRead, UntrustedSegmentError
from .learn.routes import RETIRED
from .native import IMPLEMENTATION
from .shm.admin import Settings, read_settings
from .shm.layout import (
    CONSUMER_WORDS,
    FLUSHER_WORDS,
    HEADER_CREATED_AT,
    LOCK_FLUSHER,
    LOCK_LANE_BASE,
    PAUSED_BY_GUARD,
    PAUSED_BY_REQUEST,
    given_vectors,
    read_fleet_identity,
)
from .shm.ledger import Ledger
from .shm.segment import PREFIX, SHM_DIR, Segment

#: The seed's four metrics, in its order.
METRICS = ("trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied")

#: A flusher that holds its lock but has not looped for this long is called stalled
#: (it wakes at least every 50 ms; one scan learns at most lanes x lane_slots slots).
STALLED_AFTER_S = 5.0


@dataclass(frozen=True)
class ConfigStats:
    """What the engine was created with (its header), and the segment's size."""

    hidden_dim: int
    rank: int
    lr: float
    flush_threshold: int
    capacity: int
    max_steps: int
    attention_dim: int
    lanes: int
    lane_slots: int
    segment_bytes: int
    rule: str = "reference"  # the learning rule (config.RULES)
    routes: int = 0  # routes in the route table at creation
    temperature: float = 10.0  # the routing rule's
    max_routes: int = 0  # rows reserved for routes (the table can grow to this many)
    adapter_lr: float = 0.0  # the routing rule's step of the adapter


@dataclass(frozen=True)
class LaneStats:
    """One lane that was ever claimed. ``records``/``drops``/``claims`` are totals over all its owners."""

    lane: int
    pid: int  # the last owner
    alive: bool  # its lock is held: a live process owns it now
    records: int  # committed, ever (the lane head)
    learned: int  # learned and committed by the flusher (the lane tail)
    backlog: int  # records - learned
    drops: int  # refused because the ring was full
    claims: int
    last_record_at: float | None


@dataclass(frozen=True)
class FlusherStats:
    pid: int  # the current or last flusher
    alive: bool  # a process holds the flusher lock
    heartbeat_at: float | None
    heartbeat_age_s: float | None
    started_at: float | None
    idle: bool
    scans: int

    @property
    def stalled(self) -> bool:
        """Alive, but no heartbeat for :data:`STALLED_AFTER_S`."""
        return self.alive and self.heartbeat_age_s is not None and self.heartbeat_age_s > STALLED_AFTER_S


@dataclass(frozen=True)
class BufferStats:
    """The buffer of learned trajectories kept for consumers (``drain``)."""

    len: int
    dropped: int  # learned but not kept: the buffer was full (learning is unaffected)
    success_rate: float | None  # share of learned trajectories kept (the seed's buffer_stats); None: no buffer (capacity 0)
    capacity: int
    drained: int  # handed to consumers, ever
    drained_at: float | None
    consumer_pid: int | None  # the last consumer to take the drain lock

    @property
    def never_drained(self) -> bool:
        return self.drained == 0

    @property
    def state(self) -> str:
        """What the figures mean, in a word or three (none of them is a failure: learning never waits for the buffer):

        - ``"no buffer"``: created with capacity 0 (the routing rule's default): nothing is kept for drain;
        - ``"keeping"``: every learned trajectory was kept so far;
        - ``"nobody drains"``: it filled and no consumer ever drained it (it keeps the oldest);
        - ``"drained slower than learned"``: a consumer drains, but some were dropped meanwhile.
        """
        if self.capacity == 0:
            return "no buffer"
        if not self.dropped:
            return "keeping"
        return "nobody drains" if self.never_drained else "drained slower than learned"


@dataclass(frozen=True)
class RouteStats:
    """One route of the engine's route table, and the feedback about it since the engine was created."""

    name: str
    chosen: int  # feedback naming it as the route taken (route_index)
    best: int  # feedback naming it as the right one (best_index)
    reward_sum: float  # summed reward when taken: the bandit reward, or 1/0 against best_index
    mean_reward: float | None  # reward_sum / chosen (None: never taken)
    retired: bool = False  # never chosen or learned again
    drift: float = 0.0  # how far its published learned vector moved from its start (L2; the start is a unit vector)
    bias: float = 0.0  # its published learned bias


@dataclass(frozen=True)
class RouteRate:
    """One route between two observations: its share of the routes taken, and its mean reward, then."""

    name: str
    chosen_share: float | None  # chosen in the interval / all taken in the interval (None: nothing taken)
    mean_reward: float | None  # reward in the interval / chosen in the interval (None: not taken)


@dataclass(frozen=True)
class AdapterStats:
    """The published adapter: Frobenius norms of ``up`` and ``down``, and the weights themselves.

    ``up``/``down`` (``float32[rank, hidden_dim]``) are private copies, kept so that two
    observations can say how far the adapter moved; they are not part of :meth:`EngineStats.as_dict`.
    """

    up_norm: float
    down_norm: float
    up: np.ndarray | None = field(default=None, repr=False, compare=False)
    down: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class FleetStats:
    """This replica of a fleet (:mod:`sona_shm.fleet.member`): its link to Redis, its outbox, what it applied.

    ``applied_entries``/``applied_signals``, ``hosts``, ``last_applied_id`` and the
    ``lost_*``/``bad_entries`` counts are the fleet's state as this replica holds it (the
    same on every replica that applied the same stream); the rest is this host's.
    """

    connected: bool  # both Redis connections answer (False while no flusher runs)
    host_id: str
    key: str
    outbox: int  # own sealed windows not yet in the stream
    outstanding: int  # own sealed windows not yet applied back from the stream (outbox included)
    outbox_capacity: int
    applied_entries: int  # windows applied here from the stream, every host's (an entry carries one or more)
    applied_signals: int  # their signals
    last_applied_id: str | None  # the stream id of the last entry applied ("MS-SEQ")
    hosts: int  # hosts whose entries were applied here
    lag_s: float  # age of the oldest own window not yet applied back (0: caught up)
    epoch: int  # the fleet this segment is bound to (0: not yet)
    paused: bool  # learning waits for room in the outbox (or --fleet-lag)
    pauses: int
    resyncs: int  # times this replica loaded the fleet's snapshot after it was bound
    lost_entries: int  # windows the stream lost (a Redis failover), counted from seq gaps
    lost_signals: int
    bad_entries: int  # stream entries that failed validation: skipped from the first window that failed
    sealed_signals: int  # signals this host sealed, ever
    contact_at: float | None  # the last answer from Redis
    error_at: float | None  # the last failed call


@dataclass(frozen=True)
class LearningStats:
    """Whether the engine learns, what its feedback's reward does, and what paused or undid its learning.

    The moving reward is the mean reward of the last ``moving_window`` feedbacks naming the route taken, as the
    flusher measured it (:mod:`sona_shm.engine.guard`); ``guard_*`` are the reward guard's, when the engine's
    (last) flusher runs one; ``checkpoint``/``checkpoint_keep`` where that flusher keeps its checkpoints.
    """

    paused: bool  # learning is paused: trajectories are taken in and counted, not learned
    paused_by: str | None  # "request" (sona-shm pause) or "guard" (the reward guard); None while learning
    paused_at: float | None  # when learning was last paused
    pauses: int  # times learning was paused
    paused_skipped: int  # trajectories taken in while paused (in trajectories_processed, kept for consumers, never learned)
    rollbacks: int  # rollbacks applied
    rolled_back_signals: int  # signals whose learning rollbacks discarded
    last_rollback_at: float | None
    rollback_checkpoint_at: float | None  # when the checkpoint the last rollback restored was written
    moving_reward: float | None  # mean reward of the last moving_window feedbacks (None: fewer seen since the flusher started)
    moving_feedbacks: int  # feedbacks behind moving_reward so far
    moving_window: int  # N (0: no flusher has run)
    guard_drop: float | None  # the reward guard's DROP (None: no guard)
    guard_rollback: bool  # the guard rolls back too
    guard_level: float | None  # the moving reward at the last good checkpoint (None: none yet)
    guard_level_at: float | None  # when that checkpoint was written
    guard_trips: int  # times the guard paused learning
    checkpoint: str | None  # the flusher's checkpoint file (None: none)
    checkpoint_keep: int  # timestamped checkpoints kept beside it (0: the file alone)


@dataclass(frozen=True)
class Rates:
    """What changed between two observations of one engine, per second over ``interval_s``."""

    interval_s: float
    learned_per_s: float  # trajectories_processed
    recorded_per_s: float
    flushes_per_s: float
    lane_dropped_per_s: float
    buffer_dropped_per_s: float
    drained_per_s: float
    up_change_norm: float | None  # ‖up_now - up_then‖ (None when a side has no weights)
    down_change_norm: float | None
    routes: tuple[RouteRate, ...] = ()  # the moving choice share and mean reward of each route

    @classmethod
    def between(cls, before: EngineStats, after: EngineStats) -> Rates | None:
        """The rates from ``before`` to ``after``; None unless they observe the same engine, in order."""
        interval = after.observed_at - before.observed_at
        if interval <= 0 or before.name != after.name or before.created_at != after.created_at:
            return None  # no time passed, or the engine was destroyed and created again

        def per_s(now: int, then: int) -> float:
            return max(0, now - then) / interval

        def moved(now: np.ndarray | None, then: np.ndarray | None) -> float | None:
            if now is None or then is None or now.shape != then.shape:
                return None
            return float(np.linalg.norm(now.astype(np.float64) - then.astype(np.float64)))

        return cls(
            interval_s=interval,
            learned_per_s=per_s(after.trajectories_processed, before.trajectories_processed),
            recorded_per_s=per_s(after.recorded, before.recorded),
            flushes_per_s=per_s(after.flushes_performed, before.flushes_performed),
            lane_dropped_per_s=per_s(after.lane_dropped, before.lane_dropped),
            buffer_dropped_per_s=per_s(after.buffer.dropped, before.buffer.dropped),
            drained_per_s=per_s(after.buffer.drained, before.buffer.drained),
            up_change_norm=moved(after.adapter.up, before.adapter.up),
            down_change_norm=moved(after.adapter.down, before.adapter.down),
            routes=_route_rates(before.routes, after.routes),
        )


@dataclass(frozen=True)
class EngineStats:
    """One observation of an engine. Build it with :func:`collect` or :func:`read`."""

    name: str
    observed_at: float  # unix time of the read
    created_at: float  # unix time the segment was created (tells a recreated engine apart)
    config: ConfigStats
    # The seed's four metrics (the ledger's counters).
    trajectories_processed: int
    signals_accumulated: int
    flushes_performed: int
    updates_applied: int
    pending_signals: int  # accumulated since the last flush
    weights_generation: int
    last_flush_at: float | None
    # Producers: sums over every lane ever claimed.
    recorded: int
    lane_dropped: int
    backlog: int  # committed to lanes, not yet learned
    lanes_live: int
    buffer: BufferStats
    flusher: FlusherStats
    lanes: tuple[LaneStats, ...]
    adapter: AdapterStats
    corrupt: int = 0  # published slots that failed validation: counted, not learned
    routes: tuple[RouteStats, ...] = ()  # the route table, with feedback counts per route
    rates: Rates | None = None  # set by since(): rates need two observations
    fleet: FleetStats | None = None  # None: the segment has no fleet outbox
    learning: LearningStats | None = None  # pause, moving reward, guard, rollbacks (None: from a dict of an older version)
    engine_id: str = ""  # 16 hex digits: the engine its checkpoints belong to
    implementation: str = ""  # what this process's hot paths run on: "C" or "Python (why)" (sona_shm.native)

    def since(self, before: EngineStats | None) -> EngineStats:
        """This observation with :attr:`rates` measured from ``before`` (None: left as it is)."""
        if before is None:
            return self
        return replace(self, rates=Rates.between(before, self))

    @property
    def live_lanes(self) -> tuple[LaneStats, ...]:
        return tuple(lane for lane in self.lanes if lane.alive)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-compatible dict of ``client.stats()`` and ``sona-shm stats --json`` (keys: docs/reference/stats.md)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("lanes", "routes"):
                value = [_plain(item) for item in value]
            elif f.name == "adapter":
                value = {"up_norm": value.up_norm, "down_norm": value.down_norm}
            elif f.name == "buffer":
                value = {**_plain(value), "state": value.state}
            elif f.name == "rates" and value is not None:
                value = {**_plain(value), "routes": [_plain(r) for r in value.routes]}
            elif value is not None and hasattr(value, "__dataclass_fields__"):
                value = _plain(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineStats:
        """The model of a dict :meth:`as_dict` made (e.g. an app's ``/stats`` JSON); weights are not in it."""
        adapter = data.get("adapter") or {"up_norm": math.nan, "down_norm": math.nan}
        rates = data.get("rates")
        return cls(
            **{k: data[k] for k in ("name", "observed_at", *METRICS, "pending_signals", "weights_generation", "last_flush_at")},
            **{k: data[k] for k in ("recorded", "lane_dropped", "backlog", "lanes_live")},
            created_at=data.get("created_at", 0.0),
            config=ConfigStats(**data["config"]),
            buffer=BufferStats(**{k: v for k, v in data["buffer"].items() if k != "state"}),  # state: derived
            flusher=FlusherStats(**data["flusher"]),
            lanes=tuple(LaneStats(**lane) for lane in data["lanes"]),
            adapter=AdapterStats(adapter["up_norm"], adapter["down_norm"]),
            fleet=FleetStats(**data["fleet"]) if data.get("fleet") else None,
            learning=LearningStats(**data["learning"]) if data.get("learning") else None,
            engine_id=data.get("engine_id", ""),
            corrupt=data.get("corrupt", 0),
            implementation=data.get("implementation", ""),
            routes=tuple(RouteStats(**r) for r in data.get("routes", ())),
            rates=Rates(**{**rates, "routes": tuple(RouteRate(**r) for r in rates.get("routes", ()))}) if rates else None,
        )


def _route_rates(before: tuple[RouteStats, ...], after: tuple[RouteStats, ...]) -> tuple[RouteRate, ...]:
    """Each route's share and mean reward between two observations (a route added or renamed meanwhile counts from 0)."""
    earlier = {r.name: r for r in before}
    zero = RouteStats("", 0, 0, 0.0, None)
    pairs = [(a, earlier.get(a.name, zero)) for a in after]
    taken = [max(0, a.chosen - b.chosen) for a, b in pairs]
    total = sum(taken)
    return tuple(
        RouteRate(
            a.name,
            n / total if total else None,
            (a.reward_sum - b.reward_sum) / n if n else None,
        )
        for (a, b), n in zip(pairs, taken)
    )


def _plain(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def as_model(stats: EngineStats | Mapping[str, Any]) -> EngineStats:
    """``stats`` as an :class:`EngineStats` (renderers accept the model or its dict)."""
    return stats if isinstance(stats, EngineStats) else EngineStats.from_dict(stats)


# ----------------------------------------------------------------- reading


_LEDGER_FIELDS: tuple[str, ...] = METRICS + (
    "pending",
    "generation",
    "buffer_head",
    "buffer_dropped",
    "last_flush_at",
    "corrupt",
    "lane_tail",
    "up",
    "down",
    "route_chosen",
    "route_best",
    "route_reward",
    "routes_used",
    "route_names",
    "route_state",
    "route_vectors",
    "route_bias",
    "engine_id",
    "paused",
    "paused_at",
    "pauses",
    "paused_skipped",
    "rollbacks",
    "rolled_back_signals",
    "last_rollback_at",
    "rollback_checkpoint_at",
    "moving_reward",
    "moving_feedbacks",
    "guard_trips",
    "guard_level",
    "guard_checkpoint_at",
)
_FLEET_FIELDS = (
    "fleet_epoch",
    "fleet_out_head",
    "fleet_out_tail",
    "fleet_cursor_ms",
    "fleet_cursor_seq",
    "fleet_entries",
    "fleet_signals",
    "fleet_lost_entries",
    "fleet_lost_signals",
    "fleet_bad_entries",
    "fleet_resyncs",
    "fleet_sealed_signals",
    "fleet_host",
)


def _fleet(segment: Segment, v: Mapping[str, Any], alive: bool) -> FleetStats | None:
    """The fleet section of an engine whose segment has an outbox (see layout.py, "Fleet"); ``v``: the ledger's
    values, read with the rest (one commit), including :data:`_FLEET_FIELDS` when there is an outbox."""
    layout = segment.layout
    if not layout.fleet_outbox:
        return None
    words, u64, f64 = layout.fleet_words, segment.u64, segment.f64
    assert words is not None  # a segment with an outbox has the fleet region
    lag, paused, pauses = f64[words.lag_s], u64[words.paused], u64[words.pauses]
    connected, contact_at, published, error_at = u64[words.connected], f64[words.contact_at], u64[words.published], f64[words.error_at]
    host, key = read_fleet_identity(segment.buf, layout)
    head, tail = v["fleet_out_head"], v["fleet_out_tail"]
    cursor = (v["fleet_cursor_ms"], v["fleet_cursor_seq"])
    return FleetStats(
        connected=alive and bool(connected),
        host_id=host,
        key=key,
        outbox=max(0, head - max(published, tail)),
        outstanding=head - tail,
        outbox_capacity=layout.fleet_outbox,
        applied_entries=v["fleet_entries"],
        applied_signals=v["fleet_signals"],
        last_applied_id=f"{cursor[0]}-{cursor[1]}" if cursor != (0, 0) else None,
        hosts=int(np.count_nonzero(v["fleet_host"])),
        lag_s=lag if math.isfinite(lag) else 0.0,
        epoch=v["fleet_epoch"],
        paused=alive and bool(paused),
        pauses=pauses,
        resyncs=v["fleet_resyncs"],
        lost_entries=v["fleet_lost_entries"],
        lost_signals=v["fleet_lost_signals"],
        bad_entries=v["fleet_bad_entries"],
        sealed_signals=v["fleet_sealed_signals"],
        contact_at=contact_at or None,
        error_at=error_at or None,
    )


def _learning(segment: Segment, v: Mapping[str, Any]) -> LearningStats:
    """The learning section: the ledger's values ``v`` (one read with the rest) and the last flusher's settings."""
    try:
        settings = read_settings(segment)
    except TornRead:
        settings = Settings()
    window = settings.guard_window
    paused = int(v["paused"])
    guard = settings.guard_drop > 0
    good_at = v["guard_checkpoint_at"]
    return LearningStats(
        paused=bool(paused),
        paused_by={PAUSED_BY_REQUEST: "request", PAUSED_BY_GUARD: "guard"}.get(paused),
        paused_at=v["paused_at"] or None,
        pauses=v["pauses"],
        paused_skipped=v["paused_skipped"],
        rollbacks=v["rollbacks"],
        rolled_back_signals=v["rolled_back_signals"],
        last_rollback_at=v["last_rollback_at"] or None,
        rollback_checkpoint_at=v["rollback_checkpoint_at"] or None,
        moving_reward=v["moving_reward"] if window and v["moving_feedbacks"] >= window and math.isfinite(v["moving_reward"]) else None,
        moving_feedbacks=v["moving_feedbacks"],
        moving_window=window,
        guard_drop=settings.guard_drop if guard else None,
        guard_rollback=guard and settings.guard_rollback,
        guard_level=v["guard_level"] if good_at > 0 and math.isfinite(v["guard_level"]) else None,
        guard_level_at=good_at or None,
        guard_trips=v["guard_trips"],
        checkpoint=settings.checkpoint or None,
        checkpoint_keep=settings.keep,
    )


def collect(segment: Segment, ledger: Ledger) -> EngineStats:
    """Observe the engine of ``segment`` now: no lock taken, nothing written."""
    layout = segment.layout
    u64, f64 = segment.u64, segment.f64
    # The tail before the head: the tail never passes the head, so len is never negative.
    buffer_tail = u64[CONSUMER_WORDS.tail]
    names = _LEDGER_FIELDS + (_FLEET_FIELDS if layout.fleet_outbox else ())
    values = dict(zip(names, ledger.read(*names)))  # one read: the fleet's figures are of the same commit as the rest
    tails = values["lane_tail"]
    held = segment.held_locks([LOCK_FLUSHER] + [LOCK_LANE_BASE + i for i in range(layout.lanes)])
    now = time.time()

    lanes = []
    for lane in range(layout.lanes):
        words = layout.lane_words[lane]
        claims = u64[words.claims]
        if not claims:
            continue
        head = u64[words.head]
        tail = int(tails[lane])
        lanes.append(
            LaneStats(
                lane=lane,
                pid=u64[words.owner_pid],
                alive=held[1 + lane],
                records=head,
                learned=tail,
                backlog=head - tail,
                drops=u64[words.drops],
                claims=claims,
                last_record_at=f64[words.last_record_at] or None,
            )
        )

    fl = FLUSHER_WORDS
    heartbeat = f64[fl.heartbeat]
    seen = values["trajectories_processed"]
    cfg = layout.config
    up, down = values["up"], values["down"]
    return EngineStats(
        name=segment.name,
        observed_at=now,
        created_at=struct.unpack_from("<d", segment.buf, HEADER_CREATED_AT)[0],
        config=ConfigStats(
            hidden_dim=cfg.hidden_dim,
            rank=cfg.rank,
            lr=cfg.lr,
            flush_threshold=cfg.flush_threshold,
            capacity=cfg.capacity,
            max_steps=cfg.max_steps,
            attention_dim=cfg.attention_dim,
            lanes=cfg.lanes,
            lane_slots=cfg.lane_slots,
            segment_bytes=layout.total_bytes,
            rule=cfg.rule,
            routes=cfg.routes,
            temperature=cfg.temperature,
            max_routes=cfg.max_routes,
            adapter_lr=cfg.adapter_lr,
        ),
        **{m: values[m] for m in METRICS},
        pending_signals=values["pending"],
        weights_generation=values["generation"],
        last_flush_at=values["last_flush_at"] or None,
        recorded=sum(lane.records for lane in lanes),
        lane_dropped=sum(lane.drops for lane in lanes),
        backlog=sum(lane.backlog for lane in lanes),
        lanes_live=sum(1 for lane in lanes if lane.alive),
        buffer=BufferStats(
            len=values["buffer_head"] - buffer_tail,
            dropped=values["buffer_dropped"],
            success_rate=None if cfg.capacity == 0 else 1.0 if seen == 0 else (seen - values["buffer_dropped"]) / seen,
            capacity=cfg.capacity,
            drained=buffer_tail,
            drained_at=f64[CONSUMER_WORDS.drained_at] or None,
            consumer_pid=u64[CONSUMER_WORDS.pid] or None,
        ),
        flusher=FlusherStats(
            pid=u64[fl.pid],
            alive=held[0],
            heartbeat_at=heartbeat or None,
            heartbeat_age_s=(now - heartbeat) if heartbeat else None,
            started_at=f64[fl.started_at] or None,
            idle=bool(u64[fl.idle]),
            scans=u64[fl.scans],
        ),
        lanes=tuple(lanes),
        adapter=AdapterStats(
            up_norm=float(np.linalg.norm(up.astype(np.float64))),
            down_norm=float(np.linalg.norm(down.astype(np.float64))),
            up=up,
            down=down,
        ),
        corrupt=values["corrupt"],
        fleet=_fleet(segment, values, held[0]),
        routes=_routes(segment, values),
        learning=_learning(segment, values),
        engine_id=f"{values['engine_id']:016x}",
        implementation=IMPLEMENTATION,
    )


def _routes(segment: Segment, values: dict[str, Any]) -> tuple[RouteStats, ...]:
    """Each route in use, as the one ledger read ``values`` has it (names decoded leniently: this is for people)."""
    used = int(values["routes_used"])
    if not used:
        return ()
    given = given_vectors(segment.numpy_buffer(), segment.layout)[:used].astype(np.float64)
    start = given / np.maximum(np.linalg.norm(given, axis=1), np.finfo(np.float64).tiny)[:, None]
    drift = np.linalg.norm(values["route_vectors"][:used].astype(np.float64) - start, axis=1)
    return tuple(
        RouteStats(bytes(name).rstrip(b"\0").decode("utf-8", "replace"), c, b, r, r / c if c else None, state == RETIRED, d, bias)
        for name, c, b, r, state, d, bias in zip(
            values["route_names"][:used].tolist(),
            values["route_chosen"][:used].tolist(),
            values["route_best"][:used].tolist(),
            values["route_reward"][:used].tolist(),
            values["route_state"][:used].tolist(),
            drift.tolist(),
            values["route_bias"][:used].tolist(),
        )
    )


def read(name: str) -> EngineStats:
    """Open engine ``name`` read-only, observe it, close. :class:`SegmentNotFoundError` if it is not there."""
    segment = Segment.open(name, writable=False)
    try:
        ledger = Ledger(segment)
        try:
            return collect(segment, ledger)
        finally:
            ledger.close()
    finally:
        segment.close()


def read_stats(name: str) -> dict[str, Any]:
    """``read(name).as_dict()``: the JSON form, as ``sona-shm stats --json`` prints it."""
    return read(name).as_dict()


# ----------------------------------------------------------------- the engines of this host

#: :attr:`EngineSummary.state` values.
ALIVE, NOT_RUNNING, FOREIGN, UNREADABLE = "alive", "not running", "not a sona_shm segment", "unreadable"


@dataclass(frozen=True)
class EngineSummary:
    """One line of ``sona-shm list``: an object named ``sona_shm.<name>`` in /dev/shm."""

    name: str
    state: str  # ALIVE, NOT_RUNNING (a segment nobody learns), FOREIGN, UNREADABLE
    size_bytes: int
    flusher_pid: int | None = None
    hidden_dim: int | None = None
    rank: int | None = None
    lanes: int | None = None
    lanes_live: int | None = None
    trajectories_processed: int | None = None
    reason: str | None = None  # why FOREIGN (read, and not an engine) or UNREADABLE (not read: refused, permission, half-created)

    def as_dict(self) -> dict[str, Any]:
        return _plain(self)


def list_engines(directory: str | None = None) -> list[EngineSummary]:
    """Every ``sona_shm.*`` segment in ``directory`` (doorbell semaphores skipped), by name.

    Each is opened read-only like :func:`read` (no lock taken, nothing written, and never
    a wait: a FIFO or another user's object at an engine's name is listed as
    :data:`UNREADABLE` with the reason, without being read).
    """
    prefix = PREFIX.lstrip("/")
    try:
        entries = sorted(os.listdir(directory or SHM_DIR))
    except OSError:
        return []
    out = []
    for entry in entries:
        # The doorbells are semaphores, which Linux names sem.sona_shm.<name>.bell: not matched.
        if not entry.startswith(prefix):
            continue
        name = entry[len(prefix) :]
        try:
            size = os.lstat(os.path.join(directory or SHM_DIR, entry)).st_size  # lstat: a symlink squatting a name is listed too
        except OSError:
            continue  # removed meanwhile
        out.append(_summary(name, size))
    return out


def _summary(name: str, size: int) -> EngineSummary:
    try:
        stats = read(name)
    except UntrustedSegmentError as exc:  # not a regular file of ours (a FIFO, another user's): refused unread
        return EngineSummary(name, UNREADABLE, size, reason=str(exc))
    except LayoutMismatchError as exc:
        return EngineSummary(name, FOREIGN, size, reason=str(exc))
    except (SonaShmError, OSError) as exc:  # permission denied, half-created, torn reads, a bad name
        return EngineSummary(name, UNREADABLE, size, reason=str(exc))
    return EngineSummary(
        name,
        ALIVE if stats.flusher.alive else NOT_RUNNING,
        size,
        flusher_pid=stats.flusher.pid or None,
        hidden_dim=stats.config.hidden_dim,
        rank=stats.config.rank,
        lanes=stats.config.lanes,
        lanes_live=stats.lanes_live,
        trajectories_processed=stats.trajectories_processed,
    )


__all__ = [
    "AdapterStats",
    "BufferStats",
    "ConfigStats",
    "EngineStats",
    "EngineSummary",
    "FleetStats",
    "FlusherStats",
    "LaneStats",
    "LearningStats",
    "Rates",
    "RouteRate",
    "RouteStats",
    "SegmentNotFoundError",
    "as_model",
    "collect",
    "list_engines",
    "read",
    "read_stats",
]
