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

from ..checks import check_int
from ..config import EngineConfig
from ..errors import InvalidInputError
from ..trajectory import CheckedTrajectory, RouteChoice, Trajectory, check_trajectory, check_vectors, to_trajectory
from .learner import F32, Learner, LoopMetrics, apply_adapter, learning_signals
from .routes import RouteTable, check_exploration, choose, feedback_trajectory


class InstantLoop:
    """Loop A in-process: ``on_trajectory`` learns, ``forward`` applies the adapter.

    ``capacity`` bounds the buffer of learned trajectories kept for :meth:`drain`;
    when it is full a trajectory is still learned but counted as dropped, exactly as
    the seed's bounded queue does.

    ``rule``: ``"reference"`` (the seed's bit-exact rule, the default) or
    ``"routing"`` (learns which route serves a query, from :meth:`feedback`; see
    :mod:`sona_shm.learn.routing`). ``routes``: ``float32[K, hidden_dim]`` route vectors with
    ``route_names`` (default ``route0…``); the routing rule needs them, and
    :meth:`route`/:meth:`feedback` use them under either rule. ``lr`` defaults by rule
    (0.002 reference, 1.0 routing); ``temperature`` is the routing rule's.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        rank: int = 2,
        lr: float | None = None,
        flush_threshold: int = 100,
        capacity: int = 10_000,
        *,
        rule: str = "reference",
        routes: Any = None,
        route_names: Any = None,
        temperature: float = 10.0,
    ) -> None:
        table = None
        if routes is not None:
            check_int("hidden_dim", hidden_dim, 1, 65_535)
            table = RouteTable.build(routes, route_names, hidden_dim=hidden_dim, names_where="route_names")
        elif route_names is not None:
            raise InvalidInputError("route_names: expected None without routes (give routes= too)")
        config = EngineConfig(
            hidden_dim,
            rank,
            lr,  # type: ignore[arg-type]  # None: the rule's default
            flush_threshold,
            capacity,
            rule=rule,
            routes=0 if table is None else len(table),
            temperature=temperature,
        )
        self.config = config
        self.hidden_dim = config.hidden_dim
        self.rank = config.rank
        self.capacity = config.capacity
        self.routes = table
        self._learner = Learner.for_engine(config, None if table is None else table.unit)
        self._buffer: deque[Trajectory] = deque()
        self._dropped = 0
        self._seen = 0
        self._next_id = 0

    @property
    def rule(self) -> str:
        return self.config.rule

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
        """A copy of the projection rows, ``float32[rank, hidden_dim]`` (learned under the routing rule only)."""
        return self._learner.down.copy()

    def route_stats(self) -> dict[str, dict[str, float | int]]:
        """Per route name: ``chosen`` (feedback on it as the route taken), ``best`` (as the right one), ``reward_sum``."""
        if self.routes is None:
            return {}
        learner = self._learner
        return {
            name: {"chosen": int(c), "best": int(b), "reward_sum": float(r)}
            for name, c, b, r in zip(self.routes.names, learner.route_chosen, learner.route_best, learner.route_reward)
        }

    def next_id(self) -> int:
        tid = self._next_id
        self._next_id += 1
        return tid

    def on_trajectory(self, traj: Trajectory) -> None:
        """Learn one finished trajectory (and keep it in the buffer if there is room)."""
        checked = check_trajectory(
            traj, self.hidden_dim, routes=0 if self.routes is None else len(self.routes), unit_reward=self.rule == "routing"
        )
        self.learn_checked([checked])

    def learn_checked(self, batch: list[CheckedTrajectory]) -> None:
        """Learn already-validated trajectories in order (one vectorised pass)."""
        query, rewards, act, n_steps, quality = _stack(batch, self.hidden_dim)
        route_index = np.array([-1 if c.route_index is None else c.route_index for c in batch], np.int64)
        best_index = np.array([-1 if c.best_index is None else c.best_index for c in batch], np.int64)
        if self.rule == "routing":
            self._learner.learn_feedback(query, route_index, best_index, quality)
        else:
            self._learner.learn(learning_signals(query, rewards, act, n_steps), quality)
        self._learner.count_routes(route_index, best_index, quality)
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

    def route(self, x: Any, *, explore: float = 0.0, sample: bool = False, rng: Any = None) -> RouteChoice:
        """Choose a route for ``x`` (``[h]`` or ``[n, h]``): the best cosine of ``forward(x)`` with the routes.

        ``explore``: probability of a uniformly drawn route instead (epsilon-greedy);
        ``sample``: draw from the routing rule's softmax instead. Either way, give
        :meth:`feedback` the route returned (``choice.index``), the one actually served.
        """
        table = self._table("route")
        epsilon = check_exploration(explore, sample, rng)
        return choose(table, self.forward(x), epsilon=epsilon, sample=sample, temperature=self.config.temperature, rng=rng)

    def feedback(self, x: Any, *, route: Any = None, reward: Any = None, best: Any = None, probability: Any = None) -> bool:
        """Learn which route serves ``x``: ``route=`` and ``reward=`` (bandit), or ``best=`` (full information).

        Routes are given by index or name; ``probability``: the route served was chosen with
        it (``RouteChoice.probability``). Recorded as a trajectory (see
        :mod:`sona_shm.learn.routes`); returns True like :meth:`Client.feedback`.
        """
        table = self._table("feedback")
        traj = feedback_trajectory(
            table, x, route=route, reward=reward, best=best, unit_reward=self.rule == "routing", probability=probability
        )
        self.on_trajectory(traj)
        return True

    def _table(self, what: str) -> RouteTable:
        if self.routes is None:
            raise InvalidInputError(f"{what}(): this loop has no routes; create it with routes=<K x hidden_dim vectors>")
        return self.routes

    def drain(self) -> list[Trajectory]:
        """Remove and return every buffered trajectory, oldest first."""
        out = list(self._buffer)
        self._buffer.clear()
        return out

    def drain_n(self, n: int) -> list[Trajectory]:
        """Remove and return up to ``n`` buffered trajectories, oldest first."""
        check_int("n", n, 0, 2**62)
        return [self._buffer.popleft() for _ in range(min(n, len(self._buffer)))]

    def buffer_stats(self) -> tuple[int, int, float]:
        """``(len, dropped, success_rate)`` of the trajectory buffer (seed semantics)."""
        rate = 1.0 if self._seen == 0 else (self._seen - self._dropped) / self._seen
        return len(self._buffer), self._dropped, rate


def _stack(batch: list[CheckedTrajectory], hidden_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
