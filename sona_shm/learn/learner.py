"""The learner: Loop A's whole mutable state and the one place it changes.

A :class:`Learner` holds the published adapter (``down``, ``up``) and route table
(``route_vectors``, ``route_bias``, ``route_state``), what the open *window* learned (the
reference rule's gradient sums ``grad_up``; the routing rule's working copy ``work_*`` and
its centre), the seed's counters and per-route feedback counts. It learns batches of rows
(:meth:`Learner.learn_rows`, numpy) or of lane slots (:meth:`Learner.learn_slots`, the C
twin) under the engine's rule — the reference rule (:mod:`sona_shm.learn.reference`) or the
routing rule (:mod:`sona_shm.learn.routing`) — and every window (``flush_threshold``
signals; under the routing rule a window that grows up to it) closes:

- by default the learner applies it itself (a *flush*: ``up += lr * G_U / n``, and ``down``
  under the routing rule), as the seed does;
- with ``stop=True`` it stops where the window is full (:attr:`Learner.window_full`) and the
  caller takes it (:meth:`Learner.close_window`) to do something else with it — a fleet
  seals it for every host to apply (:mod:`sona_shm.fleet`), a solo flusher applies it
  (:meth:`Learner.apply`).

Either way what a window carries is the same, bit for bit, and so is what applying it gives:
the reference rule's :func:`apply_sums` (``apply_row`` in ``_speedups.c``), the routing rule's
:func:`apply_deltas`.
Nothing outside this class writes its counters or weights; the flusher maps them to and
from its ledger record in one place (:func:`sona_shm.shm.ledger.learner_over`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import EngineConfig
from ..errors import InvalidInputError
from ..native import speedups as _speedups
from . import routing
from .reference import F32, F64, initial_down, learning_signals
from .routes import ACTIVE, RETIRED

_F32_MAX = float(np.finfo(np.float32).max)

#: The state arrays of a learner (views of a ledger record's fields of the same names, or private).
STATE_ARRAYS = (
    "down",
    "up",
    "grad_up",
    "route_chosen",
    "route_best",
    "route_reward",
    "route_vectors",
    "route_bias",
    "route_state",
    "work_up",
    "work_down",
    "work_vectors",
    "work_bias",
    "route_centre",
)

# A chunk's float32 sum of huge finite signals may overflow; it is detected and redone in
# float64 (_learn_signals), so numpy's warning would only be noise (see reference.py).
warnings.filterwarnings("ignore", r"(overflow|invalid value) encountered", RuntimeWarning, __name__)


@dataclass(frozen=True, slots=True)
class LoopMetrics:
    """The seed's four counters (``InstantLoopMetrics``)."""

    trajectories_processed: int
    signals_accumulated: int
    flushes_performed: int
    updates_applied: int


@dataclass(frozen=True)
class Window:
    """What one closed window of the reference rule learned: the gradient sums of its ``n`` signals.

    ``grad_up``: ``float64[R, h]``. Applying it (:meth:`Learner.apply`) is a flush: ``up += lr * grad_up / n``.
    """

    grad_up: np.ndarray
    n: int


@dataclass(frozen=True)
class DeltaWindow:
    """What one closed window of the routing rule learned: float32 deltas, ``working - published``.

    ``up``, ``down``: ``float32[R, h]`` (None while the adapter does not learn); ``bias``:
    ``float32[K]`` (every route in use); ``rows``: ``int64[m]`` the route rows it touched, ascending, ``vectors``:
    ``float32[m, h]`` their deltas; ``n``: its signals. Applying it (:func:`apply_deltas`) adds them.
    """

    up: np.ndarray | None
    down: np.ndarray | None
    bias: np.ndarray
    rows: np.ndarray
    vectors: np.ndarray
    n: int


@dataclass(frozen=True)
class Rows:
    """A batch of learnable rows, prepared once (:meth:`Learner.rows`) and learned in order (:meth:`Learner.learn_rows`).

    ``quality``: ``float32[n]`` (a bandit feedback's reward); ``route_index``/``best_index``:
    ``int64[n]``, -1 for none; ``signals``: the reference rule's ``float32[n, h]`` (else None);
    ``query``: the routing rule's ``float32[n, h]`` (else None); ``is_signal``: ``bool[n]``.
    """

    quality: np.ndarray
    route_index: np.ndarray
    best_index: np.ndarray
    signals: np.ndarray | None
    query: np.ndarray | None
    is_signal: np.ndarray

    def __len__(self) -> int:
        return int(self.quality.shape[0])


class Learner:
    """Loop A's state: the published adapter and route table, the open window, counters, per-route counts.

    ``down``, ``up``: ``float32[rank, hidden_dim]``. Under the ``reference`` rule only ``up``
    learns, from the window's sums ``grad_up`` (``float64[rank, hidden_dim]``, every rank row
    the same signal). Under the ``routing`` rule the route table learns — ``route_vectors``
    (``float32[max_routes, h]``) and ``route_bias`` (``float32[max_routes]``), and the adapter
    with ``adapter_lr`` — one feedback at a time on the working copy (``work_up``,
    ``work_down``, ``work_vectors``, ``work_bias``, and the centre ``route_centre``), published
    by windows. ``route_state`` (``uint8[max_routes]``: free, active, retired) and
    ``routes_used`` say which rows hold routes; ``route_chosen``/``route_best`` (``uint64``)
    and ``route_reward`` (``float64``) count feedback per route. The arrays are updated in
    place, so they may be views into a record the owner publishes (the flusher's are). Not
    thread-safe; the owner serialises calls.
    """

    @classmethod
    def for_engine(cls, config: EngineConfig, unit: np.ndarray | None = None, **arrays: Any) -> Learner:
        """The learner of an engine of ``config`` (its shape, rule, learning rates, threshold, temperature, route rows).

        ``unit``: the route table's unit vectors, the published route table's start (``None``
        without one, or when ``arrays`` hold the table); ``arrays``: the state arrays to learn
        into (``down``, ``up``, ...), as :meth:`__init__` takes them.
        """
        return cls(
            config.hidden_dim,
            config.rank,
            config.lr,
            config.flush_threshold,
            rule=config.rule,
            unit=unit,
            temperature=config.temperature,
            adapter_lr=config.adapter_lr,
            max_routes=config.max_routes,
            **arrays,
        )

    def __init__(
        self,
        hidden_dim: int,
        rank: int,
        lr: float,
        flush_threshold: int,
        *,
        rule: str = "reference",
        unit: np.ndarray | None = None,
        temperature: float = 10.0,
        adapter_lr: float = 0.0,
        max_routes: int | None = None,
        routes_used: int | None = None,
        **arrays: np.ndarray,
    ) -> None:
        """``arrays``: the state to learn into (views of a record, say), by field name (:data:`STATE_ARRAYS`);
        missing ones start fresh: the reference's ``down``, zero ``up`` and sums, the route table's ``unit`` rows."""
        unknown = sorted(set(arrays) - set(STATE_ARRAYS))
        if unknown:
            raise TypeError(f"Learner(): unknown state arrays {unknown}")
        self.hidden_dim = hidden_dim
        self.rank = rank
        self.lr = lr
        self.flush_threshold = flush_threshold
        self.rule = rule
        self.temperature = temperature
        self.adapter_lr = adapter_lr
        k = 0 if unit is None else unit.shape[0]
        km = k if max_routes is None else max_routes
        routing_rule = rule == "routing"
        kw, hw = (km, hidden_dim) if routing_rule else (0, 0)
        fresh = {
            "down": lambda: initial_down(hidden_dim, rank),
            "up": lambda: np.zeros((rank, hidden_dim), F32),
            "grad_up": lambda: np.zeros((rank, hidden_dim), F64),
            "route_chosen": lambda: np.zeros(km, np.uint64),
            "route_best": lambda: np.zeros(km, np.uint64),
            "route_reward": lambda: np.zeros(km, F64),
            "route_vectors": lambda: np.zeros((km, hidden_dim), F32),
            "route_bias": lambda: np.zeros(km, F32),
            "route_state": lambda: np.zeros(km, np.uint8),
            "work_up": lambda: np.zeros((rank if routing_rule else 0, hidden_dim), F32),
            "work_down": lambda: np.zeros((rank if routing_rule else 0, hidden_dim), F32),
            "work_vectors": lambda: np.zeros((kw, hidden_dim), F32),
            "work_bias": lambda: np.zeros(kw, F32),
            "route_centre": lambda: np.zeros(hw, F64),
        }
        for name, make in fresh.items():
            setattr(self, name, arrays[name] if name in arrays else make())
        self.down: np.ndarray
        self.up: np.ndarray
        self.grad_up: np.ndarray
        self.route_chosen: np.ndarray
        self.route_best: np.ndarray
        self.route_reward: np.ndarray
        self.route_vectors: np.ndarray
        self.route_bias: np.ndarray
        self.route_state: np.ndarray
        self.work_up: np.ndarray
        self.work_down: np.ndarray
        self.work_vectors: np.ndarray
        self.work_bias: np.ndarray
        self.route_centre: np.ndarray
        if unit is not None and "route_vectors" not in arrays:  # a new table: the cosine router's start
            self.route_vectors[:k] = unit
            self.route_state[:k] = ACTIVE
        self.routes_used = k if routes_used is None else routes_used
        if routing_rule and not ({"work_up", "work_vectors"} & set(arrays)):
            self._reset_working()
        self.pending = 0  # signals in the open window (the reference's update_count)
        self.generation = 0  # bumped whenever this learner's adapter changes
        self.trajectories_processed = 0
        self.signals_accumulated = 0
        self.flushes_performed = 0  # windows closed
        self.updates_applied = 0  # signals of the windows closed

    @property
    def scale(self) -> float:
        return 1.0 / np.sqrt(self.rank)

    @property
    def metrics(self) -> LoopMetrics:
        return LoopMetrics(self.trajectories_processed, self.signals_accumulated, self.flushes_performed, self.updates_applied)

    @property
    def unit(self) -> np.ndarray | None:
        """``float32[K, h]``: the published route vectors of the routes in use (None without a table)."""
        return self.route_vectors[: self.routes_used] if self.routes_used else None

    @property
    def window_size(self) -> int:
        """Signals in the open window when it closes: ``flush_threshold``, or under the routing rule a window that
        grows with the signals before it (:func:`sona_shm.learn.routing.window_size`)."""
        if self.rule == "routing":
            return routing.window_size(self.signals_accumulated - self.pending, self.flush_threshold)
        return self.flush_threshold

    @property
    def window_full(self) -> bool:
        """The open window holds :attr:`window_size` signals (only a call with ``stop=True`` leaves it so)."""
        return self.pending >= self.window_size

    def _reset_working(self) -> None:
        """The routing rule's working copy := the published state (after a window, or a new state)."""
        self.work_up[...] = self.up
        self.work_down[...] = self.down
        self.work_vectors[...] = self.route_vectors
        self.work_bias[...] = self.route_bias

    # ----------------------------------------------------------------- learning

    def rows(
        self,
        query: np.ndarray,
        quality: np.ndarray,
        route_index: np.ndarray,
        best_index: np.ndarray,
        rewards: np.ndarray | None = None,
        activations: np.ndarray | None = None,
        n_steps: np.ndarray | None = None,
    ) -> Rows:
        """Prepare validated rows for :meth:`learn_rows`: the reference rule's signals are computed here, once.

        ``query``: ``float32[n, h]``; ``quality``: ``[n]``; ``route_index``/``best_index``:
        ``int[n]`` (-1: none); the reference rule also needs ``rewards`` (``float32[n, S]``),
        ``activations`` (``float32[n, S, h]``) and ``n_steps`` (``int[n]``) — see
        :func:`~sona_shm.learn.reference.learning_signals`.
        """
        route_index = np.asarray(route_index, dtype=np.int64)
        best_index = np.asarray(best_index, dtype=np.int64)
        quality = np.asarray(quality, dtype=F32)
        if self.rule == "routing":
            if not self.routes_used:
                raise InvalidInputError("learn_feedback(): this learner has no route table")
            return Rows(quality, route_index, best_index, None, np.asarray(query, dtype=F32), (route_index >= 0) | (best_index >= 0))
        assert rewards is not None and activations is not None and n_steps is not None  # the reference rule's inputs
        signals = learning_signals(query, rewards, activations, n_steps) if len(quality) else np.zeros((0, self.hidden_dim), F32)
        return Rows(quality, route_index, best_index, signals, None, np.ones(len(quality), bool))

    def learn_rows(self, rows: Rows, start: int = 0, *, stop: bool = False) -> int:
        """Learn ``rows[start:]`` in order; the number of rows consumed.

        Every ``flush_threshold`` signals the window closes: applied here (the batch is cut
        exactly where a one-by-one replay would flush, so the result equals feeding the rows
        singly), or with ``stop`` left full for the caller, returning at once after its last
        signal. Feedback is counted per route for the rows consumed.
        """
        consumed = self._learn(rows, start, stop)
        end = start + consumed
        self.count_routes(rows.route_index[start:end], rows.best_index[start:end], rows.quality[start:end])
        return consumed

    def _learn(self, rows: Rows, start: int, stop: bool) -> int:
        """:meth:`learn_rows` without the per-route counts."""
        if len(rows) - start <= 0:
            return 0
        consumed = self._learn_signals(rows, start, stop) if self.rule == "reference" else self._learn_feedback(rows, start, stop)
        self.trajectories_processed += consumed
        return consumed

    def _learn_signals(self, rows: Rows, start: int, stop: bool) -> int:
        """Reference rule: accumulate ``signals[i] * quality[i]`` (every row is a signal); the rows consumed."""
        signals, quality = rows.signals, rows.quality
        assert signals is not None
        n = len(rows)
        at = start
        while at < n and not (stop and self.window_full):
            take = min(self.flush_threshold - self.pending, n - at)
            # Σ quality_i * signal_i over the chunk as one float32 BLAS product; the
            # running accumulator is float64 so long runs between flushes stay exact.
            chunk = quality[at : at + take] @ signals[at : at + take]
            if not np.isfinite(chunk).all():  # float32 overflow of huge finite inputs: redo exactly
                chunk = quality[at : at + take].astype(F64) @ signals[at : at + take].astype(F64)
            self.grad_up += chunk
            self.pending += take
            self.signals_accumulated += take
            at += take
            if self.window_full and not stop:
                self.flush()
        return at - start

    def _learn_feedback(self, rows: Rows, start: int, stop: bool) -> int:
        """Routing rule: one feedback at a time on the working copy (:func:`sona_shm.learn.routing.step`);
        only feedback rows are signals. The rows consumed: all, or with ``stop`` up to a full window's last signal."""
        query = rows.query
        assert query is not None
        if _speedups is not None and _c_rows(query, rows):
            consumed, self.pending, flushes, applied, signals = _speedups.learn_routing_rows(
                query, rows.route_index, rows.best_index, rows.quality, start, self, stop
            )
            self._count_windows(flushes, applied, signals)
            return consumed
        active = self.route_state[: self.routes_used] == ACTIVE
        for i in range(start, len(rows)):
            if not rows.is_signal[i]:
                continue
            self.pending += 1
            self.signals_accumulated += 1
            route, best = int(rows.route_index[i]), int(rows.best_index[i])
            if (route < 0 or active[route]) and (best < 0 or active[best]):  # one on a retired route teaches nothing
                k = self.routes_used
                routing.step(
                    self.work_up,
                    self.work_down,
                    self.work_vectors[:k],
                    self.work_bias[:k],
                    self.route_centre,
                    active,
                    query[i],
                    route,
                    best,
                    float(rows.quality[i]),
                    n=self.signals_accumulated,
                    lr=self.lr,
                    adapter_lr=self.adapter_lr,
                    temperature=self.temperature,
                )
            if self.window_full:
                if stop:
                    return i + 1 - start  # up to the window's last signal; the rest waits
                self.flush()
        return len(rows) - start

    def _count_windows(self, flushes: int, applied: int, signals: int) -> None:
        """Count windows the C learner closed and applied itself, and the signals it learned."""
        self.signals_accumulated += signals
        self.updates_applied += applied
        self.flushes_performed += flushes
        self.generation += flushes

    def learn(self, signals: np.ndarray, quality: np.ndarray) -> int:
        """Reference rule: learn ready-made ``signals`` (``float32[n, h]``) times ``quality``; the number of flushes.

        Like :meth:`learn_feedback` it counts nothing per route."""
        n = len(quality)
        none = np.full(n, -1, np.int64)
        before = self.flushes_performed
        self._learn(Rows(np.asarray(quality, dtype=F32), none, none, signals, None, np.ones(n, bool)), 0, False)
        return self.flushes_performed - before

    def learn_feedback(self, query: np.ndarray, route_index: np.ndarray, best_index: np.ndarray, reward: np.ndarray) -> int:
        """Routing rule: learn a batch of trajectories in order (only feedback rows are signals); the number of flushes.

        ``query``: ``float32[n, h]``; ``route_index``/``best_index``: ``int[n]``, -1 for
        none (a row with neither is an ordinary trajectory: processed, not a signal);
        ``reward``: ``[n]`` (the bandit reward, a trajectory's quality). Unlike
        :meth:`learn_rows` this counts nothing per route (:meth:`count_routes` does).
        """
        before = self.flushes_performed
        self._learn(self.rows(query, reward, route_index, best_index), 0, False)
        return self.flushes_performed - before

    def learn_slots(self, block: np.ndarray, geometry: Any, first_seq: int, *, stop: bool = False) -> tuple[int, list[int], int]:
        """Learn consecutive lane slots with the C twin of the rule, in place; needs the C module.

        ``block``: ``uint8[count, slot_bytes]``, slot ``i`` stamped ``first_seq + i``;
        ``geometry``: the segment's (``Layout.geometry``). Returns the most steps a learned slot
        had, the indices of the slots that failed their checks (learned from nothing, see
        :func:`sona_shm.shm.slots.check`) and the number of slots consumed (``count`` unless
        ``stop`` made it return at a full window).
        """
        assert _speedups is not None
        learn = _speedups.learn_routing if self.rule == "routing" else _speedups.learn_slots
        pending, flushes, applied, width, signals, corrupt, consumed = learn(block, geometry, first_seq, self, stop)
        self.trajectories_processed += consumed - len(corrupt)
        self._count_windows(flushes, applied, signals)
        self.pending = pending
        return width, corrupt, consumed

    def count_routes(self, route_index: np.ndarray, best_index: np.ndarray, quality: np.ndarray) -> None:
        """Count a batch's feedback per route: taken, right, and the reward of the route taken.

        The reward of a taken route is the trajectory's quality (bandit), or 1.0 / 0.0
        when a full-information feedback says whether it was the right one.
        """
        if not len(self.route_chosen):
            return
        route_index = np.asarray(route_index, dtype=np.int64)
        best_index = np.asarray(best_index, dtype=np.int64)
        taken = route_index >= 0
        if taken.any():
            a = route_index[taken]
            b = best_index[taken]
            r = np.where(b >= 0, (a == b).astype(F64), np.asarray(quality, dtype=F64)[taken])
            np.add.at(self.route_chosen, a, np.uint64(1))
            np.add.at(self.route_reward, a, r)
        right = best_index >= 0
        if right.any():
            np.add.at(self.route_best, best_index[right], np.uint64(1))

    # ----------------------------------------------------------------- windows

    def close_window(self) -> Window | DeltaWindow:
        """Take the open window (the reference rule's sums, zeroed; the routing rule's deltas ``working -
        published``) and count it; the caller applies or seals it."""
        n = self.pending
        self.updates_applied += n
        self.flushes_performed += 1
        self.pending = 0
        if self.rule == "reference":
            window = Window(self.grad_up.copy(), n)
            self.grad_up[...] = 0.0
            return window
        k = self.routes_used
        rows = np.flatnonzero((self.work_vectors[:k] != self.route_vectors[:k]).any(axis=1))
        learns_adapter = self.adapter_lr > 0
        return DeltaWindow(
            _delta(self.work_up, self.up) if learns_adapter else None,
            _delta(self.work_down, self.down) if learns_adapter else None,
            _delta(self.work_bias[:k], self.route_bias[:k]),
            rows,
            _delta(self.work_vectors[rows], self.route_vectors[rows]),
            n,
        )

    def apply(self, window: Window | DeltaWindow) -> None:
        """Apply a closed window to this learner's published state (a flush); the routing rule's working copy
        becomes the new published state."""
        if isinstance(window, Window):
            apply_sums(self.up, self.down, window.grad_up, None, self.lr / window.n)
        else:
            apply_deltas(self.up, self.down, self.route_vectors, self.route_bias, window)
            self._reset_working()
        self.generation += 1

    def flush(self) -> bool:
        """Close and apply the open window (the reference rule: ``up += grad_up * lr / pending``). False if empty."""
        if self.pending == 0:
            return False
        self.apply(self.close_window())
        return True

    # ----------------------------------------------------------------- the route table

    def add_route(self, unit: np.ndarray) -> int:
        """Start route ``routes_used`` at unit vector ``unit`` (``float32[h]``) with bias 0: published and working
        alike, so nothing of the open window changes; its index. The caller checked there is a free row."""
        k = self.routes_used
        for table in (self.route_vectors, self.work_vectors):
            if len(table):
                table[k] = unit
        for bias in (self.route_bias, self.work_bias):
            if len(bias):
                bias[k] = 0.0
        self.route_chosen[k] = self.route_best[k] = 0
        self.route_reward[k] = 0.0
        self.route_state[k] = ACTIVE
        self.routes_used = k + 1
        self.generation += 1  # the published table changed: workers reload it
        return k

    def retire_route(self, index: int) -> None:
        """Route ``index`` is never chosen or learned again; its row and counts stay."""
        self.route_state[index] = RETIRED
        self.generation += 1

    def set_weights(self, up: np.ndarray, down: np.ndarray, vectors: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        """Learn from now on at this published state (a fleet's: the stream's, with this host's windows in flight
        applied). The routing rule's open window moves along: its working copy keeps what it learned on top."""
        if self.rule == "routing":
            assert vectors is not None and bias is not None
            for work, old, new in ((self.work_up, self.up, up), (self.work_down, self.down, down)):
                work[...] = (work.astype(F64) + (new.astype(F64) - old.astype(F64))).astype(F32)
            k = len(vectors)
            moved = vectors.astype(F64) - self.route_vectors[:k].astype(F64)
            self.work_vectors[:k] = (self.work_vectors[:k].astype(F64) + moved).astype(F32)
            self.work_bias[:k] = (self.work_bias[:k].astype(F64) + (bias.astype(F64) - self.route_bias[:k].astype(F64))).astype(F32)
            self.route_vectors[:k] = vectors
            self.route_bias[:k] = bias
        self.up[...] = up
        self.down[...] = down


def _delta(work: np.ndarray, published: np.ndarray) -> np.ndarray:
    """``float32(work - published)`` (computed in float64): what a routing window carries."""
    return (work.astype(F64) - published.astype(F64)).astype(F32)


def apply_deltas(up: np.ndarray, down: np.ndarray, vectors: np.ndarray, bias: np.ndarray, window: DeltaWindow) -> None:
    """A routing window's arithmetic, in place: every published value ``x = f32(clip(f64(x) + f64(delta)))``, the one
    every replica of a fleet applies too (``apply_deltas_window`` in ``_speedups.c`` gives the same bits)."""
    if window.up is not None and window.down is not None:
        up[...] = _saturated(up.astype(F64) + window.up.astype(F64))
        down[...] = _saturated(down.astype(F64) + window.down.astype(F64))
    k = len(window.bias)
    bias[:k] = _saturated(bias[:k].astype(F64) + window.bias.astype(F64))
    if len(window.rows):
        vectors[window.rows] = _saturated(vectors[window.rows].astype(F64) + window.vectors.astype(F64))


def apply_sums(up: np.ndarray, down: np.ndarray, grad_up: np.ndarray, grad_down: np.ndarray | None, step: float) -> None:
    """A window's arithmetic, in place: ``up = f32(clip(f64(up) + grad_up * step))`` (``down`` likewise when
    ``grad_down`` is given), element by element with no fused multiply-add, so every caller (the learner, a
    fleet replica applying a sealed window) and ``apply_row`` in ``_speedups.c`` agree bit for bit.
    ``grad_up`` may have one row, applied to every row of ``up``."""
    up[...] = _saturated(up.astype(F64) + grad_up * step)
    if grad_down is not None:
        down[...] = _saturated(down.astype(F64) + grad_down * step)


def _saturated(values: np.ndarray) -> np.ndarray:
    # Saturate rather than overflow: the weights stay finite whatever finite input was learned
    # (the reference would store ±inf; values inside float32 range are untouched).
    return np.clip(values, -_F32_MAX, _F32_MAX, out=values)


def apply_adapter(x: np.ndarray, down: np.ndarray, up_scaled: np.ndarray) -> np.ndarray:
    """``x + Σ_r (down_r · x) * scale * up_r`` for ``float32[h]`` or ``float32[n, h]``."""
    return x + (x @ down.T) @ up_scaled


def _c_rows(query: np.ndarray, rows: Rows) -> bool:
    """Whether the C twin takes these rows as they are (C-contiguous native arrays of the expected dtypes)."""
    return bool(
        query.dtype == F32
        and query.flags.c_contiguous
        and rows.route_index.dtype == np.int64
        and rows.best_index.dtype == np.int64
        and rows.quality.dtype == F32
        and rows.route_index.flags.c_contiguous
        and rows.best_index.flags.c_contiguous
        and rows.quality.flags.c_contiguous
    )


def learn_block(learner: Learner, layout: Any, block: np.ndarray, first_seq: int, stop: bool = False) -> tuple[int, list[int], int]:
    """:meth:`Learner.learn_slots` with the geometry of ``layout`` (a :class:`~sona_shm.shm.layout.Layout`)."""
    return learner.learn_slots(block, layout.geometry, first_seq, stop=stop)


__all__ = [
    "F32",
    "F64",
    "Learner",
    "LoopMetrics",
    "Rows",
    "Window",
    "apply_adapter",
    "apply_sums",
    "initial_down",
    "learn_block",
    "learning_signals",
]
