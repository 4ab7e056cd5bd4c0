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
from ..native import speedups as _speedups
from ..trajectory import CheckedTrajectory, RouteChoice, Trajectory, check_trajectory, check_vectors, to_trajectory
from .learner import F32, Learner, LoopMetrics, learning_signals
from .routes import ACTIVE, MODES, Router, RouteTable, adapt, check_exploration, choose, feedback_trajectory


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
    (0.002 reference, 0.03 routing: :data:`~sona_shm.config.DEFAULT_LR`); ``temperature`` is the routing rule's.
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
        max_routes: int = 0,
        adapter_lr: float = 0.0,
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
            max_routes=max_routes,
            adapter_lr=adapter_lr,
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

    def route_stats(self) -> dict[str, dict[str, Any]]:
        """Per route name: ``chosen`` (feedback on it as the route taken), ``best`` (as the right one), ``reward_sum``,
        ``retired`` and ``drift`` (how far its learned vector moved from its start, L2)."""
        if self.routes is None:
            return {}
        learner = self._learner
        k = len(self.routes)
        drift = np.linalg.norm(learner.route_vectors[:k].astype(np.float64) - self.routes.unit.astype(np.float64), axis=1)
        return {
            name: {"chosen": int(c), "best": int(b), "reward_sum": float(r), "retired": bool(t), "drift": float(d)}
            for name, c, b, r, t, d in zip(
                self.routes.names, learner.route_chosen, learner.route_best, learner.route_reward, self.routes.retired_flags(), drift
            )
        }

    # ----------------------------------------------------------------- changing the route table

    def add_route(self, name: str, vector: Any) -> int:
        """Add route ``name`` (its vector ``float[h]``, e.g. the mean of example embeddings); its index.

        It starts where a route of the table given at creation starts (its unit vector, bias 0)
        and what was learned for the other routes stays. Refused, changing nothing, for a name
        in use, another width or a table already at ``max_routes``.
        """
        table = self._table("add_route")
        new = table.added(name, vector, self.config.max_routes)
        index = self._learner.add_route(new.unit[-1])
        self.routes = new
        return index

    def rename_route(self, which: Any, name: str) -> None:
        """Rename route ``which`` (index or name); its learning and counts stay."""
        self.routes = self._table("rename_route").renamed(which, name)

    def retire_route(self, which: Any) -> None:
        """Retire route ``which``: it is never chosen or learned again; it keeps its index and counts."""
        table = self._table("retire_route")
        index = table.index(which, "route")
        new = table.retired_route(which)
        self._learner.retire_route(index)
        self.routes = new

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
        """``x + delta`` for one vector ``[hidden_dim]`` or a batch ``[n, hidden_dim]`` (saturated at the float32 limit)."""
        arr = check_vectors(x, self.hidden_dim)
        learner = self._learner
        return adapt(arr, learner.down, learner.up * np.float32(learner.scale))

    def route(self, x: Any, *, explore: Any = 0.0, sample: bool = False, rng: Any = None, gamma: Any = None) -> RouteChoice:
        """Choose a route for ``x`` (``[h]`` or ``[n, h]``): the best score of ``forward(x)`` with the learned routes.

        ``explore``: a probability (epsilon-greedy), ``"softmax"`` or ``"squarecb"`` (SquareCB, with
        ``gamma``; the exploration measured best for bandit feedback); ``sample=True`` is
        ``explore="softmax"``. Give :meth:`feedback` the route returned (``choice.index``), the
        one actually served, and its ``choice.probability``. ``rng``: a ``random.Random`` or
        numpy ``Generator`` for the draws (default: the C path's own generator, or ``random``).
        """
        self._table("route")
        mode, parameter = check_exploration(explore, sample, rng, gamma)
        router = self._router()
        if _speedups is not None:  # one C call for one vector, as Client.route
            u = -1.0 if rng is None or mode == "greedy" else float(rng.random())
            done = _speedups.route(
                x,
                router.down,
                router.up_scaled,
                router.vectors,
                router.bias,
                router.active,
                router.names,
                MODES[mode],
                parameter,
                router.temperature,
                u,
            )
            if done is not None:
                return done
        return choose(router, x, mode=mode, parameter=parameter, rng=rng)

    def _router(self) -> Router:
        """The published adapter and route table, as choosing reads them."""
        learner, table = self._learner, self.routes
        assert table is not None
        k = len(table)
        return Router(
            learner.down,
            learner.up * np.float32(learner.scale),
            learner.route_vectors[:k],  # rows of a C-contiguous array: contiguous
            learner.route_bias[:k],
            (learner.route_state[:k] == ACTIVE).astype(np.uint8),
            table.names,
            self.config.temperature,
        )

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
