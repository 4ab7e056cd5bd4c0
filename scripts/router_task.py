"""The synthetic embedding router that the learning benchmark and the demo route on.

``h``-dimensional queries come from ``clusters`` clusters. There are ``routes`` unit
route vectors; each cluster's centre is ``0.6 * (a route vector) + 0.8 * (a random
unit direction)``, normalised, so a plain cosine router sends the whole cluster to that
route. For ``misrouted`` of the clusters another route is the right one (a model that is
better at those queries than their embedding suggests): the unadapted router gets them
wrong, and only learning from feedback can fix that. Queries are a centre plus
Gaussian noise of norm about ``noise``, normalised.

:meth:`RouterTask.remap` draws the right routes of the misrouted clusters anew (a
non-stationary world); everything is seeded.
"""

from __future__ import annotations

import numpy as np


class RouterTask:
    def __init__(self, seed: int, *, h: int = 256, routes: int = 6, clusters: int = 8, misrouted: int = 3, noise: float = 0.35) -> None:
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.h, self.k, self.noise = h, routes, noise
        v = rng.standard_normal((routes, h))
        self.routes = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        away = rng.standard_normal((clusters, h))
        away /= np.linalg.norm(away, axis=1, keepdims=True)
        centres = 0.6 * self.routes[rng.integers(0, routes, clusters)] + 0.8 * away
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.nearest = np.argmax(self.centres @ self.routes.T, axis=1)  # what the cosine router picks
        self.misrouted = misrouted
        self.best = self.nearest.copy()
        self.remap()

    def remap(self) -> None:
        """Draw which clusters are misrouted and where they belong, anew."""
        rng = self.rng
        self.best = self.nearest.copy()
        for j in rng.choice(len(self.centres), self.misrouted, replace=False):
            self.best[j] = (self.nearest[j] + 1 + rng.integers(0, self.k - 1)) % self.k

    def sample(self, n: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``n`` queries (``float32[n, h]``, unit length) and the index of the right route for each.

        ``rng``: draw from this generator instead of the task's own (one per thread).
        """
        rng = rng or self.rng
        j = rng.integers(0, len(self.centres), n)
        x = self.centres[j] + self.noise * rng.standard_normal((n, self.h)) / np.sqrt(self.h)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), self.best[j]
