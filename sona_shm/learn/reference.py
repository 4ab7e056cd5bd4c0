"""The reference rule's maths (SONA Loop A, bit-exact with the seed): micro-LoRA init and learning signals.

A trajectory becomes a REINFORCE-with-mean-baseline signal; the learner
(:mod:`sona_shm.learn.learner`) accumulates it times the trajectory's quality and applies
the sums every ``flush_threshold`` signals. Vectorised over a batch and shared by the
in-process loop and the flusher's numpy path (``_speedups.learn_slots`` is the C twin).
``docs/SEMANTICS.md`` is the specification; the places where float32 rounding order
matters (the mean baseline and the degenerate-gradient test) follow the reference's
float32, left-to-right order.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

# Finite inputs near the float32 limit can overflow the float32 arithmetic below; the
# rows concerned are detected and redone in float64 (_repair_overflow, Learner.learn_rows), so
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
