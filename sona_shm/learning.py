"""The numerics of SONA Loop A: micro-LoRA init, learning signals, accumulation, forward.

Everything here is vectorised over a batch of trajectories and shared by the
in-process :class:`~sona_shm.loop.InstantLoop` and the cross-process flusher, so there
is one implementation of the maths. ``reference/SEMANTICS.md`` is the specification;
the places where float32 rounding order matters (the mean baseline and the
degenerate-gradient test) follow the reference's float32, left-to-right order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
_F32_MAX = float(np.finfo(np.float32).max)

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
    n_rows = query.shape[0]
    out = np.array(query, dtype=F32, copy=True)
    if n_rows == 0:
        return out
    n_steps = np.asarray(n_steps)
    stepped = n_steps > 0
    if not stepped.any():
        return out
    rows = slice(None) if stepped.all() else np.flatnonzero(stepped)
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

    # Overflow is dealt with below (rows redone in float64), so numpy need not warn of it.
    with np.errstate(over="ignore", invalid="ignore"):
        # The reference sums rewards left to right in float32; a float64 mean would hide
        # residuals like 0.2f + 0.9f that decide which branch below is taken.
        total = r[:, 0].copy()
        for s in range(1, width):
            total += r[:, s]
        baseline = total / n.astype(F32)
        adv = np.where(mask, r - baseline[:, None], np.float32(0))
        g = _weighted_step_sum(adv, act)
        norm = _row_norms(g)
        degenerate = norm <= DEGENERATE_NORM
        if degenerate.any():
            fallback = _weighted_step_sum(r[degenerate], act[degenerate])
            g[degenerate] = fallback
            norm[degenerate] = _row_norms(fallback)
        big = norm > DEGENERATE_NORM
        g[big] /= norm[big, None].astype(F32)
        overflowed = ~np.isfinite(norm)
        if overflowed.any():
            # Finite inputs near the float32 limit overflow the float32 sums (the reference's
            # arithmetic then yields NaN). Only those rows are redone in float64, which cannot
            # overflow, so no finite trajectory puts NaN/Inf into the gradient.
            g[overflowed] = _signals_f64(r[overflowed], act[overflowed], mask[overflowed], n[overflowed])
    out[rows] = g
    return out


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
    """``Σ_s weights[:, s] * act[:, s]`` in float32, steps added left to right."""
    g = weights[:, 0, None] * act[:, 0]
    for s in range(1, weights.shape[1]):
        g += weights[:, s, None] * act[:, s]
    return g


def _row_norms(g: np.ndarray) -> np.ndarray:
    g64 = g.astype(F64)
    return np.sqrt(np.einsum("ij,ij->i", g64, g64))


@dataclass(frozen=True, slots=True)
class LoopMetrics:
    """The seed's four counters (``InstantLoopMetrics``)."""

    trajectories_processed: int
    signals_accumulated: int
    flushes_performed: int
    updates_applied: int


class Learner:
    """Loop A's whole mutable state: the adapter, the gradient accumulator, counters.

    ``down``, ``up``: ``float32[rank, hidden_dim]``; ``grad_up``:
    ``float64[rank, hidden_dim]`` (every rank row receives the same signal, as in the
    reference). The arrays are updated in place, so they may be views into a record
    the owner publishes (the flusher does). Not thread-safe; the owner serialises calls.
    """

    def __init__(
        self,
        hidden_dim: int,
        rank: int,
        lr: float,
        flush_threshold: int,
        *,
        down: np.ndarray | None = None,
        up: np.ndarray | None = None,
        grad_up: np.ndarray | None = None,
    ) -> None:
        self.hidden_dim = hidden_dim
        self.rank = rank
        self.lr = lr
        self.flush_threshold = flush_threshold
        shape = (rank, hidden_dim)
        self.down = np.empty(shape, dtype=F32) if down is None else down
        self.up = np.zeros(shape, dtype=F32) if up is None else up
        self.grad_up = np.zeros(shape, dtype=F64) if grad_up is None else grad_up
        if down is None:
            self.down[...] = initial_down(hidden_dim, rank)
        self.pending = 0  # signals accumulated since the last flush (the reference's update_count)
        self.generation = 0  # bumped whenever ``up`` changes
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
        """Accumulate ``signals[i] * quality[i]`` in order, flushing at every threshold.

        The batch is cut exactly where a one-by-one replay would have flushed, so the
        result equals feeding the trajectories singly. Returns the number of flushes.
        """
        n = signals.shape[0]
        if n == 0:
            return 0
        contrib = signals.astype(F64) * np.asarray(quality, dtype=F64)[:, None]
        flushes = 0
        start = 0
        while start < n:
            take = min(self.flush_threshold - self.pending, n - start)
            self.grad_up += contrib[start : start + take].sum(axis=0)
            self.pending += take
            start += take
            if self.pending >= self.flush_threshold:
                self.flush()
                flushes += 1
        self.trajectories_processed += n
        self.signals_accumulated += n
        return flushes

    def flush(self) -> bool:
        """Apply pending gradients: ``up += grad_up * lr / pending``. False if none."""
        if self.pending == 0:
            return False
        up = self.up.astype(F64) + self.grad_up * (self.lr / self.pending)
        # Saturate rather than overflow: ``up`` stays finite whatever finite input was learned
        # (the reference would store ±inf; values inside float32 range are untouched).
        np.clip(up, -_F32_MAX, _F32_MAX, out=up)
        self.up[...] = up
        self.grad_up[...] = 0.0
        self.updates_applied += self.pending
        self.flushes_performed += 1
        self.pending = 0
        self.generation += 1
        return True


def apply_adapter(x: np.ndarray, down: np.ndarray, up_scaled: np.ndarray) -> np.ndarray:
    """``x + Σ_r (down_r · x) * scale * up_r`` for ``float32[h]`` or ``float32[n, h]``."""
    return x + (x @ down.T) @ up_scaled
