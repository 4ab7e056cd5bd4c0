"""The numerics of SONA Loop A: micro-LoRA init, learning signals, accumulation, forward.

Everything here is vectorised over a batch of trajectories and shared by the
in-process :class:`~sona_shm.loop.InstantLoop` and the cross-process flusher, so there
is one implementation of the maths. ``docs/SEMANTICS.md`` is the specification;
the places where float32 rounding order matters (the mean baseline and the
degenerate-gradient test) follow the reference's float32, left-to-right order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import EngineConfig
from ..errors import InvalidInputError
from . import routing

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
_F32_MAX = float(np.finfo(np.float32).max)

# Finite inputs near the float32 limit can overflow the float32 arithmetic below; the
# rows concerned are detected and redone in float64 (_repair_overflow, Learner.learn), so
# numpy's warnings about it would only be noise. A filter costs nothing per call, unlike
# an np.errstate() block (~5 µs per batch here).
warnings.filterwarnings("ignore", r"(overflow|invalid value) encountered", RuntimeWarning, __name__)

#: A REINFORCE gradient at or below this L2 norm is degenerate (SEMANTICS.md §3).
DEGENERATE_NORM = 1e-8


def initial_down(hidden_dim: int, rank: int) -> np.ndarray:
    """The reference's deterministic ``down``: ``float32[rank, hidden_dim]``.

    Entry ``k`` of the flat array is ``((k * 0.618034) mod 1 - 0.5) * 0.02`` with every
    operation rounded to float32.
    """
    k = np.arange(rank * hidden_dim, dtype=F32)
    v = np.fmod(k * np.float32(0.618034), np.float32(1.0))
    v = (v - np.float32(0.5)) * np.float32(0.02)
    return v.astype(F32).reshape(rank, hidden_dim)


def learning_signals(query: np.ndarray, rewards: np.ndarray, activations: np.ndarray, n_steps: np.ndarray) -> np.ndarray:
    """REINFORCE-with-mean-baseline signals of a batch: ``float32[N, hidden_dim]``.

    ``query``: ``float32[N, h]``; ``rewards``: ``float32[N, S]``; ``activations``:
    ``float32[N, S, h]`` (shorter activations zero-padded); ``n_steps``: ``int[N]``,
    each ``<= S``. Entries at steps ``>= n_steps[i]`` are ignored whatever they hold.

    Zero-step rows: the query itself, not normalised. Other rows: ``g = Σ (r - mean r)
    · act``, divided by ``‖g‖`` when ``‖g‖ > 1e-8``; otherwise ``g = Σ r · act`` under
    the same rule (the published binary's fallback).
    """
    g, scale = signal_parts(query, rewards, activations, n_steps)
    g *= scale[:, None]
    return g


def signal_parts(query: np.ndarray, rewards: np.ndarray, activations: np.ndarray, n_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The signals of :func:`learning_signals` as ``g * scale[:, None]``, not multiplied out.

    ``g``: a new ``float32[N, h]``; ``scale``: ``float32[N]`` (``1/‖g‖`` or 1). The C
    learner (``_speedups.learn_slots``) computes the same per slot, in the same order.
    """
    n_rows, hidden = query.shape
    n_steps = np.asarray(n_steps)
    single = n_steps == 1
    if n_rows and single.all():
        # One step: baseline = reward, so every advantage is exactly 0 and the
        # reference always takes the fallback, reward * activations. Computed directly:
        # it is the common case (one model call per request), in one pass.
        g = np.multiply(np.asarray(rewards[:, 0], dtype=F32)[:, None], activations[:, 0], dtype=F32)
        norm = _row_norms(g)
        scale = _inverse_norms(norm)
        _repair_overflow(g, scale, norm, rewards[:, :1], activations[:, :1], n_steps)
        return g, scale
    g = np.empty((n_rows, hidden), dtype=F32)
    scale = np.ones(n_rows, dtype=F32)
    if n_rows == 0:
        return g, scale
    zero = n_steps == 0
    if zero.any():
        g[zero] = query[zero]
    rows: Any
    if single.any():
        rows = np.flatnonzero(single)
        g1 = np.multiply(np.asarray(rewards[rows, 0], dtype=F32)[:, None], activations[rows, 0], dtype=F32)
        norm1 = _row_norms(g1)
        scale1 = _inverse_norms(norm1)
        _repair_overflow(g1, scale1, norm1, rewards[rows, :1], activations[rows, :1], n_steps[rows])
        g[rows] = g1
        scale[rows] = scale1
    multi = n_steps > 1
    if not multi.any():
        return g, scale
    rows = slice(None) if multi.all() else np.flatnonzero(multi)
    n = n_steps[rows]
    width = int(n.max())
    r = np.asarray(rewards[rows, :width], dtype=F32)
    act = np.asarray(activations[rows, :width], dtype=F32)
    mask = np.arange(width) < n[:, None]
    if not mask.all():
        # Steps past a row's count may hold anything (stale slots); zero them so that
        # neither the sums nor a stray non-finite value can leak into the signal.
        r = np.where(mask, r, np.float32(0))
        act = np.where(mask[:, :, None], act, np.float32(0))

    # The reference sums rewards left to right in float32; a float64 mean would hide
    # residuals like 0.2f + 0.9f that decide which branch below is taken.
    total = r[:, 0].copy()
    for s in range(1, width):
        total += r[:, s]
    baseline = total / n.astype(F32)
    adv = np.where(mask, r - baseline[:, None], np.float32(0))
    gm = _weighted_step_sum(adv, act)
    norm = _row_norms(gm)
    degenerate = norm <= DEGENERATE_NORM
    if degenerate.any():
        fallback = _weighted_step_sum(r[degenerate], act[degenerate])
        gm[degenerate] = fallback
        norm[degenerate] = _row_norms(fallback)
    scale_m = _inverse_norms(norm)
    _repair_overflow(gm, scale_m, norm, r, act, n)
    g[rows] = gm
    scale[rows] = scale_m
    return g, scale


def _repair_overflow(g: np.ndarray, scale: np.ndarray, norm: np.ndarray, r: np.ndarray, act: np.ndarray, n: np.ndarray) -> None:
    """Redo in float64, in place, the rows whose float32 sums overflowed (``norm`` not finite).

    Finite inputs near the float32 limit overflow the reference's float32 arithmetic,
    which then yields NaN; float64 cannot overflow here, so no finite trajectory puts
    NaN/Inf into the gradient. The redone rows come back normalised (``scale`` 1).
    """
    overflowed = ~np.isfinite(norm)
    if overflowed.any():
        width = r.shape[1]
        mask = np.arange(width) < n[overflowed, None]
        g[overflowed] = _signals_f64(np.asarray(r[overflowed], dtype=F32), np.asarray(act[overflowed], dtype=F32), mask, n[overflowed])
        scale[overflowed] = 1.0


def _inverse_norms(norm: np.ndarray) -> np.ndarray:
    """``1/norm`` where the norm exceeds ``DEGENERATE_NORM``, else 1 (left as it is)."""
    return np.where(norm > DEGENERATE_NORM, np.float32(1) / np.maximum(norm, np.float32(DEGENERATE_NORM)), np.float32(1))


def _signals_f64(r: np.ndarray, act: np.ndarray, mask: np.ndarray, n: np.ndarray) -> np.ndarray:
    """:func:`learning_signals` of stepped rows in float64 (for rows whose float32 sums overflow)."""
    r64 = np.where(mask, r.astype(F64), 0.0)
    act64 = act.astype(F64)
    adv = np.where(mask, r64 - (r64.sum(axis=1) / n)[:, None], 0.0)
    g = np.einsum("ks,ksh->kh", adv, act64)
    norm = np.sqrt(np.einsum("kh,kh->k", g, g))
    degenerate = norm <= DEGENERATE_NORM
    if degenerate.any():
        g[degenerate] = np.einsum("ks,ksh->kh", r64[degenerate], act64[degenerate])
        norm[degenerate] = np.sqrt(np.einsum("kh,kh->k", g[degenerate], g[degenerate]))
    big = norm > DEGENERATE_NORM
    g[big] /= norm[big, None]
    return g.astype(F32)


def _weighted_step_sum(weights: np.ndarray, act: np.ndarray) -> np.ndarray:
    """``Σ_s weights[:, s] * act[:, s]`` in float32, steps added left to right.

    A batched ``(1, S) @ (S, h)`` product: numpy's loop for it adds the ``S`` products
    of each output in step order, as the reference does, at a quarter of the cost of
    one multiply-add pass per step.
    """
    return (weights[:, None, :] @ act)[:, 0]


def _row_norms(g: np.ndarray) -> np.ndarray:
    """L2 norm of each row, in float32 like the reference (and ~40x faster than a
    float64 copy here: numpy's float32->float64 cast runs at ~9 ns per element)."""
    return np.sqrt(np.einsum("ij,ij->i", g, g))


@dataclass(frozen=True, slots=True)
class LoopMetrics:
    """The seed's four counters (``InstantLoopMetrics``)."""

    trajectories_processed: int
    signals_accumulated: int
    flushes_performed: int
    updates_applied: int


class Learner:
    """Loop A's whole mutable state: the adapter, the gradient sums, counters, per-route counts.

    ``down``, ``up``: ``float32[rank, hidden_dim]``; ``grad_up``, ``grad_down``:
    ``float64[rank, hidden_dim]``. Under the ``reference`` rule only ``up`` learns and
    every rank row of ``grad_up`` receives the same signal (:meth:`learn`); under the
    ``routing`` rule both learn from feedback (:meth:`learn_feedback`,
    :mod:`sona_shm.learn.routing`). ``unit``: the engine's unit route vectors
    (``float32[K, h]``) or ``None``; ``route_chosen``/``route_best`` (``uint64[K]``) and
    ``route_reward`` (``float64[K]``) count feedback per route (:meth:`count_routes`).
    The arrays are updated in place, so they may be views into a record the owner
    publishes (the flusher does). Not thread-safe; the owner serialises calls.
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
        #: Called instead of applying at a flush when set (a fleet seals the window instead: it
        #: takes the sums and zeroes them, see sona_shm.fleet.member); the weights stay as they are.
        self.sealer: Callable[[], None] | None = None
        self.pending = 0  # signals accumulated since the last flush (the reference's update_count)
        self.generation = 0  # bumped whenever the adapter changes
        self.trajectories_processed = 0
        self.signals_accumulated = 0
        self.flushes_performed = 0
        self.updates_applied = 0

    @property
    def scale(self) -> float:
        return 1.0 / np.sqrt(self.rank)

    @property
    def metrics(self) -> LoopMetrics:
        return LoopMetrics(self.trajectories_processed, self.signals_accumulated, self.flushes_performed, self.updates_applied)

    def learn(self, signals: np.ndarray, quality: np.ndarray) -> int:
        """Reference rule: accumulate ``signals[i] * quality[i]`` in order, flushing at every threshold.

        The batch is cut exactly where a one-by-one replay would have flushed, so the
        result equals feeding the trajectories singly. Returns the number of flushes.
        """
        n = signals.shape[0]
        if n == 0:
            return 0
        quality = np.asarray(quality, dtype=F32)
        flushes = 0
        start = 0
        while start < n:
            take = min(self.flush_threshold - self.pending, n - start)
            # Σ quality_i * signal_i over the chunk as one float32 BLAS product; the
            # running accumulator is float64 so long runs between flushes stay exact.
            chunk = quality[start : start + take] @ signals[start : start + take]
            if not np.isfinite(chunk).all():  # float32 overflow of huge finite inputs: redo exactly
                chunk = quality[start : start + take].astype(F64) @ signals[start : start + take].astype(F64)
            self.grad_up += chunk
            self.pending += take
            start += take
            if self.pending >= self.flush_threshold:
                self.flush()
                flushes += 1
        self.trajectories_processed += n
        self.signals_accumulated += n
        return flushes

    def learn_feedback(self, query: np.ndarray, route_index: np.ndarray, best_index: np.ndarray, reward: np.ndarray) -> int:
        """Routing rule: learn a batch of trajectories in order; only feedback rows are signals.

        ``query``: ``float32[n, h]``; ``route_index``/``best_index``: ``int[n]``, -1 for
        none (a row with neither is an ordinary trajectory: processed, not a signal);
        ``reward``: ``[n]`` (the bandit reward, a trajectory's quality). Gradients are
        cut at every flush as in :meth:`learn`. Returns the number of flushes.
        """
        unit = self.unit
        if unit is None:
            raise InvalidInputError("learn_feedback(): this learner has no route table (unit=None)")
        route_index = np.asarray(route_index, dtype=np.int64)
        best_index = np.asarray(best_index, dtype=np.int64)
        n = route_index.shape[0]
        rows = np.flatnonzero((route_index >= 0) | (best_index >= 0))
        flushes = 0
        start = 0
        while start < len(rows):
            take = min(self.flush_threshold - self.pending, len(rows) - start)
            chunk = rows[start : start + take]
            gu, gd = routing.gradients(
                query[chunk],
                route_index[chunk],
                best_index[chunk],
                np.asarray(reward)[chunk],
                self.down,
                self.up,
                unit,
                self.temperature,
            )
            self.grad_up += gu
            self.grad_down += gd
            self.pending += take
            start += take
            if self.pending >= self.flush_threshold:
                self.flush()
                flushes += 1
        self.trajectories_processed += n
        self.signals_accumulated += len(rows)
        return flushes

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

    def account(self, learned: int, signals: int, pending: int, flushes: int) -> None:
        """Count a batch that ``_speedups`` learned into this learner's arrays."""
        self.trajectories_processed += learned
        self.signals_accumulated += signals
        self.updates_applied += flushes * self.flush_threshold  # a threshold flush applies exactly that many
        self.flushes_performed += flushes
        self.generation += flushes
        self.pending = pending

    def flush(self) -> bool:
        """Apply pending gradients: ``up += grad_up * lr / pending`` (and ``down`` likewise under the routing rule). False if none.

        With a :attr:`sealer`, hand the window to it instead (it applies nothing here).
        """
        if self.pending == 0:
            return False
        if self.sealer is not None:
            self.sealer()
            return True
        routing = self.rule == "routing"
        apply_sums(self.up, self.down, self.grad_up, self.grad_down if routing else None, self.lr / self.pending)
        self.grad_up[...] = 0.0
        if routing:
            self.grad_down[...] = 0.0
        self.updates_applied += self.pending
        self.flushes_performed += 1
        self.pending = 0
        self.generation += 1
        return True


def apply_sums(up: np.ndarray, down: np.ndarray, grad_up: np.ndarray, grad_down: np.ndarray | None, step: float) -> None:
    """A flush's arithmetic, in place: ``up = f32(clip(f64(up) + grad_up * step))`` (``down`` likewise when
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
