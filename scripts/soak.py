#!/usr/bin/env python3
"""Soak: a bounded churn of workers and flushers, then the exact accounting of every trajectory.

    python scripts/soak.py [--seconds 60] [--seed 1] [--workers 4] [--json]

Like a gunicorn arbiter, this process forks ``--workers`` producer workers and replaces
each one that exits: a worker attaches, records ``--recycle-after`` trajectories (not
waiting when its lane is full: those are dropped and counted) and exits cleanly, as
``max_requests`` makes gunicorn workers do. Meanwhile a seeded RNG SIGKILLs random
workers (``--kill-rate`` per second on average) and SIGKILLs the flusher (started with
``sona-shm flusher``) every ``--flusher-kill-every`` seconds on average, restarting it
at once. After ``--seconds`` no worker is replaced; the last ones finish, the last
flusher learns everything and stops with SIGTERM.

Every worker appends one byte per returned ``record()`` to its own progress file (1:
committed, 0: dropped), so what it saw survives its SIGKILL. The accounting printed at
the end must balance, or the exit code is 1::

    learned + lane drops + lost == attempted,   0 <= lost <= worker kills

where ``attempted`` counts every returned record plus one in-flight record per killed
worker, ``learned`` is the engine's ``trajectories_processed``, which must also equal
the trajectories committed to the lanes (nothing learned twice or left unlearned), and
every ``record()`` that returned True is learned.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from sona_shm import Step, Trajectory, segment
from sona_shm.client import attach
from sona_shm.errors import SegmentNotFoundError
from sona_shm.stats import read_stats
from sona_shm.supervise import start_flusher, stop_process

from children import fork_child

HIDDEN_DIM = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long to churn (default 60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=4, help="producer workers alive at once (default 4)")
    p.add_argument("--recycle-after", type=int, default=2000, help="records before a worker exits cleanly (default 2000)")
    p.add_argument("--kill-rate", type=float, default=5.0, help="worker SIGKILLs per second, on average; 0: none (default 5)")
    p.add_argument("--flusher-kill-every", type=float, default=2.0, help="mean seconds between flusher SIGKILLs; 0: none (default 2)")
    p.add_argument("--pace", type=float, default=0.0002, help="seconds a worker rests between records (default 0.0002)")
    p.add_argument("--name", default=None, help="engine name (default: a fresh scratch name); removed at the end")
    p.add_argument("--json", action="store_true", help="print the accounting as JSON")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- workers


def worker(name: str, seed: int, count: int, pace: float, progress: str) -> None:
    """A forked producer: attach, record ``count`` trajectories, report each, exit."""
    rng = np.random.default_rng(seed)
    cycle = [
        Trajectory(
            rng.standard_normal(HIDDEN_DIM).astype(np.float32),
            [Step(rng.standard_normal(HIDDEN_DIM).astype(np.float32), None, float(rng.standard_normal())) for _ in range(k % 3)],
            float(rng.random()),
        )
        for k in range(31)
    ]
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    client = attach(name, timeout=30)
    os.write(fd, b"%d\n" % client.lane)
    for k in range(count):
        os.write(fd, b"1" if client.record(cycle[k % len(cycle)]) else b"0")
        if pace:
            time.sleep(pace)
    client.close()
    os.write(fd, b"\n")


def fork_worker(name: str, seed: int, count: int, pace: float, progress: str, deadline: float) -> int:
    return fork_child(_worker_process, name, seed, count, pace, progress, deadline=deadline)


def _worker_process(name: str, seed: int, count: int, pace: float, progress: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    worker(name, seed, count, pace, progress)


def read_progress(path: str) -> tuple[int | None, str, bool]:
    """``(lane or None if killed before attaching, one 1/0 per returned record, finished)``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:  # killed before it opened the file
        data = b""
    if b"\n" not in data:
        return None, "", False
    lane, rest = data.split(b"\n", 1)
    return int(lane), rest.rstrip(b"\n").decode(), rest.endswith(b"\n")


# ----------------------------------------------------------------------------- the arbiter


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.name or f"soak-{os.getpid()}"
        self.rng = np.random.default_rng(args.seed)
        self.dir = tempfile.mkdtemp(prefix="sona-soak-")
        self.workers: dict[int, str] = {}  # live pid -> progress file
        self.done: list[tuple[str, bool]] = []  # (progress file, was killed)
        self.spawned = 0
        self.worker_kills = 0
        self.worker_failures = 0
        self.flusher: subprocess.Popen | None = None
        self.flusher_restarts = 0
        self.flusher_failures: list[int] = []
        #: Seconds any child may live: the churn, then 5 minutes to wind down and account.
        self.deadline = args.seconds + 300

    def options(self) -> list[str]:
        return ["--hidden-dim", str(HIDDEN_DIM), "--flush-threshold", "50", "--lanes", str(self.args.workers + 2)] + [
            "--lane-slots",
            "64",
            "--max-steps",
            "2",
            "--attention-dim",
            "0",
            "--capacity",
            "0",
            "--quiet",
        ]

    def start_flusher(self, first: bool = False) -> None:
        self.flusher = start_flusher(self.name, *(self.options() if first else ["--quiet"]), deadline=self.deadline)

        def ready() -> bool:
            if self.flusher.poll() is not None:
                raise RuntimeError(f"flusher exited with {self.flusher.returncode}")
            try:
                return read_stats(self.name)["flusher"]["alive"]
            except SegmentNotFoundError:
                return False

        wait(ready, 60, "the flusher to start")

    def kill_flusher(self) -> None:
        self.flusher.send_signal(signal.SIGKILL)
        self.flusher.wait()
        self.flusher_restarts += 1
        self.start_flusher()

    def spawn(self) -> None:
        path = os.path.join(self.dir, f"w{self.spawned}")
        seed = self.args.seed * 1_000_003 + self.spawned
        pid = fork_worker(self.name, seed, self.args.recycle_after, self.args.pace, path, self.deadline)
        self.workers[pid] = path
        self.spawned += 1

    def reap(self) -> None:
        for pid in list(self.workers):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                code = os.waitstatus_to_exitcode(status)
                killed = code == -signal.SIGKILL
                self.worker_failures += not killed and code != 0
                self.done.append((self.workers.pop(pid), killed))

    def kill_worker(self) -> None:
        if self.workers:
            pid = list(self.workers)[int(self.rng.integers(len(self.workers)))]
            os.kill(pid, signal.SIGKILL)  # unreaped, so the pid is still this worker's
            self.worker_kills += 1

    def run(self) -> dict:
        self.start_flusher(first=True)
        tick = 0.01
        now = time.monotonic()
        end = now + self.args.seconds
        # Poisson arrivals of kills; the first of each kind within the first half, so even a
        # short run has at least one worker kill and one flusher restart.
        half = self.args.seconds / 2
        next_worker_kill = now + min(self.rng.exponential(1 / self.args.kill_rate), half) if self.args.kill_rate > 0 else end
        next_flusher_kill = now + min(self.rng.exponential(self.args.flusher_kill_every), half) if self.args.flusher_kill_every > 0 else end
        while time.monotonic() < end:
            self.reap()
            while len(self.workers) < self.args.workers:
                self.spawn()
            if time.monotonic() >= next_worker_kill:
                self.kill_worker()
                next_worker_kill = time.monotonic() + self.rng.exponential(1 / self.args.kill_rate)
            if time.monotonic() >= next_flusher_kill:
                self.kill_flusher()
                next_flusher_kill = time.monotonic() + self.rng.exponential(self.args.flusher_kill_every)
            time.sleep(tick)
        # Wind down like a graceful gunicorn stop: no replacements, the last workers finish.
        while self.workers:
            self.reap()
            time.sleep(tick)
        wait(lambda: all(lane["records"] == lane["learned"] for lane in read_stats(self.name)["lanes"]), 120, "everything learned")
        code = stop_process(self.flusher)
        if code != 0:
            self.flusher_failures.append(code)
        return self.account()

    def account(self) -> dict:
        stats = read_stats(self.name)
        attempted = committed = dropped = 0
        per_lane: dict[int, list[int]] = {}
        for path, killed in self.done:
            lane, results, finished = read_progress(path)
            if lane is None:
                continue
            ones = results.count("1")
            attempted += len(results) + (1 if killed and not finished else 0)
            committed += ones
            dropped += len(results) - ones
            per_lane.setdefault(lane, [0, 0])  # records that returned True, killed in flight
            per_lane[lane][0] += ones
            per_lane[lane][1] += killed and not finished
        learned = stats["trajectories_processed"]
        drops = stats["lane_dropped"]
        lost = attempted - learned - drops
        lanes = {lane["lane"]: lane for lane in stats["lanes"]}
        lanes_ok = all(
            ones <= lanes[n]["records"] <= ones + in_flight if n in lanes else ones == 0 for n, (ones, in_flight) in per_lane.items()
        )
        with attach(self.name) as client:
            up, grad_up = client._ledger.read("up", "grad_up")
        checks = {
            "every committed trajectory learned, none twice": learned == stats["recorded"] == sum(x["learned"] for x in lanes.values()),
            "learned >= records that returned True": learned >= committed,
            "lane drops >= records that returned False": drops >= dropped,
            "0 <= lost <= worker kills": 0 <= lost <= self.worker_kills,
            "per lane: committed <= records <= committed + killed in flight": lanes_ok,
            "weights finite": bool(np.isfinite(up).all() and np.isfinite(grad_up).all()),
            "no worker failed": self.worker_failures == 0,
            "final flusher stopped cleanly": not self.flusher_failures,
        }
        return {
            "seconds": self.args.seconds,
            "seed": self.args.seed,
            "workers_spawned": self.spawned,
            "worker_kills": self.worker_kills,
            "flusher_restarts": self.flusher_restarts,
            "attempted": attempted,
            "learned": learned,
            "lane_drops": drops,
            "lost_to_kills": lost,
            "returned_true": committed,
            "returned_false": dropped,
            "flushes_performed": stats["flushes_performed"],
            "checks": checks,
            "balanced": all(checks.values()),
        }

    def cleanup(self) -> None:
        for pid in list(self.workers):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if self.flusher is not None and self.flusher.poll() is None:
            self.flusher.kill()
            self.flusher.wait()
        segment.unlink(self.name)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.cleanup()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if key != "checks":
                print(f"{key:>20}: {value}")
        for check, ok in report["checks"].items():
            print(f"  [{'ok' if ok else 'FAILED'}] {check}")
    return 0 if report["balanced"] else 1


if __name__ == "__main__":
    sys.exit(main())
