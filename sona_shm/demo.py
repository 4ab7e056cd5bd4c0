"""``sona-shm demo``: a flusher and several producer processes on a scratch engine.

Each producer records synthetic one-step trajectories whose reward says how well the
query points along a hidden "good" direction; the flusher learns them; at the end the
demo prints the monitor's table and how far the adapter moved, then removes
everything it created.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import numpy as np

from .engine.client import attach
from .monitor import format_table
from .shm import segment
from .stats import read
from .supervise import die_with_parent, set_deadline, start_flusher, stop_process
from .trajectory import Step, Trajectory

HIDDEN_DIM = 256
#: Seconds the demo's producers and flusher may live; they also die with the demo.
DEADLINE = 600.0


def _produce(name: str, count: int, seed: int, parent: int) -> None:
    die_with_parent(parent=parent)
    set_deadline(DEADLINE)
    rng = np.random.default_rng(seed)
    good = np.random.default_rng(0).standard_normal(HIDDEN_DIM).astype(np.float32)
    good /= np.linalg.norm(good)
    with attach(name, timeout=10) as client:
        queries = rng.standard_normal((count, HIDDEN_DIM)).astype(np.float32)
        attention = np.full(16, 1 / 16, dtype=np.float32)
        for q in queries:
            reward = float(q @ good) / 16
            traj = Trajectory(q, [Step(q * np.float32(0.5), attention, reward)], quality=0.5 + reward)
            while not client.record(traj, timeout=1.0):
                pass  # the demo wants every trajectory learned; a service would move on (DEADLINE bounds it)
        client.sync(timeout=30)


def run_demo(producers: int = 4, trajectories: int = 20_000, name: str | None = None) -> int:
    name = name or f"demo-{os.getpid()}"
    print(f"sona-shm demo: engine {name!r}, {producers} producers x {trajectories} trajectories")
    flusher = start_flusher(name, "--hidden-dim", str(HIDDEN_DIM), "--flush-interval", "0.5", "--quiet", deadline=DEADLINE + 60)
    try:
        with attach(name, timeout=30) as client:
            probe = np.random.default_rng(1).standard_normal(HIDDEN_DIM).astype(np.float32)
            before = client.forward(probe)
            first = read(name)  # the final table's rates are measured from here
            ctx = multiprocessing.get_context("spawn")
            workers = [ctx.Process(target=_produce, args=(name, trajectories, seed, os.getpid())) for seed in range(producers)]
            started = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join(timeout=DEADLINE)
            elapsed = time.perf_counter() - started
            failed = [w.exitcode for w in workers if w.exitcode != 0]
            client.flush(timeout=30)
            after = client.forward(probe)
            stats = client.stats()
        print(format_table(read(name).since(first)))  # with the rates over the run
        print()
        total = producers * trajectories
        print(f"{total} trajectories recorded and learned in {elapsed:.2f} s ({total / elapsed:,.0f}/s including process start-up)")
        print(
            f"adapter delta on a probe vector: {float(np.linalg.norm(after - before)):.6f} "
            f"(it was {float(np.linalg.norm(before - probe)):.6f} before learning)"
        )
        if failed:
            print(f"sona-shm demo: {len(failed)} producer(s) failed: exit codes {failed}", file=sys.stderr)
            return 1
        return 0 if stats["trajectories_processed"] == total else 1
    finally:
        stop_process(flusher)
        segment.unlink(name)
