"""Time draining a full buffer at the default dimensions (h=256, S=8, A=64, capacity 10000).

    python scripts/bench_drain.py [--steps K]

An in-process flusher fills the buffer with 10 000 K-step trajectories; then
``drain_arrays()``, ``drain()`` and ``drain_to_file()`` each empty it (best of 3).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import sona_shm
from sona_shm.engine.flusher import Flusher
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig

COUNT = 10_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1, help="steps per trajectory (1-8)")
    args = p.parse_args()
    name = f"bench-drain-{os.getpid()}"
    flusher = Flusher(name, config=EngineConfig(capacity=COUNT, lane_slots=COUNT, lanes=2))
    try:
        with sona_shm.attach(name) as client:
            queries = np.random.default_rng(0).standard_normal((COUNT, 256)).astype(np.float32)
            attention = np.full(16, 1 / 16, np.float32)

            def fill() -> None:
                for q in queries:
                    client.record(sona_shm.Trajectory(q, [sona_shm.Step(q, attention, 0.5)] * args.steps, 0.5, route="r"))
                flusher.scan()

            def to_file() -> int:
                with tempfile.TemporaryDirectory() as d:
                    return sona_shm.drain_to_file(name, os.path.join(d, "x.npz"))

            ways = (
                ("drain_arrays", lambda: len(client.drain_arrays())),
                ("drain", lambda: len(client.drain())),
                ("drain_to_file", to_file),
            )
            for what, drain in ways:
                best = float("inf")
                for _ in range(3):
                    fill()
                    started = time.perf_counter()
                    assert drain() == COUNT
                    best = min(best, time.perf_counter() - started)
                print(f"{what:14s} {COUNT} trajectories of {args.steps} step(s): {best * 1e3:7.1f} ms ({best / COUNT * 1e6:5.1f} us each)")
    finally:
        flusher.close()
        segment.unlink(name)


if __name__ == "__main__":
    main()
