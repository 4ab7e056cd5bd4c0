"""The learner: Loop A's whole mutable state and the one place it changes.

A :class:`Learner` holds the adapter (``down``, ``up``), the gradient sums of the open
*window* (the signals since the last flush), the seed's counters and per-route feedback
counts. It learns batches of rows (:meth:`Learner.learn_rows`, numpy) or of lane slots
(:meth:`Learner.learn_slots`, the C twin) under the engine's rule — the reference rule
(:mod:`sona_shm.learn.reference`) or the routing rule (:mod:`sona_shm.learn.routing`) —
and every ``flush_threshold`` signals the window closes:

- by default the learner applies it itself (a *flush*: ``up += lr * G_U / n``, and ``down``
  under the routing rule), as the seed does;
- with ``stop=True`` it stops where the window is full (:attr:`Learner.window_full`) and the
  caller takes it (:meth:`Learner.close_window`) to do something else with it — a fleet
  seals it for every host to apply (:mod:`sona_shm.fleet`), a solo flusher applies it
  (:meth:`Learner.apply`).

Either way the sums are the same, bit for bit, and so is what applying them gives: the
arithmetic of a window is :func:`apply_sums` (and ``apply_row`` in ``_speedups.c``).
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

_F32_MAX = float(np.finfo(np.float32).max)

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
    """What one closed window learned: the gradient sums of its ``n`` signals.

    ``grad_up``: ``float64[R, h]``; ``grad_down``: ``float64[R, h]`` under the routing rule,
    else None. Applying it (:meth:`Learner.apply`) is a flush.
    """

    grad_up: np.ndarray
    grad_down: np.ndarray | None
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
    """Loop A's state: the adapter, the open window's gradient sums, counters, per-route counts.

    ``down``, ``up``: ``float32[rank, hidden_dim]``; ``grad_up``, ``grad_down``:
    ``float64[rank, hidden_dim]``. Under the ``reference`` rule only ``up`` learns and
    every rank row of ``grad_up`` receives the same signal; under the ``routing`` rule both
    learn from feedback. ``unit``: the engine's unit route vectors (``float32[K, h]``) or
    ``None``; ``route_chosen``/``route_best`` (``uint64[K]``) and ``route_reward``
    (``float64[K]``) count feedback per route. The arrays are updated in place, so they may
    be views into a record the owner publishes (the flusher's are). Not thread-safe; the
    owner serialises calls.
    """

    @classmethod
    def for_engine(cls, config: EngineConfig, unit: np.ndarray | None, **arrays: np.ndarray) -> Learner:
        """The learner of an engine of ``config`` (its shape, rule, lr, threshold and temperature).

        ``unit``: the route table's unit vectors (``None`` without one); ``arrays``: the
        state arrays to learn into (``down``, ``up``, ...), as :meth:`__init__` takes them.
        """
        return cls(
            config.hidden_dim,
            config.rank,
            config.lr,
            config.flush_threshold,
            rule=config.rule,
            unit=unit,
            temperature=config.temperature,
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
        down: np.ndarray | None = None,
        up: np.ndarray | None = None,
        grad_up: np.ndarray | None = None,
        grad_down: np.ndarray | None = None,
        route_chosen: np.ndarray | None = None,
        route_best: np.ndarray | None = None,
        route_reward: np.ndarray | None = None,
    ) -> None:
        self.hidden_dim = hidden_dim
        self.rank = rank
        self.lr = lr
        self.flush_threshold = flush_threshold
        self.rule = rule
        self.unit = unit
        self.temperature = temperature
        shape = (rank, hidden_dim)
        k = 0 if unit is None else unit.shape[0]
        self.down = np.empty(shape, dtype=F32) if down is None else down
        self.up = np.zeros(shape, dtype=F32) if up is None else up
        self.grad_up = np.zeros(shape, dtype=F64) if grad_up is None else grad_up
        self.grad_down = np.zeros(shape, dtype=F64) if grad_down is None else grad_down
        self.route_chosen = np.zeros(k, dtype=np.uint64) if route_chosen is None else route_chosen
        self.route_best = np.zeros(k, dtype=np.uint64) if route_best is None else route_best
        self.route_reward = np.zeros(k, dtype=F64) if route_reward is None else route_reward
        if down is None:
            self.down[...] = initial_down(hidden_dim, rank)
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
    def window_full(self) -> bool:
        """The open window holds ``flush_threshold`` signals (only a call with ``stop=True`` leaves it so)."""
        return self.pending >= self.flush_threshold

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
            if self.unit is None:
                raise InvalidInputError("learn_feedback(): this learner has no route table (unit=None)")
            return Rows(quality, route_index, best_index, None, query, (route_index >= 0) | (best_index >= 0))
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
        consumed, signals = self._learn_signals(rows, start, stop) if self.rule == "reference" else self._learn_feedback(rows, start, stop)
        self.trajectories_processed += consumed
        self.signals_accumulated += signals
        return consumed

    def _learn_signals(self, rows: Rows, start: int, stop: bool) -> tuple[int, int]:
        """Reference rule: accumulate ``signals[i] * quality[i]``; ``(rows consumed, signals)`` (every row is one)."""
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
            at += take
            if self.window_full and not stop:
                self.flush()
        return at - start, at - start

    def _learn_feedback(self, rows: Rows, start: int, stop: bool) -> tuple[int, int]:
        """Routing rule: only feedback rows are signals; ``(rows consumed, signals)``."""
        unit, query = self.unit, rows.query
        assert unit is not None and query is not None
        at_signal = start + np.flatnonzero(rows.is_signal[start:])
        taken = 0
        while taken < len(at_signal) and not (stop and self.window_full):
            take = min(self.flush_threshold - self.pending, len(at_signal) - taken)
            chunk = at_signal[taken : taken + take]
            gu, gd = routing.gradients(
                query[chunk],
                rows.route_index[chunk],
                rows.best_index[chunk],
                rows.quality[chunk],
                self.down,
                self.up,
                unit,
                self.temperature,
            )
            self.grad_up += gu
            self.grad_down += gd
            self.pending += take
            taken += take
            if self.window_full and not stop:
                self.flush()
        if stop and self.window_full and taken < len(at_signal):
            return int(at_signal[taken - 1]) + 1 - start, taken  # up to the window's last signal; the rest waits
        return len(rows) - start, taken

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
        pending, flushes, width, signals, corrupt, consumed = learn(block, geometry, first_seq, self, stop)
        self.trajectories_processed += consumed - len(corrupt)
        self.signals_accumulated += signals
        self.updates_applied += flushes * self.flush_threshold  # a threshold flush applies exactly that many
        self.flushes_performed += flushes
        self.generation += flushes
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

    def close_window(self) -> Window:
        """Take the open window's sums (zeroing them) and count it; the caller applies or seals it."""
        n = self.pending
        routing_rule = self.rule == "routing"
        window = Window(self.grad_up.copy(), self.grad_down.copy() if routing_rule else None, n)
        self.grad_up[...] = 0.0
        if routing_rule:
            self.grad_down[...] = 0.0
        self.updates_applied += n
        self.flushes_performed += 1
        self.pending = 0
        return window

    def apply(self, window: Window) -> None:
        """Apply a closed window to this learner's adapter (a flush's arithmetic, :func:`apply_sums`)."""
        apply_sums(self.up, self.down, window.grad_up, window.grad_down, self.lr / window.n)
        self.generation += 1

    def flush(self) -> bool:
        """Close and apply the open window: ``up += grad_up * lr / pending`` (``down`` too under the routing rule). False if empty."""
        if self.pending == 0:
            return False
        self.apply(self.close_window())
        return True

    def set_weights(self, up: np.ndarray, down: np.ndarray) -> None:
        """Learn from now on at this adapter (a fleet's: the stream's, with this host's windows in flight applied)."""
        self.up[...] = up
        self.down[...] = down


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
