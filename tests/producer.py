"""A producer process for the integration tests.

    python tests/producer.py NAME --seed S --count C [--threads T] [--fork K] [--hold N]

Records ``make_trajectories(seed, count, hidden_dim)`` (every thread and every forked
child records its own copy with seed ``S*100 + k``), waits until all of it is learned,
and prints one JSON line per process: pid, lane, recorded. ``--hold N`` (on a new
engine): keep the lane until N lanes have recorded, so that N such producers provably
held N distinct lanes, however the machine schedules them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from sona_shm.engine.client import attach

from children import fork_child
from support import make_trajectories


def record_all(client, seed: int, count: int, hidden_dim: int, max_steps: int, attention_dim: int) -> int:
    recorded = 0
    for t in make_trajectories(seed, count, hidden_dim, max_steps=max_steps, attention_dim=attention_dim):
        if not client.record(t, timeout=60):
            raise SystemExit(f"lane full for 60 s at trajectory {recorded}")
        recorded += 1
    return recorded


def report(client, recorded: int) -> None:
    """One JSON line in one write(): forked siblings share the pipe, and print() under
    PYTHONUNBUFFERED=1 writes the text and its newline separately, so lines could interleave."""
    os.write(1, (json.dumps({"pid": os.getpid(), "lane": client.lane, "recorded": recorded}) + "\n").encode())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fork", type=int, default=0, help="children forked after attaching")
    p.add_argument("--hold", type=int, default=0, help="keep the lane until this many lanes of the engine have recorded")
    args = p.parse_args()

    client = attach(args.name, timeout=30)
    layout = client.layout
    dims = (layout.hidden_dim, min(4, layout.max_steps), min(8, layout.attention_dim))
    children = []
    seeds = [args.seed * 100 + k for k in range(max(args.threads, 1 + args.fork))]
    if args.fork:
        client.record(make_trajectories(seeds[0], 1, dims[0], max_steps=0)[0])  # the parent's lane is in use
        for k in range(1, args.fork + 1):

            def child(seed: int = seeds[k]) -> None:
                n = record_all(client, seed, args.count, *dims)
                client.sync(timeout=60)
                report(client, n)

            children.append(fork_child(child, deadline=300))
        recorded = 1 + record_all(client, seeds[0], args.count, *dims)
    elif args.threads > 1:
        counts = [0] * args.threads

        def work(k: int) -> None:
            counts[k] = record_all(client, seeds[k], args.count, *dims)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        recorded = sum(counts)
    else:
        recorded = record_all(client, args.seed, args.count, *dims)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    client.sync(timeout=60)
    # Hold the lane until N lanes of the (new) engine have recorded. The first producer to get
    # past this saw N lanes in use while none had left, so N producers held N distinct lanes.
    deadline = time.monotonic() + 120
    while (used := sum(1 for lane in client.statistics().lanes if lane.records)) < args.hold:  # polled, with a deadline
        if time.monotonic() > deadline:
            raise SystemExit(f"--hold {args.hold}: only {used} lanes recorded after 120 s")
        time.sleep(0.01)
    report(client, recorded)
    client.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
