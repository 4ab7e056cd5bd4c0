"""A consumer process for the integration tests.

    python tests/consumer.py NAME --out FILE --expect N [--seed S]
    python tests/consumer.py NAME --hold K

The first form drains in chunks of random size, alternating ``drain_arrays`` and
``drain_n``, until the engine has learned ``N`` trajectories and its buffer is empty;
it saves everything it got to FILE (a TrajectoryBatch ``.npz``) and prints one JSON
line. The second form enters ``draining(K)`` — lock held, trajectories copied, tail
not yet moved — prints the ids it holds as one JSON line and waits to be killed.
"""

from __future__ import annotations

import argparse
import json
import signal

import numpy as np

from sona_shm import TrajectoryBatch, open_consumer
from sona_shm.stats import read_stats

from support import batch_from_trajectories, concatenate


def drain_until_done(name: str, out: str, expect: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batches: list[TrajectoryBatch] = []
    with open_consumer(name, timeout=30) as consumer:
        layout = consumer.layout
        for turn in range(10**9):
            done = read_stats(name)["trajectories_processed"] >= expect  # before the drain: then empty means done
            n = int(rng.integers(1, 40))
            if turn % 2:
                batch = batch_from_trajectories(consumer.drain_n(n, timeout=60), layout)
            else:
                batch = consumer.drain_arrays(n, timeout=60)
            batches.append(batch)
            if done and len(batch) == 0:
                break
    result = concatenate(batches, layout)
    result.save(out)
    print(json.dumps({"drained": len(result)}), flush=True)


def hold(name: str, k: int) -> None:
    with open_consumer(name, timeout=30) as consumer, consumer.draining(k, timeout=60) as batch:
        print(json.dumps({"ids": batch.traj_id.tolist()}), flush=True)
        while True:
            signal.pause()  # until the test's SIGKILL


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--out")
    p.add_argument("--expect", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hold", type=int)
    args = p.parse_args()
    if args.hold is not None:
        hold(args.name, args.hold)
    else:
        drain_until_done(args.name, args.out, args.expect, args.seed)


if __name__ == "__main__":
    main()
