"""The routing rule's maths: bounded softmax losses over the route table, and their gradients.

The adapter is the reference's: ``f(q) = q + s * sum_r (d_r . q) u_r`` with ``s =
1/sqrt(R)``, but here both ``U`` (``up``) and ``D`` (``down``) learn, each rank row
with its own gradient. Scores are cosines, ``z_k = tau * v_k . f / |f|`` over the unit
route vectors ``v_k``, and ``p = softmax(z)``. ``f`` is linear in ``q``, so the scores
depend only on the query's direction: signals are computed for ``q / |q|``, which keeps
every gradient independent of the query's scale.

For each feedback, with ``c = dL/dz`` of a bounded loss:

- full information (``best`` = y): maximise ``log p_y``: ``c = e_y - p``;
- bandit (route ``a`` taken, reward ``r`` in [0, 1]): ``c = r (e_a - p) - (1 - r) p_a
  (e_a - u)``, where ``u`` is uniform over the other routes (``u_a = 0``, ``u_k = 1/(K -
  1)``). The first term raises ``log p_a`` as far as the route served well; the second
  is the gradient of ``(1 - r) p_a (mean_{k != a} z_k - z_a)`` with ``p_a`` held fixed:
  it lowers the route taken against all others alike, as far as it failed and for as
  long as it is likely. Both are bounded (``|c| <= 2``). Unlike REINFORCE's ``(r -
  b)(e_a - p)``, the push away from a wrong route does not vanish when the router is
  confidently wrong (``e_a - p -> 0`` as ``p_a -> 1``); and unlike a cross-entropy on
  ``1 - p_a``, which pushes toward the router's own second choice, it favours no other
  route, so a wrong guess is not reinforced. That is why it learns from greedy bandit
  feedback (BENCHMARKS.md, "Learning").

Then ``g = dL/df = (tau / |f|) (I - f^ f^T) sum_k c_k v_k`` and, with ``U`` and ``D``
as they were at the last flush, ``G_U[r] += s (d_r . q) g`` and ``G_D[r] += s (u_r .
g) q``. Every ``flush_threshold`` signals ``U += lr G_U / n`` and ``D += lr G_D / n``
(:meth:`sona_shm.learning.Learner.flush`). A query that is zero, or that the adapter
maps to (almost) zero, teaches nothing (its signal still counts).

Cosine scores do not depend on the length of ``f``, so the exact gradient grows as
``tau / |f|`` when the adapter maps a query close to zero: one such feedback could move
the adapter by thousands. The factor is capped at ``tau / GRADIENT_FLOOR`` (the gradient
is clipped, never turned around): for every query whose ``|f|`` is at least
``GRADIENT_FLOOR`` — all of them at the start, where ``f = q/|q|`` — the gradient is the
exact one.

Everything is computed in float64 from the float32 state; ``_speedups.learn_routing``
is the C twin, equal up to the order of float64 sums.
"""

from __future__ import annotations

import numpy as np

F64 = np.dtype(np.float64)

#: |f(q/|q|)| below this: the adapter maps the query to (almost) zero; no gradient.
MIN_ADAPTED_NORM = 1e-6
#: The gradient's factor tau/|f| is taken at |f| = max(|f|, GRADIENT_FLOOR): a clip (module docstring).
GRADIENT_FLOOR = 0.1


def gradients(
    query: np.ndarray,
    route_index: np.ndarray,
    best_index: np.ndarray,
    reward: np.ndarray,
    down: np.ndarray,
    up: np.ndarray,
    unit: np.ndarray,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient sums ``(G_U, G_D)``, ``float64[R, h]`` each, of a batch of feedback signals.

    ``query``: ``float32[n, h]``; ``route_index``/``best_index``: ``int[n]`` (-1: none;
    every row has ``best_index >= 0`` or ``route_index >= 0``); ``reward``: ``[n]``, read
    for bandit rows (``best_index < 0``), in [0, 1]; ``down``/``up``: ``float32[R, h]``
    as at the last flush; ``unit``: ``float32[K, h]`` unit route vectors.
    """
    s = 1.0 / np.sqrt(down.shape[0])
    q, kappa, fn, fhat, z, live = _forward(query, down, up, unit, temperature)
    c = _loss_slopes(z, np.asarray(route_index), np.asarray(best_index), np.asarray(reward, dtype=F64))
    c[~live] = 0.0
    w = c @ unit.astype(F64)  # [n, h]: sum_k c_k v_k
    g = (temperature / np.maximum(fn, GRADIENT_FLOOR))[:, None] * (w - fhat * np.einsum("ij,ij->i", fhat, w)[:, None])
    grad_up = s * (kappa.T @ g)
    grad_down = s * ((g @ up.astype(F64).T).T @ q)
    return grad_up, grad_down


def _forward(query: np.ndarray, down: np.ndarray, up: np.ndarray, unit: np.ndarray, temperature: float) -> tuple[np.ndarray, ...]:
    """For each query, in float64: ``q/|q|``, ``d_r . q`` (``[n, R]``), ``|f|``, ``f/|f|`` and the logits ``z`` (``[n, K]``),
    with ``live``: False where the query is zero or the adapter maps it to (almost) zero (then ``|f|`` is 1)."""
    s = 1.0 / np.sqrt(down.shape[0])
    q = np.asarray(query, dtype=F64)
    qn = np.sqrt(np.einsum("ij,ij->i", q, q))
    live = qn > 0
    q = q / np.where(live, qn, 1.0)[:, None]
    kappa = q @ down.astype(F64).T  # [n, R]: d_r . q
    f = q + s * (kappa @ up.astype(F64))
    fn = np.sqrt(np.einsum("ij,ij->i", f, f))
    live &= fn > MIN_ADAPTED_NORM
    fn = np.where(live, fn, 1.0)
    fhat = f / fn[:, None]
    z = temperature * (fhat @ unit.astype(F64).T)  # [n, K]
    return q, kappa, fn, fhat, z, live


def _loss_slopes(z: np.ndarray, route_index: np.ndarray, best_index: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """``c = dL/dz`` per row (see the module docstring)."""
    n, k = z.shape
    rows = np.arange(n)
    p = _softmax(z)
    full = best_index >= 0
    target = np.where(full, best_index, route_index)
    e = np.zeros_like(p)
    e[rows, target] = 1.0
    toward = e - p  # e_t - p
    c = np.where(full[:, None], toward, 0.0)
    bandit = ~full
    if bandit.any():
        a = target[bandit]
        pa = p[bandit, a]
        uniform = np.full((len(a), k), 1.0 / (k - 1))
        uniform[np.arange(len(a)), a] = 0.0  # the other routes, alike
        away = e[bandit] - uniform
        r = reward[bandit][:, None]
        c[bandit] = r * toward[bandit] - (1.0 - r) * pa[:, None] * away
    return c


def _softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)
    ez = np.exp(z - top)
    return ez / ez.sum(axis=1, keepdims=True)


def loss(
    query: np.ndarray,
    route_index: np.ndarray,
    best_index: np.ndarray,
    reward: np.ndarray,
    down: np.ndarray,
    up: np.ndarray,
    unit: np.ndarray,
    temperature: float,
    held_pa: np.ndarray | None = None,
) -> float:
    """The summed objective whose gradient (w.r.t. U and D, ascending) :func:`gradients` returns; for tests.

    ``sum_full log p_y + sum_bandit (r log p_a + (1 - r) p_a (mean_{k != a} z_k - z_a))``,
    with the bandit rows' ``p_a`` held at ``held_pa`` (their values where the gradient is
    taken; computed here when None).
    """
    z = _forward(query, np.asarray(down), np.asarray(up), np.asarray(unit), temperature)[4]
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    total = 0.0
    for i in range(len(z)):
        if best_index[i] >= 0:
            total += logp[i, best_index[i]]
        else:
            a = route_index[i]
            pa = np.exp(logp[i, a]) if held_pa is None else held_pa[i]
            others = (z[i].sum() - z[i, a]) / (z.shape[1] - 1)
            total += reward[i] * logp[i, a] + (1 - reward[i]) * pa * (others - z[i, a])
    return float(total)


def route_probabilities(query: np.ndarray, down: np.ndarray, up: np.ndarray, unit: np.ndarray, temperature: float) -> np.ndarray:
    """``p = softmax(z)`` per query: ``float64[n, K]`` (for tests and monitors)."""
    return _softmax(_forward(query, down, up, unit, temperature)[4])
