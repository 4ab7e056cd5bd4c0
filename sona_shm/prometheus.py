"""A ``prometheus_client`` collector for sona_shm engines: register it in any registry.

::

    from prometheus_client import REGISTRY
    from sona_shm.prometheus import EngineCollector

    REGISTRY.register(EngineCollector("router"))

Every scrape opens the engine read-only, reads one :class:`~sona_shm.stats.EngineStats`
(no lock, nothing written) and closes it again, so a collector never holds a destroyed
segment mapped and follows an engine that was destroyed and created again; a missing
engine is reported as ``sona_shm_engine_up 0`` and nothing else. One collector may
watch several engines (``EngineCollector("a", "b")``); each series carries the engine
name as label ``engine``, per-lane series (live lanes only) also ``lane``. No series but the
``_info`` ones carries a ``pid`` (a restarted flusher or a recycled worker would start new series):
``sona_shm_flusher_info`` and ``sona_shm_lane_info`` say which process is which.

The figures are the engine's own, the same from every process: under gunicorn with
prometheus_client's multiprocess mode, register the collector in the registry you
build per scrape next to ``MultiProcessCollector`` (the engine is already shared, it
must not go through the per-process files), and call both ``child_exit`` hooks (see
docs/how-to/prometheus.md).

``sona_shm_adapter_up_change_norm`` is how far ``up`` moved since this process's previous
scrape of the engine, by any collector (so also under the multiprocess recipe, which makes
a collector per scrape; absent on a process's first scrape and after the engine was
recreated). Rates
are PromQL's job: ``rate(sona_shm_trajectories_processed_total[1m])`` is learned/s.

Needs the ``prometheus`` extra: ``pip install 'sona-shm[prometheus]'``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"sona_shm.prometheus needs prometheus_client: pip install 'sona-shm[prometheus]' ({exc})") from exc

from .errors import SegmentNotFoundError
from .shm.segment import check_name
from .stats import EngineStats, FleetStats, LaneStats, LearningStats, RouteStats, read

#: The content type of what :func:`exposition` returns (the text format prometheus_client writes).
CONTENT_TYPE = CONTENT_TYPE_LATEST

PREFIX = "sona_shm_"


@dataclass(frozen=True)
class _Spec:
    name: str  # without the prefix; counters without _total (prometheus_client adds it)
    kind: str  # "counter" or "gauge"
    help: str
    value: Callable[[EngineStats], float | None]  # None: no sample for this engine


def _ts(t: float | None) -> float:
    return t or 0.0


#: Engine-wide series, one sample per engine.
ENGINE_METRICS: tuple[_Spec, ...] = (
    _Spec(
        "trajectories_processed",
        "counter",
        "Trajectories the flusher took in (learned; or, while learning was paused, counted and not learned).",
        lambda s: s.trajectories_processed,
    ),
    _Spec("signals_accumulated", "counter", "Learning signals accumulated.", lambda s: s.signals_accumulated),
    _Spec("flushes_performed", "counter", "Flushes that applied accumulated gradients.", lambda s: s.flushes_performed),
    _Spec("updates_applied", "counter", "Signals applied to the adapter weights by flushes.", lambda s: s.updates_applied),
    _Spec("recorded", "counter", "Trajectories producers committed to their lanes.", lambda s: s.recorded),
    _Spec("lane_dropped", "counter", "Trajectories refused because a producer's lane was full.", lambda s: s.lane_dropped),
    _Spec("backlog", "gauge", "Trajectories committed to lanes and not yet learned.", lambda s: s.backlog),
    _Spec("pending_signals", "gauge", "Signals accumulated since the last flush.", lambda s: s.pending_signals),
    _Spec("weights_generation", "gauge", "Generation of the published adapter weights.", lambda s: s.weights_generation),
    _Spec("last_flush_timestamp_seconds", "gauge", "When a flush last changed weights (0: never).", lambda s: _ts(s.last_flush_at)),
    _Spec("adapter_up_norm", "gauge", "Frobenius norm of the adapter's learned up matrix.", lambda s: s.adapter.up_norm),
    _Spec("adapter_down_norm", "gauge", "Frobenius norm of the adapter's down matrix.", lambda s: s.adapter.down_norm),
    _Spec(
        "adapter_up_change_norm",
        "gauge",
        "Frobenius norm of the change of up since this collector's previous scrape.",
        lambda s: s.rates.up_change_norm if s.rates else None,
    ),
    _Spec("buffer_len", "gauge", "Learned trajectories held in the buffer for drain.", lambda s: s.buffer.len),
    _Spec("buffer_capacity", "gauge", "Slots of the learned-trajectory buffer.", lambda s: s.buffer.capacity),
    _Spec(
        "buffer_dropped",
        "counter",
        "Learned trajectories not kept for drain because the buffer was full (learning is unaffected).",
        lambda s: s.buffer.dropped,
    ),
    _Spec("buffer_drained", "counter", "Buffered trajectories handed to consumers.", lambda s: s.buffer.drained),
    _Spec("buffer_success_rate", "gauge", "Share of learned trajectories kept in the buffer.", lambda s: s.buffer.success_rate),
    _Spec("lanes", "gauge", "Producer lanes of the engine.", lambda s: s.config.lanes),
    _Spec("lanes_live", "gauge", "Lanes held by a live producer process.", lambda s: s.lanes_live),
    _Spec("segment_bytes", "gauge", "Size of the shared-memory segment.", lambda s: s.config.segment_bytes),
    _Spec(
        "flusher_heartbeat_timestamp_seconds", "gauge", "When the flusher last looped (0: never).", lambda s: _ts(s.flusher.heartbeat_at)
    ),
    _Spec(
        "flusher_start_time_seconds", "gauge", "When the current or last flusher started (0: never).", lambda s: _ts(s.flusher.started_at)
    ),
    _Spec("flusher_scans", "counter", "Passes of the flusher over the lanes.", lambda s: s.flusher.scans),
    _Spec("corrupt_slots", "counter", "Published slots that failed validation: counted, not learned.", lambda s: s.corrupt),
)


def _learning(value: Callable[[LearningStats], float | None]) -> Callable[[EngineStats], float | None]:
    return lambda s: None if s.learning is None else value(s.learning)


#: Pause, moving reward, reward guard and rollbacks (every engine; the guard's series only with a guard).
LEARNING_METRICS: tuple[_Spec, ...] = (
    _Spec("paused", "gauge", "1 while learning is paused (by a request or by the reward guard).", _learning(lambda g: int(g.paused))),
    _Spec("paused_by_guard", "gauge", "1 while learning is paused by the reward guard.", _learning(lambda g: int(g.paused_by == "guard"))),
    _Spec("pauses", "counter", "Times learning was paused.", _learning(lambda g: g.pauses)),
    _Spec(
        "paused_skipped",
        "counter",
        "Trajectories taken in while learning was paused: kept, never learned.",
        _learning(lambda g: g.paused_skipped),
    ),
    _Spec("rollbacks", "counter", "Rollbacks of the learned state to a checkpoint.", _learning(lambda g: g.rollbacks)),
    _Spec("rolled_back_signals", "counter", "Signals whose learning rollbacks discarded.", _learning(lambda g: g.rolled_back_signals)),
    _Spec(
        "moving_reward",
        "gauge",
        "Mean reward of the last N feedbacks naming the route taken (absent until N were seen).",
        _learning(lambda g: g.moving_reward),
    ),
    _Spec(
        "guard_trips", "counter", "Times the reward guard paused learning.", _learning(lambda g: g.guard_trips if g.guard_drop else None)
    ),
    _Spec(
        "guard_level",
        "gauge",
        "The moving reward when the last good checkpoint was written: the reward guard's reference.",
        _learning(lambda g: g.guard_level if g.guard_drop else None),
    ),
    _Spec(
        "guard_threshold",
        "gauge",
        "The moving reward below which the reward guard pauses learning (level - DROP).",
        _learning(lambda g: g.guard_level - g.guard_drop if g.guard_drop and g.guard_level is not None else None),
    ),
)


def _fleet(value: Callable[[FleetStats], float]) -> Callable[[EngineStats], float | None]:
    return lambda s: None if s.fleet is None else value(s.fleet)


#: Fleet series (engines whose segment has a fleet outbox; see sona_shm.fleet.member).
FLEET_METRICS: tuple[_Spec, ...] = (
    _Spec("fleet_connected", "gauge", "1 while the flusher's Redis connections answer.", _fleet(lambda f: int(f.connected))),
    _Spec("fleet_outbox", "gauge", "Own sealed windows not yet in the fleet's stream.", _fleet(lambda f: f.outbox)),
    _Spec("fleet_outstanding", "gauge", "Own sealed windows not yet applied back from the stream.", _fleet(lambda f: f.outstanding)),
    _Spec("fleet_outbox_capacity", "gauge", "Entries of the fleet outbox.", _fleet(lambda f: f.outbox_capacity)),
    _Spec("fleet_applied_entries", "counter", "Windows from the stream (every host's) applied here.", _fleet(lambda f: f.applied_entries)),
    _Spec("fleet_applied_signals", "counter", "Signals of the windows applied here from the stream.", _fleet(lambda f: f.applied_signals)),
    _Spec("fleet_hosts", "gauge", "Hosts whose entries this replica applied.", _fleet(lambda f: f.hosts)),
    _Spec("fleet_lag_seconds", "gauge", "Age of the oldest own window not yet applied back (0: caught up).", _fleet(lambda f: f.lag_s)),
    _Spec("fleet_paused", "gauge", "1 while learning waits for room in the outbox.", _fleet(lambda f: int(f.paused))),
    _Spec("fleet_resyncs", "counter", "Times this replica loaded the fleet's snapshot after joining.", _fleet(lambda f: f.resyncs)),
    _Spec("fleet_lost_entries", "counter", "Windows the fleet's stream lost (a Redis failover).", _fleet(lambda f: f.lost_entries)),
    _Spec("fleet_lost_signals", "counter", "Signals of the windows the stream lost.", _fleet(lambda f: f.lost_signals)),
    _Spec("fleet_bad_entries", "counter", "Malformed stream entries (skipped from the bad window on).", _fleet(lambda f: f.bad_entries)),
)

#: Per-route series (engines with a route table), labelled ``route`` too.
ROUTE_METRICS: tuple[tuple[str, str, str, Callable[[RouteStats], float | None]], ...] = (
    ("route_chosen", "counter", "Feedback naming the route as the one taken.", lambda r: r.chosen),
    ("route_best", "counter", "Feedback naming the route as the right one.", lambda r: r.best),
    # Not a counter (rewards may be negative, so the sum may fall), and a gauge must not end in _sum (promtool).
    ("route_reward_summed", "gauge", "Summed reward of the route when taken (may fall: not a counter).", lambda r: r.reward_sum),
    ("route_mean_reward", "gauge", "Mean reward of the route when taken, since the engine was created.", lambda r: r.mean_reward),
    ("route_retired", "gauge", "1 if the route is retired (never chosen or learned again).", lambda r: int(r.retired)),
    ("route_drift", "gauge", "How far the route's learned vector moved from its start (L2 norm).", lambda r: r.drift),
)

#: Per-lane series, live lanes only, labelled ``lane`` too (the owner's pid is in ``sona_shm_lane_info``, so a
#: recycled worker does not start new series).
LANE_METRICS: tuple[tuple[str, str, str, Callable[[LaneStats], float]], ...] = (
    ("lane_records", "counter", "Trajectories committed to a live lane, by all its owners.", lambda lane: lane.records),
    ("lane_drops", "counter", "Trajectories refused by a live lane, by all its owners.", lambda lane: lane.drops),
    ("lane_backlog", "gauge", "Trajectories of a live lane not yet learned.", lambda lane: lane.backlog),
    ("lane_last_record_timestamp_seconds", "gauge", "When a live lane last committed (0: never).", lambda lane: _ts(lane.last_record_at)),
)


def _family(kind: str, name: str, text: str, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(PREFIX + name, text, labels=labels)


def families(observations: Iterable[EngineStats | str]) -> list[Metric]:
    """The metric families of some engines: an :class:`EngineStats`, or the name of an engine that is not there."""
    up = GaugeMetricFamily(PREFIX + "engine_up", "1 if the engine's segment exists and was read.", labels=["engine"])
    flusher_up = GaugeMetricFamily(PREFIX + "flusher_up", "1 if a flusher holds the engine's flusher lock.", labels=["engine"])
    flusher_info = GaugeMetricFamily(
        PREFIX + "flusher_info", "1, labelled with the pid of the current (or last) flusher.", labels=["engine", "pid"]
    )
    engine = [_family(spec.kind, spec.name, spec.help, ["engine"]) for spec in ENGINE_METRICS + LEARNING_METRICS]
    lanes = [_family(kind, name, text, ["engine", "lane"]) for name, kind, text, _ in LANE_METRICS]
    lane_info = GaugeMetricFamily(
        PREFIX + "lane_info", "1, labelled with the pid of a live lane's owner.", labels=["engine", "lane", "pid"]
    )
    routes = [_family(kind, name, text, ["engine", "route"]) for name, kind, text, _ in ROUTE_METRICS]
    info = GaugeMetricFamily(PREFIX + "engine_rule", "1, labelled with the engine's learning rule.", labels=["engine", "rule"])
    fleet = [_family(spec.kind, spec.name, spec.help, ["engine"]) for spec in FLEET_METRICS]
    fleet_info = GaugeMetricFamily(
        PREFIX + "fleet_info", "1, labelled with the fleet key and host id of an engine in a fleet.", labels=["engine", "key", "host_id"]
    )
    for obs in observations:
        if isinstance(obs, str):
            up.add_metric([obs], 0)
            continue
        up.add_metric([obs.name], 1)
        flusher_up.add_metric([obs.name], int(obs.flusher.alive))
        if obs.flusher.pid:
            flusher_info.add_metric([obs.name, str(obs.flusher.pid)], 1)
        for spec, family in zip(ENGINE_METRICS + LEARNING_METRICS + FLEET_METRICS, engine + fleet):
            value = spec.value(obs)
            if value is not None:
                family.add_metric([obs.name], value)
        if obs.fleet is not None:
            fleet_info.add_metric([obs.name, obs.fleet.key, obs.fleet.host_id], 1)
        for lane in obs.live_lanes:
            labels = [obs.name, str(lane.lane)]
            lane_info.add_metric([*labels, str(lane.pid)], 1)
            for (_, _, _, value_of), family in zip(LANE_METRICS, lanes):
                family.add_metric(labels, value_of(lane))
        info.add_metric([obs.name, obs.config.rule], 1)
        for route in obs.routes:
            for (_, _, _, route_value), family in zip(ROUTE_METRICS, routes):
                value = route_value(route)
                if value is not None:
                    family.add_metric([obs.name, route.name], value)
    return [up, flusher_up, flusher_info, info, *engine, lane_info, *lanes, *routes, fleet_info, *fleet]


#: The last observation of each engine this process scraped, for every collector of the process: under the
#: multiprocess recipe a collector is made anew for each scrape, and ``adapter_up_change_norm`` would otherwise
#: never have a previous scrape to measure from.
_PREVIOUS: dict[str, EngineStats] = {}
_PREVIOUS_GUARD = threading.Lock()  # scrapes may come from several threads


class EngineCollector(Collector):
    """Exposes engines ``names`` to Prometheus; see the module docstring."""

    def __init__(self, *names: str, reader: Callable[[str], EngineStats] = read) -> None:
        if not names:
            raise TypeError("EngineCollector: expected at least one engine name")
        self.names = tuple(check_name(n) for n in names)
        self._read = reader
        self._previous = _PREVIOUS
        self._guard = _PREVIOUS_GUARD

    def collect(self) -> Iterator[Metric]:
        observations: list[EngineStats | str] = []
        with self._guard:
            for name in self.names:
                try:
                    stats = self._read(name)
                except SegmentNotFoundError:
                    self._previous.pop(name, None)
                    observations.append(name)
                    continue
                stats = stats.since(self._previous.get(name))
                self._previous[name] = stats
                observations.append(stats)
        yield from families(observations)

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets a registry refuse a second collector with the same names."""
        yield from families([])


class _Observed(Collector):
    """Collects observations already made (what ``sona-shm stats --prometheus`` prints)."""

    def __init__(self, observations: list[EngineStats | str]) -> None:
        self._observations = observations

    def collect(self) -> Iterator[Metric]:
        yield from families(self._observations)


def exposition(*observations: EngineStats | str) -> bytes:
    """The text exposition of some observations (an engine name: not there), as a scrape returns it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Observed(list(observations)))
    return generate_latest(registry)


__all__ = ["CONTENT_TYPE", "EngineCollector", "exposition", "families"]
