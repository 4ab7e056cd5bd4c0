"""The routing rule's maths: a learned route table on the adapted query, one feedback at a time.

State (an engine's ledger holds it twice: as *published*, what workers route with, and as the
learner's *working* copy, which every feedback moves; a window publishes the difference):

- the adapter ``U`` (``up``), ``D`` (``down``), ``float32[R, h]``: ``forward(x) = x + s sum_r
  (d_r . x) u_r`` with ``s = 1/sqrt(R)``, as the reference rule's;
- the route vectors ``V``, ``float32[K, h]``, starting at the unit rows of the route table,
  and a bias per route ``b``, ``float32[K]``, starting at 0.

Scores: ``q^ = q/|q|``, ``f = q^ + s sum_r (d_r . q^) u_r``, ``f^ = f/|f|`` and ``z_k = tau
f^ . v_k + BETA b_k``, ``p = softmax(z)`` over the active routes. At the start ``z_k`` is
``tau`` times the cosine of the query with route ``k``: the learner starts as the cosine
router. A feedback is a loss slope ``c = dL/dz`` of a bounded objective ``L`` (maximised):

- full information (``best = y``): ``L = log p_y``, ``c = e_y - p``;
- bandit (route ``a`` served, reward ``r`` in [0, 1]): ``L = r log p_a + (1 - r) log(1 -
  sigma(z_a - OFFSET))``, ``c = r (e_a - p) - (1 - r) sigma(z_a - OFFSET) e_a``: a route
  that served well is raised against all others; one that failed is pushed down alone, as
  hard as it still looks likely to be right (not in proportion to ``p_a``, which with many
  routes is small even for the top one), favouring no other route.

``|c_k| <= 2``; entries below :data:`SPARSE` are dropped, so a feedback touches a few route
rows, not all ``K``. With everything at the learner's working state, each kept row moves
(``eta`` = the engine's ``lr``):

    n += 1;  mu += (f^ - mu) / min(n, CENTRE);  x = f^ - mu
    dv_k = eta tau c_k (x - pi_k (x . v^_k) v^_k),   pi_k = PROTECT if c_k < 0 else 0
    db_k = BIAS_LR BETA c_k - (tau / BETA) mu . dv_k

the SGD step of the centred parametrisation ``z_k = tau v_k . (f^ - mu) + c'_k`` stored as
``(V, b)`` (``BETA b_k = c'_k - tau v_k . mu``, so workers keep scoring ``tau f^ . v_k + BETA
b_k``); a push-down loses ``PROTECT`` of its component along the route's own direction, so a
failure on another intent's query does not lower the route for its own queries. With ``mu =
0`` and ``PROTECT = 0`` it is exactly the gradient: ``dL/dv_k = tau c_k f^``, ``dL/db_k = BETA
c_k`` (``tests/test_routing.py`` checks every parameter against finite differences). The
adapter learns only with ``adapter_lr > 0`` (default 0: measured to help nothing and to hurt
bandit learning above 0.01, BENCHMARKS.md):

    g = (tau / max(|f|, GRADIENT_FLOOR)) (I - f^ f^T) sum_k c_k v_k        (= dL/df, clipped)
    dU_r = adapter_lr s (d_r . q^) g,   dD_r = adapter_lr s (u_r . g) q^

A zero query, or one the adapter maps to (almost) zero, teaches nothing (the signal counts).
Every quantity is bounded: ``|c_k| <= 1``, ``|x| <= 2``, ``|dv_k| <= 2 eta tau``, so no single feedback
moves the table far (``tests/test_routing_properties.py``).

Windows: the learner moves its working copy at every feedback and publishes a *window* —
``working - published`` (the rows of ``V`` it touched, every bias, the adapter when it learns),
as float32 deltas — every :func:`window_size` feedbacks: 1 at first, growing by one every
:data:`GROWTH` feedbacks up to ``flush_threshold``, so a new engine learns from its first
feedbacks and a busy one publishes (and, in a fleet, ships) a window per ``flush_threshold``.
Publishing is ``P = f32(f64(P) + f64(delta))`` and the working copy becomes ``P``: the one
arithmetic a fleet's replicas apply too.

``_speedups.learn_routing`` (lane slots) and ``_speedups.learn_routing_rows`` (arrays, for
``InstantLoop``) are the C twins of :func:`step`, equal up to float rounding (they sum in
float32 where this sums in float64).
"""

from __future__ import annotations

import numpy as np

F64 = np.dtype(np.float64)
F32 = np.dtype(np.float32)

#: The bias's scale in the score (``z_k = tau f^ . v_k + BETA b_k``).
BETA = 1.0
#: A failed route is pushed down as hard as ``sigmoid(z_a - OFFSET)`` (its logit against this offset).
OFFSET = 3.0
#: The bias's step.
BIAS_LR = 0.1
#: ``mu`` is the running mean of ``f^`` over about this many feedbacks.
CENTRE = 1000
#: A push-down keeps this share less of its component along the route's own direction.
PROTECT = 0.5
#: Loss slopes below this are dropped (the rows they would touch are left alone).
SPARSE = 0.01
#: A window grows by one feedback every this many feedbacks (up to ``flush_threshold``).
GROWTH = 20
#: The adapter gradient's factor tau/|f| is taken at ``|f| >= GRADIENT_FLOOR``: a clip.
GRADIENT_FLOOR = 0.1
#: ``|f(q^)|`` below this: the adapter maps the query to (almost) zero; no gradient.
MIN_ADAPTED_NORM = 1e-6


def window_size(signals_before: int, flush_threshold: int) -> int:
    """Feedbacks in the window that opens after ``signals_before`` feedbacks: ``min(flush_threshold, max(1,
    signals_before // GROWTH))``."""
    return min(flush_threshold, max(1, signals_before // GROWTH))


_EXP_MAX = float(np.log(np.finfo(np.float64).max))  # the largest x whose exp(x) is finite


def slopes(z: np.ndarray, route: int, best: int, reward: float) -> np.ndarray:
    """``c = dL/dz`` of one feedback (``z``: ``float64[K]``, -inf for routes that are not active), sparsified."""
    e = np.exp(z - np.max(z))
    p = e / e.sum()
    if best >= 0:
        c = -p
        c[best] += 1.0
    else:
        c = -reward * p
        exponent = -(z[route] - OFFSET)
        # exp overflows past _EXP_MAX: the quotient is then 0.0, as (1 - r) / (1 + inf) would give, without the warning.
        c[route] += reward - (0.0 if exponent > _EXP_MAX else (1.0 - reward) / (1.0 + np.exp(exponent)))
    c[np.abs(c) < SPARSE] = 0.0
    return c


def step(
    up: np.ndarray,
    down: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    centre: np.ndarray | None,
    active: np.ndarray,
    query: np.ndarray,
    route: int,
    best: int,
    reward: float,
    *,
    n: int,
    lr: float,
    adapter_lr: float,
    temperature: float,
) -> bool:
    """One feedback, in place, on the working state (module docstring); True if it moved anything.

    ``up``, ``down``: ``float32[R, h]``; ``vectors``: ``float32[K, h]``; ``bias``: ``float32[K]``
    (float64 arrays are stepped in float64: the tests' exact gradient); ``centre``: ``float64[h]``
    (``mu``; None: no centring, ``mu = 0``); ``active``: ``bool[K]``; ``query``: ``float32[h]``;
    ``route``/``best``: the route served / the right route (-1: none); ``n``: feedbacks learned,
    this one included.
    """
    q = query.astype(F64)
    top = np.max(np.abs(q))
    if not top > 0:
        return False
    q = q / top
    q = q / np.sqrt(q @ q)
    rank = up.shape[0]
    s = 1.0 / np.sqrt(rank)
    U, D = up.astype(F64), down.astype(F64)
    kappa = D @ q
    f = q + s * (kappa @ U)
    fn = float(np.sqrt(f @ f))
    if fn <= MIN_ADAPTED_NORM:
        return False
    fh = f / fn
    V = vectors.astype(F64)
    z = np.where(active, temperature * (V @ fh) + BETA * bias.astype(F64), -np.inf)
    c = slopes(z, route, best, reward)
    c[~active] = 0.0
    rows = np.flatnonzero(c)
    if not len(rows):
        return False
    cr = c[rows]
    Vr = V[rows]
    if adapter_lr:
        w = cr @ Vr
        g = (temperature / max(fn, GRADIENT_FLOOR)) * (w - fh * (fh @ w))
        dU = s * np.outer(kappa, g)
        dD = s * np.outer(U @ g, q)
        up[...] = (U + adapter_lr * dU).astype(up.dtype)
        down[...] = (D + adapter_lr * dD).astype(down.dtype)
    if centre is not None:
        centre += (fh - centre) / min(n, CENTRE)
        x = fh - centre
    else:
        x = fh
    dV = temperature * cr[:, None] * x[None, :]
    pushed = cr < 0
    if pushed.any():
        own = Vr[pushed] / np.sqrt(np.einsum("ij,ij->i", Vr[pushed], Vr[pushed]))[:, None]
        dV[pushed] -= PROTECT * np.einsum("ij,ij->i", dV[pushed], own)[:, None] * own
    dV *= lr
    db = BIAS_LR * BETA * cr - (temperature / BETA) * (dV @ centre if centre is not None else 0.0)
    vectors[rows] = (Vr + dV).astype(vectors.dtype)
    bias[rows] = (bias[rows].astype(F64) + db).astype(bias.dtype)
    return True


def loss(
    query: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    route: int,
    best: int,
    reward: float,
    tau: float,
) -> float:
    """The objective ``L`` of one feedback at a state (float64 arrays); :func:`step`'s moves ascend it (for tests)."""
    q = np.asarray(query, F64)
    q = q / np.sqrt(q @ q)
    s = 1.0 / np.sqrt(up.shape[0])
    f = q + s * ((down @ q) @ up)
    fh = f / np.sqrt(f @ f)
    z = tau * (vectors @ fh) + BETA * bias
    logp = z - z.max()
    logp = logp - np.log(np.exp(logp).sum())
    if best >= 0:
        return float(logp[best])
    return float(reward * logp[route] - (1 - reward) * np.logaddexp(0.0, z[route] - OFFSET))  # log(1 - sigmoid(t)) = -softplus(t)
