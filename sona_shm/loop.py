"""``InstantLoop``: SONA Loop A in one process, with the reference's exact semantics.

This is the seed's ``InstantLoop`` (``loops/instant.rs``) with its defaults: learn every
finished trajectory, flush every ``flush_threshold`` signals, keep a bounded buffer of
trajectories for background consumers. It is the oracle the cross-process engine is
tested against, and the right tool when a service runs as a single process.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from .errors import InvalidInputError
from .learning import F32, Learner, LoopMetrics, apply_adapter, learning_signals
from .trajectory import CheckedTrajectory, Trajectory, as_vector, check_trajectory, to_trajectory

DEFAULT_HIDDEN_DIM = 256
DEFAULT_RANK = 2
DEFAULT_LR = 0.002
DEFAULT_FLUSH_THRESHOLD = 100
DEFAULT_CAPACITY = 10_000


def check_config(hidden_dim: Any, rank: Any, lr: Any, flush_threshold: Any, capacity: Any) -> None:
    """Refuse an engine configuration the reference would abort on or mangle."""
    _check_int("hidden_dim", hidden_dim, 1, 65_535)
    if isinstance(rank, bool) or rank not in (1, 2):
        raise InvalidInputError(f"rank: expected 1 or 2, got {rank!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (np.isfinite(lr) and lr > 0):
        raise InvalidInputError(f"lr: expected a finite number > 0, got {lr!r}")
    _check_int("flush_threshold", flush_threshold, 1, 2**62)
    _check_int("capacity", capacity, 0, 2**31 - 1)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidInputError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")


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


class InstantLoop:
    """Loop A in-process: ``on_trajectory`` learns, ``forward`` applies the adapter.

    ``capacity`` bounds the buffer of learned trajectories kept for :meth:`drain`;
    when it is full a trajectory is still learned but counted as dropped, exactly as
    the seed's bounded queue does.
    """

    def __init__(
        self,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        rank: int = DEFAULT_RANK,
        lr: float = DEFAULT_LR,
        flush_threshold: int = DEFAULT_FLUSH_THRESHOLD,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        check_config(hidden_dim, rank, lr, flush_threshold, capacity)
        self.hidden_dim = int(hidden_dim)
        self.rank = int(rank)
        self.capacity = int(capacity)
        self._learner = Learner(self.hidden_dim, self.rank, float(lr), int(flush_threshold))
        self._buffer: deque[Trajectory] = deque()
        self._dropped = 0
        self._seen = 0
        self._next_id = 0

    @property
    def lr(self) -> float:
        return self._learner.lr

    @property
    def flush_threshold(self) -> int:
        return self._learner.flush_threshold

    @property
    def metrics(self) -> LoopMetrics:
        return self._learner.metrics

    @property
    def pending(self) -> int:
        """Signals accumulated since the last flush."""
        return self._learner.pending

    @property
    def up(self) -> np.ndarray:
        """A copy of the learned adapter rows, ``float32[rank, hidden_dim]``."""
        return self._learner.up.copy()

    @property
    def down(self) -> np.ndarray:
        """A copy of the fixed projection rows, ``float32[rank, hidden_dim]``."""
        return self._learner.down.copy()

    def next_id(self) -> int:
        tid = self._next_id
        self._next_id += 1
        return tid

    def on_trajectory(self, traj: Trajectory) -> None:
        """Learn one finished trajectory (and keep it in the buffer if there is room)."""
        checked = check_trajectory(traj, self.hidden_dim)
        self.learn_checked([checked])

    def learn_checked(self, batch: list[CheckedTrajectory]) -> None:
        """Learn already-validated trajectories in order (one vectorised pass)."""
        query, rewards, act, n_steps, quality = _stack(batch, self.hidden_dim)
        signals = learning_signals(query, rewards, act, n_steps)
        self._learner.learn(signals, quality)
        for checked in batch:
            tid = checked.id if checked.id is not None else self.next_id()
            self._seen += 1
            if len(self._buffer) < self.capacity:
                self._buffer.append(to_trajectory(checked, tid))
            else:
                self._dropped += 1

    def flush(self) -> bool:
        """Apply pending gradients now; False (and no change) when nothing is pending."""
        return self._learner.flush()

    def forward(self, x: Any) -> np.ndarray:
        """``x + delta`` for one vector ``[hidden_dim]`` or a batch ``[n, hidden_dim]``."""
        arr = check_vectors(x, self.hidden_dim)
        learner = self._learner
        return apply_adapter(arr, learner.down, learner.up * np.float32(learner.scale))

    def drain(self) -> list[Trajectory]:
        """Remove and return every buffered trajectory, oldest first."""
        out = list(self._buffer)
        self._buffer.clear()
        return out

    def drain_n(self, n: int) -> list[Trajectory]:
        """Remove and return up to ``n`` buffered trajectories, oldest first."""
        _check_int("n", n, 0, 2**62)
        return [self._buffer.popleft() for _ in range(min(n, len(self._buffer)))]

    def buffer_stats(self) -> tuple[int, int, float]:
        """``(len, dropped, success_rate)`` of the trajectory buffer (seed semantics)."""
        rate = 1.0 if self._seen == 0 else (self._seen - self._dropped) / self._seen
        return len(self._buffer), self._dropped, rate


def _stack(batch: list[CheckedTrajectory], hidden_dim: int):
    """Pack checked trajectories into the dense batch arrays ``learning_signals`` takes."""
    n = len(batch)
    width = max((len(c.rewards) for c in batch), default=0)
    query = np.empty((n, hidden_dim), dtype=F32)
    rewards = np.zeros((n, max(width, 1)), dtype=F32)
    act = np.zeros((n, max(width, 1), hidden_dim), dtype=F32)
    n_steps = np.empty(n, dtype=np.int64)
    quality = np.empty(n, dtype=F32)
    for i, c in enumerate(batch):
        query[i] = c.query
        n_steps[i] = len(c.rewards)
        quality[i] = c.quality
        for s, (a, r) in enumerate(zip(c.activations, c.rewards)):
            act[i, s, : a.shape[0]] = a
            rewards[i, s] = r
    return query, rewards, act, n_steps, quality
