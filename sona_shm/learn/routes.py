"""Route tables, choosing a route for a query, and feedback as trajectories.

A *route table* is ``K`` named route vectors (``float32[K, hidden_dim]``, 2 <= K <=
:data:`~sona_shm.config.MAX_ROUTES`): the destinations a router sends queries to (models,
tools, prompts), each represented by an embedding — typically the mean embedding of a few
example queries (:meth:`RouteTable.from_examples`). An engine keeps its table in the
ledger: routes can be added, renamed and retired while it runs (a retired route keeps its
index and statistics and is never chosen again), up to the ``max_routes`` it reserved.

Choosing (:func:`choose`): a query ``x`` is adapted (``f = forward(x)``, normalised first,
so no finite input overflows), and every active route gets the score ``s_k = f^ . v_k +
(beta / tau) b_k`` with the learned route vectors ``v_k`` and biases ``b_k`` of the routing
rule (:mod:`sona_shm.learn.routing`); at the start ``v_k`` is the unit route vector and
``b_k = 0``, so ``s_k`` is the cosine of ``f`` with route ``k`` — the plain cosine router,
which the reference rule keeps. The greedy choice is the best score; scores within
:data:`TIE` of the best are a tie, won by the lowest index (so the C and Python paths agree
to the last bit). Exploration, for bandit feedback (which only says how the route served did):

- ``explore=eps``: epsilon-greedy (a uniformly drawn active route with probability eps);
- ``explore="softmax"``: draw from ``softmax(tau * s)``;
- ``explore="squarecb"``: SquareCB (Foster & Rakhlin) over the rule's softmax ``p``: route
  ``k`` other than the best gets ``1 / (K + gamma (p_best - p_k))``, the best the rest;
  little exploration where the router is sure, more where it is not.

Every choice reports the probability with which it was made (``RouteChoice.probability``),
which ``feedback(..., probability=)`` records for off-policy evaluation.

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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..config import MAX_ROUTES
from ..errors import InvalidInputError
from ..trajectory import F32, ROUTE_MAX_BYTES, RouteChoice, Step, Trajectory, as_finite_float, as_vector, check_vectors
from .routing import BETA

#: A route's state in an engine's table (the ledger's ``route_state``): a free row, an active route, a retired one.
FREE, ACTIVE, RETIRED = 0, 1, 2
#: Scores within this of the best are a tie, won by the lowest index (both paths compute in float64).
TIE = 1e-9
#: The explorations by name, and their codes in the C twin's ``route()``.
MODES = {"greedy": 0, "epsilon": 1, "softmax": 2, "squarecb": 3}
#: SquareCB's gamma when none is given (BENCHMARKS.md, "Learning": exploration measured against epsilon-greedy and softmax).
DEFAULT_GAMMA = 1000.0
F64 = np.dtype(np.float64)


@dataclass(frozen=True, eq=False)
class RouteTable:
    """``vectors``: ``float32[K, h]`` (read-only, as given); ``names``: K unique names;
    ``unit``: the vectors scaled to unit length (the routing rule's start, the cosine router's
    routes); ``retired``: K flags (a retired route keeps its index and is never chosen)."""

    vectors: np.ndarray
    names: tuple[str, ...]
    unit: np.ndarray
    retired: tuple[bool, ...] = ()

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
        v = _check_vectors(vectors, where, hidden_dim)
        k = v.shape[0]
        if not 2 <= k <= MAX_ROUTES:
            raise InvalidInputError(f"{where}: expected 2 to {MAX_ROUTES} route vectors, got {k}")
        if names is None:
            names = [f"route{i}" for i in range(k)]
        names = _check_names(names, k, names_where or f"{where} names")
        return cls._of(v, names, (False,) * k)

    @classmethod
    def _of(cls, v: np.ndarray, names: tuple[str, ...], retired: tuple[bool, ...]) -> RouteTable:
        v.flags.writeable = False
        unit = (v.astype(F64) / np.linalg.norm(v.astype(F64), axis=1)[:, None]).astype(F32)
        unit.flags.writeable = False
        return cls(v, names, unit, retired)

    @classmethod
    def from_examples(cls, examples: Any, *, where: str = "examples") -> RouteTable:
        """A table from example embeddings: ``{name: float[n_i, h]}`` (or ``[(name, embeddings), ...]``); each
        route is the mean of its examples' unit vectors — the few-shot way a semantic router is set up."""
        items = list(examples.items()) if isinstance(examples, dict) else list(examples) if examples is not None else []
        if not items:
            raise InvalidInputError(f"{where}: expected routes with example embeddings ({{name: float[n, h]}}), got none")
        names, means = [], []
        for i, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise InvalidInputError(f"{where}[{i}]: expected (name, embeddings), got {item!r}")
            name, emb = item
            names.append(name)
            means.append(mean_direction(emb, f"{where}[{name!r}]"))
        widths = {m.shape[0] for m in means}
        if len(widths) != 1:
            raise InvalidInputError(f"{where}: expected embeddings of one width, got widths {sorted(widths)}")
        return cls.build(np.array(means), names, where=where)

    def save(self, path: Any) -> None:
        """Write the table as an ``.npz`` (``vectors``, ``names``) that ``--routes`` and :func:`load_routes` read
        (``path``: a file name, to which numpy adds ``.npz`` if it lacks it, or a binary file open for writing)."""
        np.savez(path, vectors=self.vectors, names=np.array(self.names))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def active(self) -> np.ndarray:
        """``bool[K]``: the routes that may be chosen and learned (not retired)."""
        return ~np.array(self.retired or (False,) * len(self.names), dtype=bool)

    def index(self, which: Any, argument: str) -> int:
        """The index of a route given by index or name (a retired one too); raise naming ``argument``."""
        if isinstance(which, str):
            try:
                found = self.names.index(which)
            except ValueError:
                raise InvalidInputError(
                    f"{argument}: expected a route name ({', '.join(map(repr, self.names))}) or index, got {which!r}"
                ) from None
        elif isinstance(which, (bool, np.bool_)) or not isinstance(which, (int, np.integer)) or not 0 <= which < len(self.names):
            raise InvalidInputError(f"{argument}: expected a route index in [0, {len(self.names) - 1}] or a route name, got {which!r}")
        else:
            found = int(which)
        return found

    def starts_with(self, other: RouteTable) -> bool:
        """Whether this table's first routes are ``other``'s vectors as given (routes added, renamed or retired since
        keep a table "the same": only the vectors a route was created with identify it)."""
        k = len(other)
        return len(self) >= k and np.array_equal(self.vectors[:k], other.vectors)

    def names_bytes(self) -> np.ndarray:
        """``S64[K]``: the names as stored in a segment (UTF-8, NUL-padded)."""
        return np.array([n.encode("utf-8") for n in self.names], dtype=f"S{ROUTE_MAX_BYTES}")

    @classmethod
    def from_stored(cls, vectors: np.ndarray, names: np.ndarray, where: str, states: np.ndarray | None = None) -> RouteTable:
        """A table read back from a segment or checkpoint (``names`` as :meth:`names_bytes`; ``states``: FREE/ACTIVE/RETIRED)."""
        try:
            decoded = [bytes(n).rstrip(b"\0").decode("utf-8") for n in names]
        except UnicodeDecodeError:
            raise InvalidInputError(f"{where}: route names are not UTF-8") from None
        v = _check_vectors(vectors, where, None)
        names_checked = _check_names(decoded, len(decoded), f"{where} names")
        retired = (False,) * len(decoded) if states is None else tuple(bool(s == RETIRED) for s in np.asarray(states).tolist())
        return cls._of(v, names_checked, retired)

    # ----------------------------------------------------------------- changes (an engine applies them between flushes)

    def added(self, name: Any, vector: Any, max_routes: int) -> RouteTable:
        """The table with route ``name`` of ``vector`` appended; refused naming what is wrong (duplicate, width, room)."""
        if len(self.names) >= max_routes:
            raise InvalidInputError(
                f"routes add: the engine reserved {max_routes} routes and has them all; create it with a larger --max-routes"
            )
        v = _check_vectors(np.asarray(vector)[None] if np.ndim(vector) == 1 else vector, "vector", self.vectors.shape[1])
        if v.shape[0] != 1:
            raise InvalidInputError(f"vector: expected one vector of {self.vectors.shape[1]} values, got shape {v.shape}")
        names = _check_names([*self.names, name], len(self.names) + 1, "name")
        return RouteTable._of(np.concatenate([self.vectors, v]), names, (*self.retired_flags(), False))

    def renamed(self, which: Any, name: Any) -> RouteTable:
        """The table with route ``which`` (index or name; retired ones too) renamed to ``name``."""
        i = self.index(which, "route")
        names = list(self.names)
        names[i] = name
        return replace(self, names=_check_names(names, len(names), "name"))

    def retired_route(self, which: Any) -> RouteTable:
        """The table with route ``which`` retired (an active one: at least one route must stay active)."""
        i = self.index(which, "route")
        flags = list(self.retired_flags())
        if flags[i]:
            raise InvalidInputError(f"route: {self.names[i]!r} is retired already")
        flags[i] = True
        if all(flags):
            raise InvalidInputError(f"route: {self.names[i]!r} is the last active route; add another before retiring it")
        return replace(self, retired=tuple(flags))

    def retired_flags(self) -> tuple[bool, ...]:
        """One flag per route, True for a retired one (``retired`` itself may be empty: none retired)."""
        return self.retired or (False,) * len(self.names)


def mean_direction(examples: Any, where: str) -> np.ndarray:
    """``float64[h]``: the mean of the unit vectors of example embeddings ``float[n, h]`` (or one ``float[h]``), the
    few-shot way to make a route's vector; raise naming ``where`` for no examples, a non-finite or a zero one."""
    try:
        e = np.array(examples, dtype=F64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"{where}: expected one or more embeddings (n x h numbers), got {type(examples).__name__} ({exc})"
        ) from None
    if e.ndim == 1:
        e = e[None]
    if e.ndim != 2 or not e.size:
        raise InvalidInputError(f"{where}: expected one or more embeddings (n x h), got shape {e.shape}")
    if not np.isfinite(e).all():
        raise InvalidInputError(f"{where}: expected finite values")
    top = np.max(np.abs(e), axis=1, keepdims=True)
    if not (top > 0).all():
        raise InvalidInputError(f"{where}: expected non-zero embeddings, example {int(np.argmin(top))} is all zeros")
    e = e / top  # no overflow in the norm
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(axis=0)


def _check_vectors(vectors: Any, where: str, hidden_dim: int | None) -> np.ndarray:
    """``vectors`` as a private ``float32[K, h]`` of finite, non-zero rows, or raise naming ``where``."""
    try:
        arr = np.asarray(vectors)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{where}: expected a K x hidden_dim array of numbers, got {type(vectors).__name__} ({exc})") from None
    if arr.dtype.kind not in "iuf" or arr.ndim != 2:
        raise InvalidInputError(f"{where}: expected a K x hidden_dim array of real numbers, got dtype {arr.dtype} and shape {arr.shape}")
    if hidden_dim is not None and arr.shape[1] != hidden_dim:
        raise InvalidInputError(f"{where}: expected vectors of hidden_dim {hidden_dim} values, got {arr.shape[1]}")
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.array(arr, dtype=F32, order="C")
    finite = np.isfinite(v)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise InvalidInputError(f"{where}: expected finite values within float32 range, got {arr[row, col]!r} at [{row}, {col}]")
    norms = np.linalg.norm(v.astype(F64), axis=1)
    if not (norms > 0).all():
        raise InvalidInputError(f"{where}: expected non-zero vectors, vector {int(np.flatnonzero(norms <= 0)[0])} is all zeros")
    return v


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


#: How a routes file begins: numpy's .npy magic, or a zip archive's local header (an .npz).
_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
_MAKE_ONE = "write one with `sona-shm routes build --in EXAMPLES.jsonl --out routes.npz` or sona_shm.RouteTable(...).save()"


def numpy_file_kind(path: str | os.PathLike[str], where: str) -> str | None:
    """``"npy"`` or ``"npz"`` by the file's first bytes, None for any other file (numpy would take it for a
    pickle, and its error advises ``allow_pickle``); raise naming ``where`` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise InvalidInputError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    return "npy" if head == _NPY_MAGIC else "npz" if head.startswith(_ZIP_MAGIC) else None


def load_routes(path: str, *, hidden_dim: int | None = None) -> RouteTable:
    """Read a route table from ``.npy`` (``K x h``; names ``route0…``) or ``.npz`` (``vectors``, optional ``names``)."""
    where = f"routes file {path}"
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise InvalidInputError(f"routes: expected an existing .npy or .npz file, got {path!r}")
    if numpy_file_kind(path, where) is None:
        # Checked before numpy sees it: numpy takes any other file for a pickle and advises allow_pickle.
        hint = " (example embeddings as JSON lines: build the table from them)" if str(path).endswith((".jsonl", ".json")) else ""
        raise InvalidInputError(
            f"{where}: expected a .npy (K x h array) or .npz (vectors, names) file, got a file that is neither{hint}; {_MAKE_ONE}"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(
            f"{where}: expected a .npy (K x h array) or .npz (vectors, names) file, got one numpy cannot read ({exc}); {_MAKE_ONE}"
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


def read_examples(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Example embeddings from a JSON-lines file: one object per line, ``{"name": ROUTE, "embedding": [h numbers]}``
    (other fields, such as ``"text"``, are ignored; blank lines too); ``{name: float64[n, h]}`` in the order names first
    appear, for :meth:`RouteTable.from_examples`. Raise naming the line and the field that is wrong."""
    import json

    where = f"examples file {os.fspath(path)}"
    rows: dict[str, list[list[float]]] = {}
    width: tuple[int, int] | None = None  # (h, the line that set it)
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"--in: cannot read {os.fspath(path)!r} ({exc.strerror or exc})") from None
    with f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                at = f"{where} line {number}"
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    raise InvalidInputError(f"{at}: expected one JSON object, got invalid JSON ({exc})") from None
                if not isinstance(item, dict):
                    raise InvalidInputError(f"{at}: expected a JSON object with 'name' and 'embedding', got {type(item).__name__}")
                name, embedding = item.get("name"), item.get("embedding")
                if not isinstance(name, str) or not name:
                    raise InvalidInputError(f"{at}: field 'name': expected the route's name (a non-empty string), got {name!r}")
                if (
                    not isinstance(embedding, list)
                    or not embedding
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in embedding)
                ):
                    got = (
                        f"{type(embedding).__name__}" if not isinstance(embedding, list) else "a list holding something other than numbers"
                    )
                    if isinstance(embedding, list) and not embedding:
                        got = "an empty list"
                    raise InvalidInputError(f"{at}: field 'embedding': expected a list of numbers, got {got}")
                if not all(math.isfinite(x) for x in embedding):
                    raise InvalidInputError(f"{at}: field 'embedding': expected finite numbers")
                if not any(embedding):
                    raise InvalidInputError(f"{at}: field 'embedding': expected a non-zero vector, got all zeros")
                if width is None:
                    width = (len(embedding), number)
                elif len(embedding) != width[0]:
                    raise InvalidInputError(
                        f"{at}: field 'embedding': expected {width[0]} numbers (as on line {width[1]}), got {len(embedding)}"
                    )
                rows.setdefault(name, []).append(embedding)
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{where}: expected UTF-8 JSON lines, got undecodable bytes ({exc.reason})") from None
    if not rows:
        raise InvalidInputError(f'{where}: expected lines {{"name": ROUTE, "embedding": [...]}}, got none')
    return {name: np.array(embeddings, dtype=F64) for name, embeddings in rows.items()}


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


@dataclass(frozen=True)
class Router:
    """What choosing a route reads, one consistent snapshot: the adapter and the published route table.

    ``down``, ``up_scaled``: ``float32[R, h]`` (``up * 1/sqrt(R)``); ``vectors``: ``float32[K, h]`` (the
    learned ``v_k``); ``bias``: ``float32[K]`` (the learned ``b_k``; the score adds ``(BETA / tau) b_k``); ``active``:
    ``uint8[K]`` (1: may be chosen); ``names``: K names; ``temperature``: tau.
    """

    down: np.ndarray
    up_scaled: np.ndarray
    vectors: np.ndarray
    bias: np.ndarray
    active: np.ndarray
    names: tuple[str, ...]
    temperature: float


def check_exploration(explore: Any, sample: Any, rng: Any, gamma: Any = None) -> tuple[str, float]:
    """``(mode, parameter)`` of an exploration: ``("greedy", 0)``, ``("epsilon", eps)``, ``("softmax", 0)`` or
    ``("squarecb", gamma)``; raise naming what is wrong.

    ``explore``: 0/None (greedy), a probability (epsilon-greedy), ``"softmax"`` or ``"squarecb"``;
    ``sample=True`` is ``explore="softmax"``; ``gamma``: SquareCB's (default :data:`DEFAULT_GAMMA`);
    ``rng``: None or something with a ``random()`` method (``random.Random``, a numpy Generator).
    """
    if not isinstance(sample, bool):
        raise InvalidInputError(f"sample: expected True or False, got {sample!r}")
    if rng is not None and not callable(getattr(rng, "random", None)):
        raise InvalidInputError(f"rng: expected None, a random.Random or a numpy Generator, got {rng!r}")
    if gamma is not None and (
        explore != "squarecb" or isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf
    ):
        raise InvalidInputError(f"gamma: expected a finite number > 0, with explore='squarecb', got {gamma!r}")
    if isinstance(explore, str):
        if explore not in ("softmax", "squarecb"):
            raise InvalidInputError(f"explore: expected a probability (epsilon-greedy), 'softmax' or 'squarecb', got {explore!r}")
        if sample:
            raise InvalidInputError(f"explore, sample: choose one way to explore, got explore={explore!r} and sample=True")
        return explore, float(DEFAULT_GAMMA if gamma is None else gamma) if explore == "squarecb" else 0.0
    epsilon = 0.0 if explore is None else explore
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 <= epsilon <= 1.0:
        raise InvalidInputError(f"explore: expected a probability in [0, 1] (epsilon-greedy), 'softmax' or 'squarecb', got {explore!r}")
    if sample and epsilon:
        raise InvalidInputError("explore, sample: choose one way to explore (epsilon-greedy or sampling from the softmax), got both")
    if sample:
        return "softmax", 0.0
    return ("epsilon", float(epsilon)) if epsilon else ("greedy", 0.0)


def adapt(x: np.ndarray, down: np.ndarray, up_scaled: np.ndarray) -> np.ndarray:
    """``forward(x)`` for finite ``float32[h]`` / ``[n, h]`` (checked): ``x + (x @ down.T) @ up_scaled``, computed in
    float64 and saturated at the float32 limit, so no finite input gives NaN or an infinity."""
    out = x.astype(F64) + (x.astype(F64) @ down.astype(F64).T) @ up_scaled.astype(F64)
    return np.clip(out, -_F32_MAX, _F32_MAX).astype(F32)


_F32_MAX = float(np.finfo(np.float32).max)


def scores(x: np.ndarray, router: Router) -> np.ndarray:
    """``float64[K]`` / ``[n, K]``: each route's score for finite queries ``x`` (retired routes: -inf).

    The query is normalised before anything else (so no finite input overflows), then adapted
    (``f = q^ + (q^ @ down.T) @ up_scaled``) and normalised again: ``s_k = f^ . v_k + (BETA / tau) b_k``. A zero query, or
    one the adapter maps to zero, scores ``bias_k`` alone.
    """
    q = x.astype(F64)
    q = _unit(q)
    f = _unit(q + (q @ router.down.astype(F64).T) @ router.up_scaled.astype(F64))
    s = f @ router.vectors.astype(F64).T + router.bias.astype(F64) * (BETA / router.temperature)
    return np.where(router.active.astype(bool), s, -np.inf)


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` scaled to unit length without overflow (by their largest magnitude first); zero rows stay zero."""
    top = np.max(np.abs(v), axis=-1, keepdims=True)
    v = v / np.where(top > 0, top, 1.0)
    n = np.sqrt(np.sum(v * v, axis=-1, keepdims=True))
    return v / np.where(n > 0, n, 1.0)


def best_of(s: np.ndarray) -> np.ndarray:
    """The greedy choice of scores ``s`` (``[K]`` or ``[n, K]``): the lowest index within :data:`TIE` of the best."""
    top = np.max(s, axis=-1, keepdims=True)
    return np.argmax(s >= top - TIE, axis=-1)


def policy(s: np.ndarray, best: int, mode: str, parameter: float, temperature: float) -> np.ndarray:
    """``float64[K]``: the probability of choosing each route under an exploration (retired routes: 0)."""
    active = np.isfinite(s)
    k = int(active.sum())
    if mode == "greedy" or k == 1:
        pi = np.zeros(len(s))
        pi[best] = 1.0
        return pi
    if mode == "epsilon":
        pi = np.where(active, parameter / k, 0.0)
        pi[best] += 1.0 - parameter
        return pi
    z = np.where(active, temperature * s, -np.inf)
    e = np.exp(z - z[best])
    p = e / e.sum()
    if mode == "softmax":
        return p
    pi = np.where(active, 1.0 / (k + parameter * (p[best] - p)), 0.0)  # squarecb
    pi[best] = 0.0
    pi[best] = 1.0 - pi.sum()
    return pi


def choose(router: Router, x: Any, *, mode: str = "greedy", parameter: float = 0.0, rng: Any = None) -> RouteChoice:
    """The :class:`RouteChoice` for ``x`` (``[h]`` or ``[n, h]``): the best score, after exploring (module docstring).

    ``rng``: a ``random.Random`` or ``numpy.random.Generator`` for the draws (default: ``random``).
    """
    arr = check_vectors(x, router.down.shape[1])
    adapted = adapt(arr, router.down, router.up_scaled)
    s = scores(arr, router)
    shown = np.where(np.isfinite(s), s, -np.inf).astype(F32)
    greedy = best_of(s)
    if s.ndim == 1:
        best = int(greedy)
        index, probability = best, 1.0
        if mode != "greedy":
            pi = policy(s, best, mode, parameter, router.temperature)
            index = _draw(pi, rng)
            probability = float(pi[index])
        return RouteChoice(index, router.names[index], shown, adapted, index != best, probability)
    bests = np.asarray(greedy, dtype=np.int64)
    indices, probabilities = bests, np.ones(len(bests))
    if mode != "greedy":
        pis = [policy(s[i], int(b), mode, parameter, router.temperature) for i, b in enumerate(bests.tolist())]
        indices = np.array([_draw(pi, rng) for pi in pis], np.int64)
        probabilities = np.array([pi[i] for pi, i in zip(pis, indices.tolist())])
    return RouteChoice(indices, [router.names[i] for i in indices.tolist()], shown, adapted, indices != bests, probabilities)


def _draw(pi: np.ndarray, rng: Any) -> int:
    """A route drawn from probabilities ``pi`` (one uniform number from ``rng``)."""
    u = (rng or random).random() * float(pi.sum())
    for i, w in enumerate(pi.tolist()):
        u -= w
        if u < 0 and w > 0:
            return i
    return int(np.flatnonzero(pi > 0)[-1])


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
