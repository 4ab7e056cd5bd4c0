"""The values that cross the API — trajectories, batches of them, route choices — and the one validator of each.

A :class:`Trajectory` is what one request leaves behind: the query embedding, a few
:class:`Step` s (activations, attention weights, reward) and a final quality. Arrays
may be lists, tuples or numpy arrays of any real dtype; :func:`check_trajectory` turns
them into contiguous ``float32`` arrays and refuses anything the reference would
silently mangle (see ``SEMANTICS.md`` §6) with an :class:`InvalidInputError` that names
the argument, the expectation and what was got.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any, NamedTuple

import numpy as np

from .errors import InvalidInputError

F32 = np.dtype(np.float32)
_ndarray = np.ndarray

#: Longest route name a trajectory may carry, in UTF-8 bytes (it is stored inline).
ROUTE_MAX_BYTES = 64

_U64_MAX = 2**64 - 1
_F32_MAX = float(np.finfo(np.float32).max)

# all_finite's dot overflows for finite values beyond ~1.8e19 (a uint64-max input, say)
# and then falls back to the exact test, so numpy's warning about it is noise; a filter
# costs nothing per call, an np.errstate() block ~1 µs (learning.py does the same).
warnings.filterwarnings("ignore", "overflow encountered in dot", RuntimeWarning, __name__)


@dataclass(slots=True)
class Step:
    """One step of a trajectory.

    ``activations``: up to ``hidden_dim`` values; shorter ones add into the first
    entries only (the reference keeps "a subset for efficiency").
    ``attention``: up to the engine's ``attention_dim`` values (``None`` or ``()`` for
    none); kept for consumers of the trajectory buffer, unused by Loop A.
    ``reward``: a finite number.
    """

    activations: Any
    attention: Any
    reward: float


@dataclass(slots=True)
class Trajectory:
    """A finished request: query embedding, steps, final quality.

    ``query``: exactly ``hidden_dim`` values. ``quality``: any finite number, used as
    given. ``latency_us`` and ``route`` are kept for buffer consumers. ``id`` is
    assigned by ``record()``/``on_trajectory()`` when left ``None``.

    ``route_index`` and ``best_index`` make the trajectory a *feedback* about the
    engine's route table (see :mod:`sona_shm.learn.routes`; ``feedback()`` fills them): the
    index of the route taken, and of the route that was right. Both ``None`` for an
    ordinary trajectory. ``probability``: the probability with which the route taken was
    chosen (``RouteChoice.probability``), in (0, 1]; what off-policy evaluation weighs a
    logged decision by. None: not recorded.
    """

    query: Any
    steps: Sequence[Step]
    quality: float
    latency_us: int = 0
    route: str | None = None
    id: int | None = None
    route_index: int | None = None
    best_index: int | None = None
    probability: float | None = None


class CheckedTrajectory(NamedTuple):
    """A validated trajectory: every array 1-D ``float32``, finite (unless asked not to check)."""

    query: np.ndarray  # float32[hidden_dim] (maybe strided: the caller's array, not a copy)
    activations: tuple[np.ndarray, ...]  # float32[<= hidden_dim] per step
    attention: tuple[np.ndarray, ...]  # float32[<= attention_dim] per step
    rewards: tuple[float, ...]
    quality: float
    latency_us: int
    route: bytes
    id: int | None
    route_index: int | None
    best_index: int | None
    probability: float  # 0.0: not recorded


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def all_finite(arr: np.ndarray) -> bool:
    # One BLAS dot is the cheapest full scan numpy offers (~0.3 µs for 256 values,
    # against ~2 µs for np.isfinite().all()). NaN and ±Inf always make the dot
    # non-finite; a non-finite dot of finite values (overflow past ~1.8e19) falls
    # back to the exact test, so the answer is exact either way (numpy warns about
    # that overflow, which needs magnitudes beyond ~1.8e19, and the filter above keeps quiet).
    if math.isfinite(arr.dot(arr)):
        return True
    return bool(np.isfinite(arr).all())


Name = str | tuple[int, str]  # "query", or (step index, field) formatted only for errors


def _label(name: Name) -> str:
    return name if isinstance(name, str) else f"steps[{name[0]}].{name[1]}"


def as_vector(
    value: Any,
    name: Name,
    *,
    length: int | None = None,
    max_length: int | None = None,
    what: str = "",
    where: str = "",
    finite: bool = True,
) -> np.ndarray:
    """Return ``value`` as a contiguous ``float32[n]`` (no copy when it is one).

    ``length`` demands an exact length, ``max_length`` an upper bound; ``what`` and
    ``where`` say where the bound comes from (``"hidden_dim"``, ``" of segment 'x'"``).
    With ``finite=False`` the caller promises to check finiteness itself.
    """
    if type(value) is np.ndarray and value.dtype is F32 and value.ndim == 1 and value.flags.c_contiguous:
        n = value.shape[0]
        # The common case in one test; anything off goes down the path that names it.
        if (length is None or n == length) and (max_length is None or n <= max_length) and (not finite or all_finite(value)):
            return value
        arr = value
    else:
        arr = _convert(value, name)
        if arr.ndim != 1:
            raise InvalidInputError(f"{_label(name)}: expected a 1-D sequence of numbers, got {_describe(value)}")
    n = arr.shape[0]
    if length is not None and n != length:
        raise InvalidInputError(f"{_label(name)}: expected {length} values ({what}{where}), got {n}")
    if max_length is not None and n > max_length:
        raise InvalidInputError(f"{_label(name)}: expected at most {max_length} values ({what}{where}), got {n}")
    if finite and not all_finite(arr):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InvalidInputError(f"{_label(name)}: expected finite values within float32 range, got {_original(value, bad)} at index {bad}")
    return arr


def _original(value: Any, index: int) -> str:
    try:
        return repr(float(np.asarray(value).reshape(-1)[index]))
    except Exception:  # pragma: no cover - describing the error must not raise
        return "a non-finite value"


def _convert(value: Any, name: Name) -> np.ndarray:
    """Any real numeric array-like to contiguous float32; refuse strings, objects, complex."""
    if isinstance(value, (str, bytes)) or value is None:
        raise InvalidInputError(f"{_label(name)}: expected a sequence of numbers, got {_describe(value)}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nesting and the like
        raise InvalidInputError(f"{_label(name)}: expected a sequence of numbers, got {_describe(value)} ({exc})") from None
    if arr.dtype.kind not in "iuf":  # booleans are refused too: a mask passed by mistake, not numbers
        raise InvalidInputError(f"{_label(name)}: expected real numbers castable to float32, got {_describe(value)}")
    with np.errstate(over="ignore", invalid="ignore"):
        # Not np.ascontiguousarray: it turns a scalar into a 1-element vector, which the
        # caller's 1-D check must see and refuse.
        return np.asarray(arr, dtype=F32, order="C")


def as_finite_float(value: Any, name: Name) -> float:
    """Return ``value`` as a finite Python float within float32 range, or raise naming ``name``."""
    if type(value) is float and -_F32_MAX <= value <= _F32_MAX:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{_label(name)}: expected a finite number, got {_describe(value)}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond float64, such as 10**400
        result = math.inf
    if not abs(result) <= _F32_MAX:  # also refuses NaN
        got = repr(value) if len(repr(value)) <= 60 else _describe(value)  # 10**400 has 401 digits
        raise InvalidInputError(f"{_label(name)}: expected a finite number (within float32 range), got {got}")
    return result


def check_trajectory(
    traj: Any,
    hidden_dim: int,
    *,
    max_steps: int | None = None,
    attention_dim: int | None = None,
    where: str = "",
    finite: bool = True,
    routes: int = 0,
    unit_reward: bool = False,
) -> CheckedTrajectory:
    """Validate ``traj`` completely and return its checked form, or raise.

    ``routes``: the number of routes of the engine (``route_index``/``best_index`` must
    be below it; 0 refuses them). ``unit_reward``: the engine learns with the routing
    rule, so a bandit feedback's ``quality`` (its reward) must be in [0, 1].

    Nothing is written anywhere before this returns, so a refused trajectory leaves
    every counter, buffer and weight as it was. ``where`` names the bound's source
    in messages (``" of segment 'x'"``). ``finite=False`` skips only the scan of the
    arrays for NaN/Inf, for a caller that scans them more cheaply after copying them
    somewhere private (the producer client); numbers are always checked.
    """
    # Each field is tested first for the common case (float32 numpy arrays, Python
    # floats and ints) in one expression; anything else goes through the helper that
    # converts it or raises naming what is wrong. This keeps a record() at a few µs.
    if type(traj) is not Trajectory and not isinstance(traj, Trajectory):
        raise InvalidInputError(f"trajectory: expected a sona_shm.Trajectory, got {_describe(traj)}")
    query = traj.query
    if not (type(query) is _ndarray and query.dtype is F32 and query.shape == (hidden_dim,)) or (finite and not all_finite(query)):
        query = as_vector(query, "query", length=hidden_dim, what="hidden_dim", where=where, finite=finite)
    # One snapshot of the steps serves every check below and the writing after it: a
    # sequence whose len() under-reports (or a list another thread appends to) must not
    # slip more steps past max_steps than the slot holds.
    steps = traj.steps
    if type(steps) is list:
        steps = tuple(steps)  # one atomic copy of the references
    elif type(steps) is not tuple:
        steps = _snapshot(steps, max_steps, where)
    n = len(steps)
    if max_steps is not None and n > max_steps:
        raise InvalidInputError(f"steps: expected at most {max_steps} steps (max_steps{where}), got {n}")
    acts = []
    atts = []
    rewards = []
    for i, step in enumerate(steps):
        if type(step) is not Step and not isinstance(step, Step):
            raise InvalidInputError(f"steps[{i}]: expected a sona_shm.Step, got {_describe(step)}")
        act = step.activations
        if not (type(act) is _ndarray and act.dtype is F32 and act.ndim == 1 and act.shape[0] <= hidden_dim) or (
            finite and not all_finite(act)
        ):
            act = as_vector(act, (i, "activations"), max_length=hidden_dim, what="hidden_dim", where=where, finite=finite)
        acts.append(act)
        att = step.attention
        if att is None or (type(att) is tuple and not att):
            att = _EMPTY
        elif not (
            type(att) is _ndarray and att.dtype is F32 and att.ndim == 1 and (attention_dim is None or att.shape[0] <= attention_dim)
        ) or (finite and not all_finite(att)):
            att = as_vector(att, (i, "attention"), max_length=attention_dim, what="attention_dim", where=where, finite=finite)
        atts.append(att)
        reward = step.reward
        if type(reward) is not float or not -_F32_MAX <= reward <= _F32_MAX:
            reward = as_finite_float(reward, (i, "reward"))
        rewards.append(reward)
    quality = traj.quality
    if type(quality) is not float or not -_F32_MAX <= quality <= _F32_MAX:
        quality = as_finite_float(quality, "quality")
    latency = traj.latency_us
    if type(latency) is not int or not 0 <= latency <= _U64_MAX:
        latency = _as_u64(latency, "latency_us", "an integer in [0, 2**64)")
    route = traj.route
    if route is None:
        route_bytes = b""
    elif isinstance(route, str):
        try:
            route_bytes = route.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"route: expected text encodable as UTF-8, got {route!r} ({exc.reason})") from None
        if len(route_bytes) > ROUTE_MAX_BYTES:
            raise InvalidInputError(f"route: expected at most {ROUTE_MAX_BYTES} UTF-8 bytes, got {len(route_bytes)}")
    else:
        raise InvalidInputError(f"route: expected a str or None, got {_describe(route)}")
    tid = traj.id
    if tid is not None and (type(tid) is not int or not 0 <= tid <= _U64_MAX):
        tid = _as_u64(tid, "id", "None or an integer in [0, 2**64)")
    route_index = traj.route_index
    best_index = traj.best_index
    if route_index is not None or best_index is not None:
        route_index = _route_index(route_index, "route_index", routes, where)
        best_index = _route_index(best_index, "best_index", routes, where)
        if unit_reward and best_index is None and not 0.0 <= quality <= 1.0:
            raise InvalidInputError(
                "quality: expected the reward of a bandit feedback in [0, 1] under the routing rule "
                f"(1: the route served well), got {quality!r}"
            )
    probability = traj.probability
    if probability is None:
        probability = 0.0
    elif type(probability) is not float or not 0.0 < probability <= 1.0:
        probability = as_finite_float(probability, "probability")
        if not 0.0 < probability <= 1.0:
            raise InvalidInputError(
                f"probability: expected the probability the route taken was chosen with, in (0, 1], got {traj.probability!r}"
            )
    return CheckedTrajectory(
        query, tuple(acts), tuple(atts), tuple(rewards), quality, latency, route_bytes, tid, route_index, best_index, probability
    )


def _route_index(value: Any, name: str, routes: int, where: str) -> int | None:
    if value is None:
        return None
    if routes == 0:
        raise InvalidInputError(
            f"{name}: expected None, the engine{where} has no route table (create it with --routes FILE), got {value!r}"
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < routes:
        raise InvalidInputError(f"{name}: expected None or a route index in [0, {routes - 1}]{where}, got {_describe(value)}")
    return int(value)


def check_finite(checked: CheckedTrajectory) -> None:
    """Raise naming the first array of ``checked`` (in the order checked) that holds NaN or ±Inf."""
    arrays: list[tuple[Name, np.ndarray]] = [("query", checked.query)]
    for i, (act, att) in enumerate(zip(checked.activations, checked.attention)):
        arrays += [((i, "activations"), act), ((i, "attention"), att)]
    for name, arr in arrays:
        as_vector(arr, name)  # contiguous float32 already: only the finiteness check (and its message) is left


def _snapshot(steps: Any, max_steps: int | None, where: str) -> tuple:
    """The items of a sequence that is not a list or tuple, as a tuple, if its len() tells the truth."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise InvalidInputError(f"steps: expected a sequence of sona_shm.Step, got {_describe(steps)}")
    try:
        n = len(steps)  # a custom Sequence may raise here, or claim a negative length
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"steps: expected a sequence of sona_shm.Step, got {_describe(steps)} ({exc})") from None
    if max_steps is not None and n > max_steps:
        raise InvalidInputError(f"steps: expected at most {max_steps} steps (max_steps{where}), got {n}")
    try:
        items = tuple(islice(steps, n + 1))  # one more than it claims: enough to catch a lie
    except Exception as exc:  # whatever its iteration raises, the input is refused
        what = f"{_describe(steps)} (iterating it raised {exc!r})"
        raise InvalidInputError(f"steps: expected a sequence of sona_shm.Step, got {what}") from None
    if len(items) != n:
        more = "or more " if len(items) > n else ""
        raise InvalidInputError(f"steps: expected a sequence whose len() matches its items, got len() {n} and {len(items)} {more}items")
    return items


def _as_u64(value: Any, name: str, expected: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _U64_MAX:
        raise InvalidInputError(f"{name}: expected {expected}, got {_describe(value)}")
    return int(value)


_EMPTY = np.zeros(0, dtype=F32)
_EMPTY.flags.writeable = False


def to_trajectory(checked: CheckedTrajectory, id: int) -> Trajectory:
    """The user-facing form of a checked trajectory (arrays are the checked copies)."""
    return Trajectory(
        query=checked.query,
        steps=[Step(a, t, r) for a, t, r in zip(checked.activations, checked.attention, checked.rewards)],
        quality=checked.quality,
        latency_us=checked.latency_us,
        route=checked.route.decode("utf-8") if checked.route else None,
        id=id,
        route_index=checked.route_index,
        best_index=checked.best_index,
        probability=checked.probability or None,
    )


def check_vectors(x: Any, hidden_dim: int) -> np.ndarray:
    """``x`` as finite ``float32[hidden_dim]`` or ``float32[n, hidden_dim]``, or raise."""
    if type(x) is np.ndarray and x.dtype == F32 and x.ndim == 1:
        return as_vector(x, "x", length=hidden_dim, what="hidden_dim")
    try:
        arr = np.asarray(x) if not isinstance(x, (str, bytes)) else None
    except (ValueError, TypeError, OverflowError):  # ragged nesting and the like
        arr = None
    if arr is None or arr.dtype.kind not in "iuf" or arr.ndim not in (1, 2):
        got = f"an array of dtype {arr.dtype} and shape {arr.shape}" if arr is not None else repr(x)
        raise InvalidInputError(f"x: expected float32[{hidden_dim}] or float32[n, {hidden_dim}], got {got}")
    if arr.ndim == 1:
        return as_vector(arr, "x", length=hidden_dim, what="hidden_dim")
    if arr.shape[1] != hidden_dim:
        raise InvalidInputError(f"x: expected float32[n, {hidden_dim}], got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.ascontiguousarray(arr, dtype=F32)
    finite = np.isfinite(arr)
    if not finite.all():
        row, col = map(int, np.argwhere(~finite)[0])
        raise InvalidInputError(f"x: expected finite values within float32 range, got a non-finite value at [{row}, {col}]")
    return arr


class RouteChoice(NamedTuple):
    """What :meth:`Client.route` / :meth:`InstantLoop.route` chose.

    For one vector: ``index`` (int), ``name`` (str), ``scores`` (``float32[K]``, the
    cosine of the adapted query with every route), ``adapted`` (``float32[h]``, what
    ``forward(x)`` returns), ``explored`` (bool: exploration picked ``index`` instead of
    the best-scoring route) and ``probability`` (float: the probability with which
    ``index`` was chosen — 1.0 for a greedy choice; pass it to ``feedback(...,
    probability=)`` to log it). For a batch of ``n``: ``int64[n]``, a list of ``n`` names,
    ``float32[n, K]``, ``float32[n, h]``, ``bool[n]`` and ``float64[n]``.
    """

    index: Any
    name: Any
    scores: np.ndarray
    adapted: np.ndarray
    explored: Any
    probability: Any


#: TrajectoryBatch arrays that files written by earlier versions lack.
_ADDED_LATER = {"route_index": -1, "best_index": -1, "probability": np.nan}


@dataclass(frozen=True)
class TrajectoryBatch:
    """``k`` drained trajectories as arrays, oldest first; padding is zero.

    ``S`` is the engine's ``max_steps``, ``h`` its ``hidden_dim``, ``A`` its
    ``attention_dim``, so batches of one engine stack with ``np.concatenate``.
    :meth:`save` writes an ``.npz`` that ``np.load`` reads without pickle.
    """

    traj_id: np.ndarray  # uint64[k]
    query: np.ndarray  # float32[k, h]
    quality: np.ndarray  # float32[k]
    latency_us: np.ndarray  # uint64[k]
    route: np.ndarray  # str[k] ('' when the trajectory had none)
    n_steps: np.ndarray  # int32[k]
    rewards: np.ndarray  # float32[k, S], zero past n_steps
    act_len: np.ndarray  # int32[k, S], zero past n_steps
    activations: np.ndarray  # float32[k, S, h], zero past act_len and n_steps
    att_len: np.ndarray  # int32[k, S], zero past n_steps
    attention: np.ndarray  # float32[k, S, A], zero past att_len and n_steps
    route_index: np.ndarray  # int32[k], the route taken of a feedback; -1 for none
    best_index: np.ndarray  # int32[k], the route that was right of a feedback; -1 for none
    probability: np.ndarray  # float32[k], the probability the route taken was chosen with; NaN: not recorded

    def __len__(self) -> int:
        return int(self.traj_id.shape[0])

    def trajectories(self) -> list[Trajectory]:
        """The batch as :class:`Trajectory` objects (arrays are views into the batch)."""
        n_steps, act_len, att_len = self.n_steps.tolist(), self.act_len.tolist(), self.att_len.tolist()
        rewards, quality = self.rewards.tolist(), self.quality.tolist()
        ids, latency, route = self.traj_id.tolist(), self.latency_us.tolist(), self.route.tolist()
        route_index, best_index, probability = self.route_index.tolist(), self.best_index.tolist(), self.probability.tolist()
        act, att, query = self.activations, self.attention, self.query
        return [
            Trajectory(
                query[i],
                [Step(act[i, s, : act_len[i][s]], att[i, s, : att_len[i][s]], rewards[i][s]) for s in range(n_steps[i])],
                quality[i],
                latency[i],
                route[i] or None,
                ids[i],
                None if route_index[i] < 0 else route_index[i],
                None if best_index[i] < 0 else best_index[i],
                None if probability[i] != probability[i] else probability[i],  # NaN: not recorded
            )
            for i in range(len(ids))
        ]

    def arrays(self) -> dict[str, np.ndarray]:
        """Field name to array, in declaration order (what :meth:`save` writes)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, file: Any) -> None:
        """Write the arrays as an uncompressed ``.npz`` to a path or binary file object."""
        arrays: dict[str, Any] = self.arrays()  # keyword arrays; savez's own keywords are not among the names
        np.savez(file, **arrays)

    @classmethod
    def load(cls, file: Any) -> TrajectoryBatch:
        """Read what :meth:`save` (or ``sona-shm drain``) wrote."""
        with np.load(file, allow_pickle=False) as data:
            names = [f.name for f in fields(cls)]
            missing = [n for n in names if n not in data.files and n not in _ADDED_LATER]
            if missing:
                raise InvalidInputError(f"file: expected a sona_shm trajectory batch with arrays {names}, missing {missing}")
            arrays = {n: data[n] for n in names if n in data.files}
            k = len(arrays["traj_id"])
            for n, none in _ADDED_LATER.items():  # files written before feedback (or propensities) existed hold none
                arrays.setdefault(n, np.full(k, none, np.int32 if n.endswith("_index") else np.float32))
            return cls(**arrays)
