"""``sona-shm evaluate``: how well an engine's current adapter, no adaptation and a checkpoint would route, from logged feedback.

The logged decisions (:mod:`sona_shm.learn.evaluate`) come from the engine's buffer (read,
not drained: what ``sona-shm drain`` would take next) or from files ``sona-shm drain``
wrote. The policies, each the greedy choice of a router:

- ``current``: the engine's committed adapter and learned route table (``--name``);
- ``unadapted``: no adaptation: the route vectors as given, no adapter, no bias (the plain
  cosine router every engine starts as), with the routes retired now left out;
- ``checkpoint``: the adapter and route table of a checkpoint file (``--against``), e.g.
  the last good one of the reward guard, to decide whether to roll back to it.

The decisions must have been made over the same route table (indices are routes): a
checkpoint whose routes are not the engine's first routes is refused.

A policy that learned from the very decisions it is evaluated on (the current adapter on
its own buffer, a checkpoint written after them) is judged on its training data: its
estimate is optimistic. Judge it on feedback logged after it was fixed — for instance while
learning is paused (``sona-shm pause``; the engine keeps serving and logging), or on a
drained file of a later period.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .engine.consumer import open_consumer
from .errors import CheckpointError, InvalidInputError
from .learn.evaluate import Estimate, LoggedDecisions, check_confidence, combined, estimate, greedy_choices, logged_decisions
from .learn.routes import ACTIVE, Router
from .store.checkpoint import Checkpoint, engine_checkpoint, read_checkpoint
from .trajectory import TrajectoryBatch


@dataclass(frozen=True)
class Evaluation:
    """The estimates of each policy over the same logged decisions; ``source`` says where they came from."""

    source: str
    logged: LoggedDecisions
    estimates: tuple[Estimate, ...]

    def as_dict(self) -> dict[str, object]:
        """What ``sona-shm evaluate --json`` prints."""
        logged = self.logged
        return {
            "source": self.source,
            "trajectories": logged.trajectories,
            "decisions": len(logged),
            "no_route": logged.no_route,
            "no_probability": logged.no_probability,
            "logged_mean_reward": logged.mean_reward,
            "estimates": [asdict(e) for e in self.estimates],
        }


def router_of(checkpoint: Checkpoint, where: str) -> Router:
    """The router an engine in the state of ``checkpoint`` serves with (``route()`` without exploration)."""
    table = checkpoint.routes
    if table is None:
        raise InvalidInputError(f"{where}: expected an engine with a route table (--routes FILE), got one without")
    k = len(table)
    arrays = checkpoint.arrays
    vectors = arrays.get("route_vectors", table.unit)[:k]
    bias = arrays.get("route_bias", np.zeros(k, np.float32))[:k]
    state = arrays.get("route_state")
    active = (state[:k] == ACTIVE) if state is not None else ~np.array(table.retired_flags(), bool)
    scale = np.float32(1.0 / math.sqrt(checkpoint.config.rank))
    return Router(
        checkpoint.down, checkpoint.up * scale, vectors, bias, active.astype(np.uint8), table.names, checkpoint.config.temperature
    )


def unadapted_router(current: Router, checkpoint: Checkpoint) -> Router:
    """No adaptation: ``checkpoint``'s route vectors as given (unit), a zero adapter, no bias; ``current``'s active routes."""
    table = checkpoint.routes
    assert table is not None
    zero = np.zeros_like(checkpoint.down)
    return Router(zero, zero, table.unit, np.zeros(len(table), np.float32), current.active, table.names, current.temperature)


def read_logged(name: str | None, files: Sequence[str]) -> tuple[LoggedDecisions, str]:
    """The logged decisions of ``files`` (``sona-shm drain``'s), or else of engine ``name``'s buffer (not drained)."""
    if files:
        parts = []
        for path in files:
            try:
                batch = TrajectoryBatch.load(path)
            except OSError as exc:
                raise InvalidInputError(f"--from: expected a file `sona-shm drain` wrote, got {path!r}: {exc.strerror or exc}") from None
            except (ValueError, KeyError) as exc:
                raise InvalidInputError(f"--from: expected a file `sona-shm drain` wrote, got {path!r}: {exc}") from None
            parts.append(logged_decisions(batch))
        widths = sorted({p.query.shape[1] for p in parts if len(p)})
        if len(widths) > 1:
            raise InvalidInputError(f"--from: expected files of one engine (one hidden_dim), got queries of widths {widths}")
        return combined(parts), ", ".join(files)
    assert name is not None
    with open_consumer(name) as consumer:
        batch = consumer.peek()
    return logged_decisions(batch), f"the buffer of {name!r}"


def evaluate(name: str | None = None, *, files: Sequence[str] = (), against: str | None = None, confidence: float = 0.95) -> Evaluation:
    """Estimate the mean reward of engine ``name``'s current adapter, of no adaptation and of checkpoint ``against``.

    The logged decisions are those of ``files`` (written by ``sona-shm drain``) or, without files, those in
    ``name``'s buffer (read, not drained). Without ``name``, ``against`` is needed (its route table is the one the
    decisions were made over) and ``current`` is left out. Raises :class:`InvalidInputError` naming the argument
    when there is nothing to evaluate or the pieces do not belong together.
    """
    confidence = check_confidence(confidence)
    files = [os.fspath(f) for f in files]
    if name is None and not files:
        raise InvalidInputError("evaluate: expected --name N (an engine) or --from FILE (logged feedback), got neither")
    if name is None and against is None:
        raise InvalidInputError(
            "--from: needs --name N (whose current adapter is evaluated) or --against CHECKPOINT (whose route table the "
            "decisions were made over), got neither"
        )
    current = engine = None
    if name is not None:
        engine, _ = engine_checkpoint(name)
        current = router_of(engine, f"--name {name}")
    other = checkpoint = None
    if against is not None:
        try:
            other = read_checkpoint(against)
        except CheckpointError as exc:  # the message names the argument, what it takes and what it got
            raise CheckpointError(f"--against: expected a checkpoint file, got {exc}") from None
        checkpoint = router_of(other, f"--against {against}")
        if engine is not None:
            assert engine.routes is not None and other.routes is not None
            if other.config.hidden_dim != engine.config.hidden_dim or not engine.routes.starts_with(other.routes):
                raise InvalidInputError(
                    f"--against: expected a checkpoint over engine {name!r}'s routes (the same first route vectors and "
                    f"hidden_dim {engine.config.hidden_dim}), got {against} with {len(other.routes)} routes of hidden_dim "
                    f"{other.config.hidden_dim}"
                )
    logged, source = read_logged(name, files)
    if not len(logged):
        raise InvalidInputError(
            f"logged feedback: expected feedback with the probability of the route served (feedback(..., route=, "
            f"probability=choice.probability)), got none in {source}: {logged.trajectories} trajectories, "
            f"{logged.no_route} naming no route served, {logged.no_probability} without a probability"
        )
    base = engine if engine is not None else other
    assert base is not None
    if logged.query.shape[1] != base.config.hidden_dim:
        raise InvalidInputError(f"--from: expected queries of hidden_dim {base.config.hidden_dim}, got {logged.query.shape[1]} in {source}")
    routers: list[tuple[str, Router]] = []
    if current is not None:
        routers.append(("current", current))
    reference = current if current is not None else checkpoint
    assert reference is not None
    routers.append(("unadapted", unadapted_router(reference, base)))
    if checkpoint is not None:
        routers.append(("checkpoint", checkpoint))
    estimates = tuple(estimate(label, greedy_choices(router, logged.query), logged, confidence=confidence) for label, router in routers)
    return Evaluation(source, logged, estimates)


def render(evaluation: Evaluation) -> str:
    """The table ``sona-shm evaluate`` prints."""
    logged = evaluation.logged
    mean = logged.mean_reward
    pct = f"{round(100 * evaluation.estimates[0].confidence)}%"
    lines = [
        f"{len(logged):,} logged decisions from {evaluation.source} ({logged.trajectories:,} trajectories: "
        f"{logged.no_route:,} naming no route served, {logged.no_probability:,} without a probability); "
        f"mean reward as logged {mean:.4f}",
        f"{'policy':<11} {'IPS':>7}  {pct + ' interval':<18} {'SNIPS':>7}  {pct + ' interval':<18} "
        f"{'support':>9} {'effective':>10} {'weight':>7}",
    ]
    for e in evaluation.estimates:
        snips = "-" if e.snips is None else f"{e.snips:.4f}"
        interval = "-" if e.snips is None else f"[{e.snips_low:.4f}, {e.snips_high:.4f}]"
        lines.append(
            f"{e.policy:<11} {e.ips:>7.4f}  {f'[{e.ips_low:.4f}, {e.ips_high:.4f}]':<18} {snips:>7}  {interval:<18} "
            f"{e.support:>9,} {e.effective:>10,.1f} {e.weight_mean:>7.3f}"
        )
    lines.append(
        "support: logged decisions on which the policy serves the route that was served (the others weigh 0); effective: "
        "the effective sample size; weight: the mean weight, 1 in expectation (far from 1: the logs explored too little "
        "where that policy goes, do not trust its estimates)"
    )
    return "\n".join(lines)


__all__ = ["Evaluation", "evaluate", "read_logged", "render", "router_of", "unadapted_router"]
