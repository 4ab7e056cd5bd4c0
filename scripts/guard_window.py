#!/usr/bin/env python3
"""How to choose the reward guard's DROP and N: the flusher's own moving reward and guard, on simulated rewards.

Rewards are 0/1 with mean ``L`` (the level the router holds); a checkpoint is written every
``--every`` feedbacks and sets the guard's level (as a good checkpoint does). Prints, per
``(L, N, DROP)``, how many of ``--runs`` runs of ``--feedbacks`` steady feedbacks trip the guard
(a false alarm), and after how many inverted rewards (``1 - L``) a fault trips it.

    python scripts/guard_window.py                      # the table of docs/how-to/safety.md
    python scripts/guard_window.py --level 0.9 --window 300 --drop 0.12
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from sona_shm.engine.guard import GuardOptions, MovingReward


def suggested_drop(level: float, window: int, k: float = 7.0) -> float:
    """``k`` standard deviations of the mean of ``window`` 0/1 rewards of mean ``level``."""
    return k * math.sqrt(level * (1.0 - level) / window)


def first_trip(rewards: np.ndarray, window: int, drop: float, every: int) -> int | None:
    """The feedback count at which the guard trips over ``rewards`` (None: never), looking once per batch as the
    flusher does; the level is the moving reward at the last checkpoint (one every ``every`` feedbacks)."""
    guard, moving = GuardOptions(drop, window), MovingReward(window)
    moving.reset(0, 0.0)
    total = np.cumsum(rewards)
    level = None
    for i in range(guard.batch, len(rewards) + 1, guard.batch):
        moving.observe(i, float(total[i - 1]))
        if guard.tripped(moving.mean, level):
            return i
        if i % every < guard.batch and moving.mean is not None:
            level = moving.mean
    return None


def false_trips(level: float, window: int, drop: float, *, runs: int, feedbacks: int, every: int, seed: int = 0) -> int:
    """Runs of steady rewards in which the guard tripped."""
    out = 0
    for run in range(runs):
        rewards = (np.random.default_rng(seed + run).random(feedbacks) < level).astype(np.float64)
        out += first_trip(rewards, window, drop, every) is not None
    return out


def bad_before_trip(level: float, window: int, drop: float, *, every: int, seed: int = 0, steady: int = 20_000) -> int | None:
    """Inverted rewards (mean ``1 - level``) taken in before the guard trips, after ``steady`` good ones (None: never)."""
    rng = np.random.default_rng(seed)
    rewards = np.concatenate([rng.random(steady) < level, rng.random(20 * window) < 1.0 - level]).astype(np.float64)
    trip = first_trip(rewards, window, drop, every)
    return None if trip is None or trip <= steady else trip - steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", type=float, action="append", help="L, the steady mean reward (again for more)")
    parser.add_argument("--window", type=int, action="append", help="N (again for more)")
    parser.add_argument("--drop", type=float, default=None, help="DROP (default: 7 standard deviations, suggested_drop)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--feedbacks", type=int, default=400_000, help="steady feedbacks per run")
    parser.add_argument("--every", type=int, default=2000, help="feedbacks between checkpoints")
    args = parser.parse_args()
    cases = [(level, window) for level in args.level or [0.7, 0.8, 0.9] for window in args.window or [200, 500, 2000]]
    print(f"{'L':>5} {'N':>6} {'DROP':>6}  false trips  inverted rewards learned before the trip")
    for level, window in cases:
        drop = args.drop if args.drop is not None else round(suggested_drop(level, window), 3)
        trips = false_trips(level, window, drop, runs=args.runs, feedbacks=args.feedbacks, every=args.every)
        bad = [bad_before_trip(level, window, drop, every=args.every, seed=s) for s in range(3)]
        print(f"{level:>5} {window:>6} {drop:>6}  {trips:>5}/{args.runs:<5}  {bad}")


if __name__ == "__main__":
    main()
