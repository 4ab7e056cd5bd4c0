#!/usr/bin/env python3
"""Benchmark sona_shm's producer paths while a real flusher runs.

    python scripts/bench.py [--quick] [--json] [--producers N] [--seconds S]

For hidden_dim 256, rank 2: the median and p99 of ``record()`` (one-step and four-step
trajectories) and of ``forward()`` (one vector, a batch of 32), measured call by call
in a producer process while ``producers - 1`` other producer processes record flat out
and the flusher (started with the CLI) learns everything. Timings include the
~60 ns of ``perf_counter_ns`` itself. Prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from sona_shm import Step, Trajectory, segment
from sona_shm.client import attach
from sona_shm.supervise import start_flusher, stop_process

HIDDEN_DIM = 256
RANK = 2
ATTENTION_DIM = 64


def trajectory(rng: np.random.Generator, steps: int) -> Trajectory:
    return Trajectory(
        rng.standard_normal(HIDDEN_DIM).astype(np.float32),
        [
            Step(
                rng.standard_normal(HIDDEN_DIM).astype(np.float32),
                rng.random(ATTENTION_DIM).astype(np.float32),
                float(rng.standard_normal()),
            )
            for _ in range(steps)
        ],
        float(rng.random()),
    )


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    arr = np.array(samples_ns, dtype=np.float64) / 1000.0
    return {"median_us": float(np.median(arr)), "p99_us": float(np.percentile(arr, 99)), "calls": len(arr)}


def time_calls(fn, args_list) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for args in args_list:
        t0 = clock()
        fn(*args)
        out.append(clock() - t0)
    return out


def background_producer(name: str, seconds: float, steps: int) -> None:
    """Record flat out for ``seconds``; print how many were accepted and dropped."""
    rng = np.random.default_rng(os.getpid())
    pool = [trajectory(rng, steps) for _ in range(256)]
    accepted = dropped = 0
    with attach(name, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for t in pool:
                if client.record(t):
                    accepted += 1
                else:
                    dropped += 1
    print(json.dumps({"accepted": accepted, "dropped": dropped}))


def measure(name: str, calls: int, producers: int, seconds: float) -> dict:
    rng = np.random.default_rng(1)
    results: dict[str, dict] = {}
    with attach(name, timeout=30) as client:
        for steps in (1, 4):
            others = [
                subprocess.Popen(
                    [sys.executable, __file__, "--_producer", name, str(seconds), str(steps)], stdout=subprocess.PIPE, text=True
                )
                for _ in range(producers - 1)
            ]
            try:
                pool = [trajectory(rng, steps) for _ in range(512)]
                samples: list[int] = []
                deadline = time.monotonic() + seconds * 0.8
                while len(samples) < calls and time.monotonic() < deadline:
                    samples += time_calls(client.record, [(t,) for t in pool])
                results[f"record T{steps}"] = percentiles(samples)
            finally:
                for p in others:
                    out, _ = p.communicate(timeout=seconds + 60)
            client.sync(timeout=60)
        x = rng.standard_normal(HIDDEN_DIM).astype(np.float32)
        batch = rng.standard_normal((32, HIDDEN_DIM)).astype(np.float32)
        client.flush(timeout=30)  # the adapter is non-zero from here on
        results["forward 1"] = percentiles(time_calls(client.forward, [(x,)] * calls))
        results["forward 32"] = percentiles(time_calls(client.forward, [(batch,)] * calls))
        stats = client.stats()
    results["_engine"] = {
        "trajectories_processed": stats["trajectories_processed"],
        "lane_dropped": stats["lane_dropped"],
        "flushes_performed": stats["flushes_performed"],
    }
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short smoke run (seconds, not minutes)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--producers", type=int, default=4, help="producer processes recording at once, this one included")
    p.add_argument("--seconds", type=float, default=None, help="length of each recording phase")
    p.add_argument("--_producer", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._producer:
        name, seconds, steps = args._producer
        background_producer(name, float(seconds), int(steps))
        return 0

    seconds = args.seconds or (1.0 if args.quick else 5.0)
    calls = 2_000 if args.quick else 100_000
    name = f"bench-{os.getpid()}"
    lanes = str(max(8, args.producers + 2))
    options = ("--quiet", "--hidden-dim", str(HIDDEN_DIM), "--rank", str(RANK), "--attention-dim", str(ATTENTION_DIM), "--lanes", lanes)
    flusher = start_flusher(name, *options)
    try:
        results = measure(name, calls, args.producers, seconds)
    finally:
        stop_process(flusher)
        segment.unlink(name)
    results["_machine"] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "producers": args.producers,
        "quick": args.quick,
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"sona_shm, hidden_dim {HIDDEN_DIM}, rank {RANK}, {args.producers} producers recording, flusher running")
        print(f"{'operation':<14} {'median µs':>10} {'p99 µs':>10} {'calls':>9}")
        for op, r in results.items():
            if not op.startswith("_"):
                print(f"{op:<14} {r['median_us']:>10.2f} {r['p99_us']:>10.2f} {r['calls']:>9}")
        e = results["_engine"]
        print(f"engine: {e['trajectories_processed']} learned, {e['lane_dropped']} dropped at full lanes, {e['flushes_performed']} flushes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
