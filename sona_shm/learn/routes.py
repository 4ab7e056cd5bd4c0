"""An engine's route table, choosing a route for a query, and feedback as trajectories.

A *route table* is ``K`` named route vectors (``float32[K, hidden_dim]``, 2 <= K <=
:data:`~sona_shm.config.MAX_ROUTES`) fixed when the engine is created: the
destinations a router sends queries to (models, tools, prompts), each represented by
an embedding. :func:`choose` scores the adapted query against every route by cosine
and picks the best (optionally exploring); the scores depend on the direction of the
adapted query only.

A *feedback* is recorded as an ordinary trajectory (:func:`feedback_trajectory`), so it
travels through the lanes, is learned by the flusher and comes back from ``drain``:

- bandit, ``feedback(x, route=a, reward=r)``: ``Trajectory(query=x, steps=[Step(V[a],
  None, r)], quality=r, route=names[a], route_index=a)``;
- full information, ``feedback(x, best=y)`` (optionally ``route=a``, the route that was
  taken): ``Trajectory(query=x, steps=[Step(V[y], None, 1.0)], quality=1.0,
  route=names[a if given else y], route_index=a or None, best_index=y)``.

The step makes the trajectory meaningful to the reference rule too (it learns the
chosen route's vector weighted by the reward); the routing rule reads only the query,
``route_index``/``best_index`` and, for a bandit feedback, ``quality`` as the reward.
"""

from __future__ import annotations

import math
import os
import random
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import MAX_ROUTES
from ..errors import InvalidInputError
from ..trajectory import F32, ROUTE_MAX_BYTES, RouteChoice, Step, Trajectory, as_finite_float, as_vector


@dataclass(frozen=True, eq=False)
class RouteTable:
    """``vectors``: ``float32[K, h]`` (read-only, as given); ``names``: K unique names;
    ``unit``: the vectors scaled to unit length (what scores and the routing rule use)."""

    vectors: np.ndarray
    names: tuple[str, ...]
    unit: np.ndarray

    @classmethod
    def build(
        cls, vectors: Any, names: Any = None, *, hidden_dim: int | None = None, where: str = "routes", names_where: str | None = None
    ) -> RouteTable:
        """Validate a route table; raise :class:`InvalidInputError` naming what is wrong.

        ``names`` default to ``route0 … route{K-1}``. Vectors must be finite, non-zero
        and (if ``hidden_dim`` is given) of that width; names unique, non-empty, at most
        64 UTF-8 bytes without NUL. ``where`` names the vectors in errors, ``names_where``
        the names (default ``"{where} names"``).
        """
        try:
            arr = np.asarray(vectors)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{where}: expected a K x hidden_dim array of numbers, got {type(vectors).__name__} ({exc})") from None
        if arr.dtype.kind not in "iuf" or arr.ndim != 2:
            raise InvalidInputError(
                f"{where}: expected a K x hidden_dim array of real numbers, got dtype {arr.dtype} and shape {arr.shape}"
            )
        k, h = arr.shape
        if not 2 <= k <= MAX_ROUTES:
            raise InvalidInputError(f"{where}: expected 2 to {MAX_ROUTES} route vectors, got {k}")
        if hidden_dim is not None and h != hidden_dim:
            raise InvalidInputError(f"{where}: expected vectors of hidden_dim {hidden_dim} values, got {h}")
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.array(arr, dtype=F32, order="C")
        finite = np.isfinite(v)
        if not finite.all():
            row, col = (int(i) for i in np.argwhere(~finite)[0])
            raise InvalidInputError(f"{where}: expected finite values within float32 range, got {arr[row, col]!r} at [{row}, {col}]")
        norms = np.linalg.norm(v.astype(np.float64), axis=1)
        if not (norms > 0).all():
            raise InvalidInputError(f"{where}: expected non-zero vectors, vector {int(np.flatnonzero(norms <= 0)[0])} is all zeros")
        if names is None:
            names = [f"route{i}" for i in range(k)]
        names = _check_names(names, k, names_where or f"{where} names")
        v.flags.writeable = False
        unit = (v.astype(np.float64) / norms[:, None]).astype(F32)
        unit.flags.writeable = False
        return cls(v, names, unit)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, which: Any, argument: str) -> int:
        """The index of a route given by index or name; raise naming ``argument``."""
        if isinstance(which, str):
            try:
                return self.names.index(which)
            except ValueError:
                raise InvalidInputError(
                    f"{argument}: expected a route name ({', '.join(map(repr, self.names))}) or index, got {which!r}"
                ) from None
        if isinstance(which, (bool, np.bool_)) or not isinstance(which, (int, np.integer)) or not 0 <= which < len(self.names):
            raise InvalidInputError(f"{argument}: expected a route index in [0, {len(self.names) - 1}] or a route name, got {which!r}")
        return int(which)

    def same_as(self, other: RouteTable) -> bool:
        return self.names == other.names and np.array_equal(self.vectors, other.vectors)

    def names_bytes(self) -> np.ndarray:
        """``S64[K]``: the names as stored in a segment (UTF-8, NUL-padded)."""
        return np.array([n.encode("utf-8") for n in self.names], dtype=f"S{ROUTE_MAX_BYTES}")

    @classmethod
    def from_stored(cls, vectors: np.ndarray, names: np.ndarray, where: str) -> RouteTable:
        """A table read back from a segment or checkpoint (``names`` as :meth:`names_bytes`)."""
        try:
            decoded = [bytes(n).rstrip(b"\0").decode("utf-8") for n in names]
        except UnicodeDecodeError:
            raise InvalidInputError(f"{where}: route names are not UTF-8") from None
        return cls.build(np.array(vectors), decoded, where=where)


def _check_names(names: Any, k: int, label: str) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)):
        raise InvalidInputError(f"{label}: expected {k} names, got one string {names!r}")
    if isinstance(names, np.ndarray) and names.ndim == 0:  # one string saved as an array: not K names
        raise InvalidInputError(f"{label}: expected {k} names, got one string {names.item()!r}")
    try:
        names = [
            n.decode("utf-8") if isinstance(n, bytes) else n for n in (names.tolist() if isinstance(names, np.ndarray) else list(names))
        ]
    except (TypeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{label}: expected {k} strings, got {names!r} ({exc})") from None
    if len(names) != k:
        raise InvalidInputError(f"{label}: expected {k} names (one per vector), got {len(names)}")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n or "\0" in n or len(n.encode("utf-8", "surrogatepass")) > ROUTE_MAX_BYTES:
            raise InvalidInputError(
                f"{label}[{i}]: expected a non-empty string of at most {ROUTE_MAX_BYTES} UTF-8 bytes without NUL, got {n!r}"
            )
        try:
            n.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{label}[{i}]: expected text encodable as UTF-8, got {n!r}") from None
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise InvalidInputError(f"{label}: expected unique names, {n!r} is both names[{seen[n]}] and names[{i}]")
        seen[n] = i
    return tuple(names)


def load_routes(path: str, *, hidden_dim: int | None = None) -> RouteTable:
    """Read a route table from ``.npy`` (``K x h``; names ``route0…``) or ``.npz`` (``vectors``, optional ``names``)."""
    where = f"routes file {path}"
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise InvalidInputError(f"routes: expected an existing .npy or .npz file, got {path!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(
            f"{where}: expected a .npy (K x h array) or .npz (vectors, names) file, got one numpy cannot read ({exc}); "
            f"write it with sona_shm.RouteTable(...).save() or numpy.savez"
        ) from None
    if isinstance(data, np.ndarray):
        return RouteTable.build(data, None, hidden_dim=hidden_dim, where=where)
    with data:
        if "vectors" not in data.files:
            raise InvalidInputError(f"{where}: expected an array named 'vectors' (and optionally 'names'), got {sorted(data.files)}")
        unknown = sorted(set(data.files) - {"vectors", "names"})
        if unknown:
            raise InvalidInputError(f"{where}: expected only the arrays 'vectors' and 'names', got also {unknown}")
        names = _npz_member(data, "names", where) if "names" in data.files else None
        return RouteTable.build(_npz_member(data, "vectors", where), names, hidden_dim=hidden_dim, where=where)


def _npz_member(data: Any, member: str, where: str) -> np.ndarray:
    """One array of an open ``.npz``; members are read (and their CRC checked) only here."""
    try:
        return data[member]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InvalidInputError(f"{where} {member}: cannot be read without pickle (an object array); save numbers and str") from None
        raise InvalidInputError(f"{where} {member}: cannot be read: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"{where} {member}: cannot be read: {exc}") from None


# ----------------------------------------------------------------- choosing


def check_exploration(explore: Any, sample: Any, rng: Any) -> float:
    """The exploration probability ``explore`` as a float (None: 0), or raise naming what is wrong.

    ``sample`` must be a bool, not both may explore, and ``rng`` must be None or have a
    ``random()`` method (``random.Random``, ``numpy.random.Generator``).
    """
    epsilon = 0.0 if explore is None else explore
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 <= epsilon <= 1.0:
        raise InvalidInputError(f"explore: expected a probability in [0, 1] (epsilon-greedy), got {explore!r}")
    if not isinstance(sample, bool):
        raise InvalidInputError(f"sample: expected True or False, got {sample!r}")
    if sample and epsilon:
        raise InvalidInputError("explore, sample: choose one way to explore (epsilon-greedy or sampling from the softmax), got both")
    if rng is not None and not callable(getattr(rng, "random", None)):
        raise InvalidInputError(f"rng: expected None, a random.Random or a numpy Generator, got {rng!r}")
    return float(epsilon)


def cosine_scores(adapted: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Cosines of ``float32[h]`` / ``float32[n, h]`` with every unit route: ``float32[K]`` / ``[n, K]`` (0 for a zero vector).

    Norms are float64: in float32, ``|f|^2`` overflows above ``|f| ~ 1.8e19`` (and underflows
    below ~1e-23), which would score such a vector 0 against every route.
    """
    dots = adapted @ unit.T
    norms = np.linalg.norm(adapted.astype(np.float64), axis=-1, keepdims=adapted.ndim > 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 0)
    return scores.astype(F32)


def choose(table: RouteTable, adapted: np.ndarray, *, epsilon: float, sample: bool, temperature: float, rng: Any) -> RouteChoice:
    """The :class:`RouteChoice` for ``adapted`` (``forward(x)``): the route of the best cosine, after exploring.

    ``epsilon``: with this probability a route is drawn uniformly (epsilon-greedy);
    ``sample``: draw from the routing rule's softmax over ``temperature * scores``.
    ``rng``: a ``random.Random`` or ``numpy.random.Generator`` (default: ``random``).
    """
    scores = cosine_scores(adapted, table.unit)
    greedy = np.argmax(scores, axis=-1)
    if scores.ndim == 1:
        best = int(greedy)
        index, probability = _explore_one(scores, best, epsilon, sample, temperature, rng) if epsilon or sample else (best, 1.0)
        return RouteChoice(index, table.names[index], scores, adapted, index != best, probability)
    bests = np.asarray(greedy, dtype=np.int64)
    indices, probabilities = bests, np.ones(len(bests))
    if epsilon or sample:
        picks = [_explore_one(scores[i], int(g), epsilon, sample, temperature, rng) for i, g in enumerate(bests.tolist())]
        indices = np.array([i for i, _ in picks], np.int64)
        probabilities = np.array([p for _, p in picks])
    return RouteChoice(indices, [table.names[i] for i in indices.tolist()], scores, adapted, indices != bests, probabilities)


def _uniform(rng: Any) -> float:
    return (rng or random).random()


def _explore_one(scores: np.ndarray, greedy: int, epsilon: float, sample: bool, temperature: float, rng: Any) -> tuple[int, float]:
    """A route drawn by epsilon-greedy or from the softmax, and the probability it had of being drawn."""
    k = scores.shape[0]
    if sample:
        z = [temperature * float(s) for s in scores.tolist()]
        top = max(z)
        weights = [math.exp(v - top) for v in z]
        total = sum(weights)
        u = _uniform(rng) * total
        for i, w in enumerate(weights):
            u -= w
            if u < 0:
                return i, w / total
        return k - 1, weights[-1] / total
    if _uniform(rng) < epsilon:
        index = min(int(_uniform(rng) * k), k - 1)
    else:
        index = greedy
    return index, epsilon / k + (1.0 - epsilon if index == greedy else 0.0)


# ----------------------------------------------------------------- feedback


def feedback_trajectory(
    table: RouteTable, query: Any, *, route: Any, reward: Any, best: Any, unit_reward: bool, probability: Any = None
) -> Trajectory:
    """The trajectory that records one feedback (module docstring); raises naming a bad argument.

    ``unit_reward``: the engine learns with the routing rule, whose bandit reward is in [0, 1].
    """
    query = as_vector(query, "x", length=table.vectors.shape[1], what="hidden_dim")
    if best is None:
        if route is None or reward is None:
            raise InvalidInputError(
                "feedback: expected route= and reward= (bandit: how well the route taken did) or best= (which route was right)"
            )
        a = table.index(route, "route")
        r = as_finite_float(reward, "reward")
        if unit_reward and not 0.0 <= r <= 1.0:
            raise InvalidInputError(
                f"reward: expected a number in [0, 1] under the routing rule (1: the route served well), got {reward!r}"
            )
        return Trajectory(query, [Step(table.vectors[a], None, r)], r, route=table.names[a], route_index=a, probability=probability)
    if reward is not None:
        raise InvalidInputError(
            f"reward: a full-information feedback (best=) carries no reward, got reward={reward!r}; "
            "give route= and reward= for a bandit one"
        )
    y = table.index(best, "best")
    taken = None if route is None else table.index(route, "route")
    name = table.names[y if taken is None else taken]
    if probability is not None and taken is None:
        raise InvalidInputError(
            f"probability: the probability of the route taken needs route= (the route served), got probability={probability!r}"
        )
    return Trajectory(query, [Step(table.vectors[y], None, 1.0)], 1.0, route=name, route_index=taken, best_index=y, probability=probability)
