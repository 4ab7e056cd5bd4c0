"""Off-policy evaluation: the mean reward a routing policy would have got, estimated from logged feedback.

A *logged decision* is a feedback that names the route served ``a`` for a query ``x``, its
reward ``r`` and the probability ``p`` with which the logging policy chose ``a``
(``RouteChoice.probability``, recorded with ``feedback(..., probability=)``). A bandit
feedback's reward is its ``quality``; a full-information one (``best=y`` with ``route=a``)
has reward ``1`` if ``a == y``, else ``0``. Trajectories that name no route served (no
feedback, or a full-information one without ``route=``), and feedback without a probability,
are counted and left out: no estimate can use them.

The target policy ``pi`` is deterministic (the greedy choice of a router: what ``route()``
serves without exploration). With the weight ``w_i = 1[pi(x_i) = a_i] / p_i`` of each of
``n`` logged decisions:

- IPS (inverse propensity scoring): ``V = (1/n) sum w_i r_i``, unbiased whenever every
  ``p_i`` is the true probability and ``p_i > 0`` wherever ``pi`` goes (each decision's
  probability is the logging policy's *at that time*, so logs of a policy that learned
  meanwhile are fine). Interval: ``V +- z s / sqrt(n)``, ``s`` the sample standard
  deviation of ``w_i r_i``.
- SNIPS (self-normalised IPS): ``V = sum w_i r_i / sum w_i``: a little biased, much less
  variable, always within the range of the rewards. Interval by the delta method:
  ``V +- z sqrt(sum w_i^2 (r_i - V)^2) / sum w_i``.

``z`` is the normal quantile of the confidence (1.96 for 95 %); both intervals are
asymptotic, so they are honest only with enough *support*: the number of logged decisions
on which ``pi`` agrees with the route served (the others weigh 0). The effective sample
size ``(sum w)^2 / sum w^2`` says the same more finely, and the mean weight ``(1/n) sum w``,
whose expectation is exactly 1 for every policy, tells when the logs hardly ever explored
where ``pi`` goes: far from 1, neither estimate is to be trusted (a logging policy that gives
some routes a probability of 1e-3, as softmax and SquareCB may, leaves such holes;
epsilon-greedy never does).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..trajectory import Trajectory, TrajectoryBatch
from .routes import Router, best_of, scores

#: Queries scored at once when a policy chooses for the logged decisions (bounds the memory of ``[n, K]`` scores).
CHUNK = 65536


@dataclass(frozen=True)
class LoggedDecisions:
    """``n`` logged decisions: ``query`` float32[n, h], ``route`` int64[n] (served), ``reward`` float64[n],
    ``probability`` float64[n] in (0, 1]; ``trajectories``: how many were read, ``no_route`` of them named no
    route served, ``no_probability`` named one without the probability it was chosen with."""

    query: np.ndarray
    route: np.ndarray
    reward: np.ndarray
    probability: np.ndarray
    trajectories: int
    no_route: int
    no_probability: int

    def __len__(self) -> int:
        return int(self.route.shape[0])

    @property
    def mean_reward(self) -> float | None:
        """The mean reward the logging policy got (None: no decision)."""
        return float(self.reward.mean()) if len(self) else None


def logged_decisions(source: TrajectoryBatch | Iterable[Trajectory]) -> LoggedDecisions:
    """The logged decisions of a drained batch (``sona-shm drain``'s file, ``Consumer.drain_arrays``) or of trajectories."""
    if isinstance(source, TrajectoryBatch):
        route = source.route_index.astype(np.int64)
        best = source.best_index.astype(np.int64)
        probability = source.probability.astype(np.float64)
        quality = source.quality.astype(np.float64)
        query = source.query
    else:
        items = list(source)
        if not all(isinstance(t, Trajectory) for t in items):
            raise InvalidInputError("source: expected a TrajectoryBatch or Trajectory objects (what drain returns)")
        route = np.array([-1 if t.route_index is None else t.route_index for t in items], np.int64)
        best = np.array([-1 if t.best_index is None else t.best_index for t in items], np.int64)
        probability = np.array([math.nan if t.probability is None else t.probability for t in items], np.float64)
        quality = np.array([t.quality for t in items], np.float64)
        query = np.array([np.asarray(t.query, np.float32) for t in items], np.float32).reshape(len(items), -1)
    feedback = route >= 0
    usable = feedback & np.isfinite(probability) & (probability > 0) & (probability <= 1)
    reward = np.where(best >= 0, (route == best).astype(np.float64), quality)
    return LoggedDecisions(
        np.ascontiguousarray(query[usable], np.float32),
        route[usable],
        reward[usable],
        probability[usable],
        trajectories=int(route.shape[0]),
        no_route=int((~feedback).sum()),
        no_probability=int((feedback & ~usable).sum()),
    )


def combined(parts: Sequence[LoggedDecisions]) -> LoggedDecisions:
    """The decisions of ``parts`` one after the other (all of one ``hidden_dim``)."""
    used = [p for p in parts if len(p)] or list(parts[:1])
    return LoggedDecisions(
        np.concatenate([p.query for p in used]),
        np.concatenate([p.route for p in used]),
        np.concatenate([p.reward for p in used]),
        np.concatenate([p.probability for p in used]),
        trajectories=sum(p.trajectories for p in parts),
        no_route=sum(p.no_route for p in parts),
        no_probability=sum(p.no_probability for p in parts),
    )


def greedy_choices(router: Router, query: np.ndarray) -> np.ndarray:
    """``int64[n]``: the route ``router`` serves each query without exploring (``route()``'s greedy choice)."""
    out = np.empty(query.shape[0], np.int64)
    for start in range(0, query.shape[0], CHUNK):
        out[start : start + CHUNK] = best_of(scores(query[start : start + CHUNK], router))
    return out


@dataclass(frozen=True)
class Estimate:
    """A policy's estimated mean reward: IPS and SNIPS with their intervals at ``confidence`` (None: no support).

    ``decisions``: the logged decisions used; ``support``: those on which the policy agrees with the route served;
    ``effective``: the effective sample size ``(sum w)^2 / sum w^2`` (0: no support); ``weight_mean``: the mean weight,
    1 in expectation (far from it: the logs explored too little where the policy goes)."""

    policy: str
    ips: float
    ips_low: float
    ips_high: float
    snips: float | None
    snips_low: float | None
    snips_high: float | None
    confidence: float
    decisions: int
    support: int
    effective: float
    weight_mean: float


def check_confidence(confidence: Any) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence: expected a probability in (0, 1), such as 0.95, got {confidence!r}")
    return float(confidence)


def estimate(policy: str, choices: np.ndarray, logged: LoggedDecisions, *, confidence: float = 0.95) -> Estimate:
    """IPS and SNIPS of the deterministic policy that chose ``choices`` (``int64[n]``) for ``logged``'s queries."""
    confidence = check_confidence(confidence)
    n = len(logged)
    if n == 0:
        raise InvalidInputError("logged: expected at least one logged decision (a feedback with route= and probability=), got none")
    if choices.shape != (n,):
        raise InvalidInputError(f"choices: expected one route per logged decision ({n}), got shape {choices.shape}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    w = np.where(choices == logged.route, 1.0 / logged.probability, 0.0)
    wr = w * logged.reward
    ips = float(wr.mean())
    spread = float(wr.std(ddof=1)) if n > 1 else math.inf
    half = z * spread / math.sqrt(n)
    total = float(w.sum())
    support = int(np.count_nonzero(w))
    snips = low = high = None
    effective = 0.0
    if total > 0:
        snips = float(wr.sum() / total)
        half_s = z * math.sqrt(float(np.sum(w * w * (logged.reward - snips) ** 2))) / total
        low, high = snips - half_s, snips + half_s
        effective = total * total / float(np.sum(w * w))
    return Estimate(policy, ips, ips - half, ips + half, snips, low, high, confidence, n, support, effective, float(w.mean()))


__all__ = ["CHUNK", "Estimate", "LoggedDecisions", "check_confidence", "combined", "estimate", "greedy_choices", "logged_decisions"]
