#!/usr/bin/env python3
"""How often the intervals of ``sona-shm evaluate`` hold the true reward, on the synthetic router task.

A router (``scripts/router_task.py``: 32 dimensions, 4 routes, 8 clusters, 3 misrouted, noise
1.2) learns from 1500 on-policy bandit feedbacks with epsilon-greedy exploration (0.2).
Three fixed policies are evaluated: no adaptation, the router after 120 feedbacks, the router
after 1500 (the logging one). Their true reward is their accuracy on 50,000 fresh queries.

- ``fixed``: ``--logs`` logs of ``--decisions`` decisions of the logging router, exploring
  with epsilon-greedy, softmax and SquareCB: the share of logs whose IPS and SNIPS
  intervals hold the truth, per policy;
- ``learning``: ``--seeds`` tasks; the router keeps learning while it logs 4000 decisions
  (each probability is that of its time): how many seeds' intervals hold the truth.

    python scripts/ope_coverage.py               # both (~5 min on 2 busy cores)
    python scripts/ope_coverage.py fixed --logs 50
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from router_task import RouterTask

from sona_shm import InstantLoop
from sona_shm.config import DEFAULT_LR
from sona_shm.learn.evaluate import LoggedDecisions, estimate, greedy_choices, logged_decisions
from sona_shm.learn.routes import DEFAULT_GAMMA, Router, choose

H, K = 32, 4
NAMES = ["code", "math", "chat", "search"]
EXPLORATIONS = (("epsilon 0.2", "epsilon", 0.2), ("softmax", "softmax", 0.0), ("squarecb", "squarecb", DEFAULT_GAMMA))


def task(seed: int) -> RouterTask:
    return RouterTask(seed, h=H, routes=K, clusters=8, misrouted=3, noise=1.2)


def frozen(loop: InstantLoop) -> Router:
    r = loop._router()
    return Router(r.down.copy(), r.up_scaled.copy(), r.vectors.copy(), r.bias.copy(), r.active.copy(), r.names, r.temperature)


def feed(loop: InstantLoop, world: RouterTask, n: int, rng: np.random.Generator, draws: random.Random) -> None:
    x, y = world.sample(n, rng)
    for i in range(n):
        choice = loop.route(x[i], explore=0.2, rng=draws)
        loop.feedback(x[i], route=choice.index, reward=float(choice.index == y[i]), probability=choice.probability)


def true_reward(world: RouterTask, router: Router, seed: int) -> float:
    x, y = world.sample(50_000, np.random.default_rng(seed))
    return float((greedy_choices(router, x) == y).mean())


def trained(seed: int, capacity: int) -> tuple[InstantLoop, list[tuple[str, Router]], np.random.Generator, random.Random]:
    world = task(seed)
    loop = InstantLoop(H, 2, DEFAULT_LR["routing"], 20, capacity=capacity, rule="routing", routes=world.routes, route_names=NAMES)
    rng, draws = np.random.default_rng(seed + 1), random.Random(seed + 2)
    unadapted = frozen(loop)
    feed(loop, world, 120, rng, draws)
    early = frozen(loop)
    feed(loop, world, 1380, rng, draws)
    return loop, [("unadapted", unadapted), ("early", early), ("logging", frozen(loop))], rng, draws


def covered(truth: float, logged: LoggedDecisions, label: str, router: Router) -> tuple[bool, bool]:
    e = estimate(label, greedy_choices(router, logged.query), logged)
    return bool(e.ips_low <= truth <= e.ips_high), bool(e.snips is not None and e.snips_low <= truth <= e.snips_high)


def fixed(logs: int, decisions: int) -> None:
    _, policies, _, _ = trained(7, 0)
    world = task(7)
    truths = {label: true_reward(world, router, 99) for label, router in policies}
    logging = policies[-1][1]
    print(f"fixed logging policy: {logs} logs of {decisions} decisions; IPS / SNIPS intervals holding the truth")
    for name, mode, parameter in EXPLORATIONS:
        hits = {label: [0, 0] for label, _ in policies}
        for run in range(logs):
            g = np.random.default_rng(1000 + run)
            x, y = world.sample(decisions, g)
            served = choose(logging, x, mode=mode, parameter=parameter, rng=g)
            logged = LoggedDecisions(x, served.index, (served.index == y).astype(np.float64), served.probability, len(y), 0, 0)
            for label, router in policies:
                ips, snips = covered(truths[label], logged, label, router)
                hits[label][0] += ips
                hits[label][1] += snips
        cells = "  ".join(f"{label} {100 * a / logs:.0f}% / {100 * b / logs:.0f}%" for label, (a, b) in hits.items())
        print(f"  {name:<12} {cells}")


def learning(seeds: int) -> None:
    hits: dict[str, list[int]] = {}
    for seed in range(seeds):
        loop, policies, rng, draws = trained(seed, 4000)
        world = task(seed)
        loop.drain()
        feed(loop, world, 4000, rng, draws)
        logged = logged_decisions(loop.drain())
        for label, router in policies:
            ips, snips = covered(true_reward(world, router, seed + 3), logged, label, router)
            h = hits.setdefault(label, [0, 0])
            h[0] += ips
            h[1] += snips
    print(f"logged while learning: {seeds} seeds of 4000 decisions; seeds whose IPS / SNIPS interval holds the truth")
    print("  " + "  ".join(f"{label} {a}/{seeds} / {b}/{seeds}" for label, (a, b) in hits.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=("fixed", "learning", "both"), default="both")
    parser.add_argument("--logs", type=int, default=200)
    parser.add_argument("--decisions", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=40)
    args = parser.parse_args()
    if args.which in ("fixed", "both"):
        fixed(args.logs, args.decisions)
    if args.which in ("learning", "both"):
        learning(args.seeds)


if __name__ == "__main__":
    main()
