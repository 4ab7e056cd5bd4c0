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

``--fleet N`` (N >= 2) runs N engines as the hosts of one fleet (``sona-shm flusher
--fleet``) on a redis-server this script starts (``appendfsync always``, in a scratch
directory; Debian's ``redis-server`` and redis-py are needed). Workers are spread over
the engines, a random engine's flusher is SIGKILLed as above, and the redis-server is
``kill -9``ed every ``--redis-kill-every`` seconds on average and started again after a
moment. The accounting above then holds summed over the engines, and also, fleet-wide::

    every replica's applied_signals + lost_signals == learned (summed) == the signals its hosts sealed,
    every replica counted the same losses and holds the same adapter bytes, no flusher exited on its own,
    and nothing was lost at all unless Sentinel failovers or evictions were played

``--sentinel`` runs the fleet's Redis as a primary, a replica and three ``redis-sentinel`` (loopback) that the
flushers follow (``--fleet-sentinel``): every ``--failover-every`` seconds (8) on average the current primary is
``kill -9``ed, the Sentinels promote the replica, and the old primary is started again from its AOF (the Sentinels
make it a replica). ``--evict-every S`` deletes a random fleet key (``seqs``, ``snap``, ``meta``, the stream) every S
seconds on average, as an eviction would. Writes a failover or an eviction loses are counted (``lost_signals``), alike
on every replica; ``--fleet-min-replicas 1`` (passed on to the flushers) makes a failover lose none.
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

from sona_shm import Step, Trajectory
from sona_shm.engine.client import attach
from sona_shm.errors import SegmentNotFoundError
from sona_shm.shm import segment
from sona_shm.stats import read_stats
from sona_shm.supervise import start_flusher, stop_process

from children import RedisSentinels, RedisServer, fork_child

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
    p.add_argument(
        "--fleet", type=int, default=0, metavar="N", help="N engines learning as one fleet through a redis-server (default: 0, one engine)"
    )
    p.add_argument(
        "--redis-kill-every", type=float, default=3.0, help="with --fleet: mean seconds between redis kill -9s; 0: none (default 3)"
    )
    p.add_argument("--sentinel", action="store_true", help="with --fleet: a primary, a replica and three Sentinels; failovers")
    p.add_argument("--failover-every", type=float, default=8.0, help="with --sentinel: mean seconds between failovers (default 8)")
    p.add_argument("--evict-every", type=float, default=0.0, help="with --fleet: mean seconds between fleet keys deleted; 0: none")
    p.add_argument("--fleet-min-replicas", type=int, default=0, help="with --sentinel: passed on to the flushers (default 0)")
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
        if args.fleet == 1 or args.fleet < 0:
            raise SystemExit("--fleet: expected 0 (one engine) or N >= 2 hosts")
        self.args = args
        self.name = args.name or f"soak-{os.getpid()}"
        self.names = [f"{self.name}-{i}" for i in range(args.fleet)] if args.fleet else [self.name]
        self.rng = np.random.default_rng(args.seed)
        self.dir = tempfile.mkdtemp(prefix="sona-soak-")
        self.workers: dict[int, tuple[str, str]] = {}  # live pid -> (progress file, engine)
        self.done: list[tuple[str, str, bool]] = []  # (progress file, engine, was killed)
        self.spawned = 0
        self.worker_kills = 0
        self.worker_failures = 0
        self.flushers: dict[str, subprocess.Popen] = {}
        self.flusher_restarts = 0
        self.flusher_failures: list[int] = []
        self.redis: RedisServer | None = None
        self.sentinels: RedisSentinels | None = None
        self.redis_kills = 0
        self.failovers = 0
        self.evictions = 0
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

    def start_flusher(self, name: str, first: bool = False) -> None:
        options = self.options() if first else ["--quiet"]
        if self.sentinels is not None:
            extra = ["--fleet-min-replicas", str(self.args.fleet_min_replicas)] if self.args.fleet_min_replicas else []
            options = [*options, "--fleet-sentinel", self.sentinels.addresses, "--fleet-service", RedisSentinels.SERVICE, *extra]
            options += ["--fleet-key", self.name, "--host-id", name, "--fleet-snapshot-interval", "1"]
        elif self.redis is not None:  # the fleet's options are the flusher's, not the segment's: given every time
            options = [*options, "--fleet", self.redis.url, "--fleet-key", self.name, "--host-id", name, "--fleet-snapshot-interval", "1"]
        proc = self.flushers[name] = start_flusher(name, *options, deadline=self.deadline)

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"flusher of {name} exited with {proc.returncode}")
            try:
                return read_stats(name)["flusher"]["alive"]
            except SegmentNotFoundError:
                return False

        wait(ready, 60, "the flusher to start")

    def kill_flusher(self) -> None:
        name = self.names[int(self.rng.integers(len(self.names)))]
        self.flushers[name].send_signal(signal.SIGKILL)
        self.flushers[name].wait()
        self.flusher_restarts += 1
        self.start_flusher(name)

    def spawn(self) -> None:
        path = os.path.join(self.dir, f"w{self.spawned}")
        seed = self.args.seed * 1_000_003 + self.spawned
        name = self.names[self.spawned % len(self.names)]
        pid = fork_worker(name, seed, self.args.recycle_after, self.args.pace, path, self.deadline)
        self.workers[pid] = (path, name)
        self.spawned += 1

    def reap(self) -> None:
        for pid in list(self.workers):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                code = os.waitstatus_to_exitcode(status)
                killed = code == -signal.SIGKILL
                self.worker_failures += not killed and code != 0
                self.done.append((*self.workers.pop(pid), killed))

    def kill_worker(self) -> None:
        if self.workers:
            pid = list(self.workers)[int(self.rng.integers(len(self.workers)))]
            os.kill(pid, signal.SIGKILL)  # unreaped, so the pid is still this worker's
            self.worker_kills += 1

    def run(self) -> dict:
        if self.args.fleet and self.args.sentinel:
            self.sentinels = RedisSentinels(os.path.join(self.dir, "redis"), deadline=self.deadline).start()
        elif self.args.fleet:
            os.makedirs(os.path.join(self.dir, "redis"))
            self.redis = RedisServer(os.path.join(self.dir, "redis"), deadline=self.deadline).start()
        for name in self.names:
            self.start_flusher(name, first=True)
        tick = 0.01
        now = time.monotonic()
        end = now + self.args.seconds
        # Poisson arrivals of kills; the first of each kind within the first half, so even a
        # short run has at least one worker kill and one flusher restart.
        half = self.args.seconds / 2
        next_worker_kill = now + min(self.rng.exponential(1 / self.args.kill_rate), half) if self.args.kill_rate > 0 else end
        next_flusher_kill = now + min(self.rng.exponential(self.args.flusher_kill_every), half) if self.args.flusher_kill_every > 0 else end
        every = self.args.redis_kill_every
        next_redis_kill = now + min(self.rng.exponential(every), half) if self.redis is not None and every > 0 else float("inf")
        redis_back = None
        failover_every, evict_every = self.args.failover_every, self.args.evict_every
        fleet = self.redis is not None or self.sentinels is not None
        next_failover = now + min(self.rng.exponential(failover_every), half) if self.sentinels is not None else float("inf")
        next_eviction = now + min(self.rng.exponential(evict_every), half) if fleet and evict_every > 0 else float("inf")
        killed: RedisServer | None = None
        while time.monotonic() < end:
            if time.monotonic() >= next_failover and self.sentinels is not None:
                if killed is None and self.sentinels.settled():  # one failover at a time
                    killed = self.sentinels.primary()
                    if killed is not None:
                        killed.kill()  # kill -9: the Sentinels promote the replica
                        self.failovers += 1
                        redis_back = time.monotonic() + float(self.rng.uniform(1.0, 3.0))
                next_failover = time.monotonic() + max(1.0, self.rng.exponential(failover_every))
            if killed is not None and redis_back is not None and time.monotonic() >= redis_back:
                killed.start()  # from its AOF, as a primary until the Sentinels make it a replica
                killed, redis_back = None, None
            if time.monotonic() >= next_eviction:
                self.evict()
                next_eviction = time.monotonic() + max(0.3, self.rng.exponential(evict_every))
            self.reap()
            while len(self.workers) < self.args.workers:
                self.spawn()
            if time.monotonic() >= next_worker_kill:
                self.kill_worker()
                next_worker_kill = time.monotonic() + self.rng.exponential(1 / self.args.kill_rate)
            if time.monotonic() >= next_flusher_kill:
                self.kill_flusher()
                next_flusher_kill = time.monotonic() + self.rng.exponential(self.args.flusher_kill_every)
            if time.monotonic() >= next_redis_kill:
                self.redis.kill()  # kill -9; learning goes on into the outboxes
                self.redis_kills += 1
                redis_back = time.monotonic() + float(self.rng.uniform(0.05, 0.5))
                next_redis_kill = time.monotonic() + max(0.6, self.rng.exponential(every))
            if self.redis is not None and redis_back is not None and time.monotonic() >= redis_back:
                self.redis.start()  # the same port and directory: the AOF is replayed
                redis_back = None
            time.sleep(tick)
        if redis_back is not None:
            (killed or self.redis).start()
        # Wind down like a graceful gunicorn stop: no replacements, the last workers finish.
        while self.workers:
            self.reap()
            time.sleep(tick)
        for name in self.names:
            wait(lambda: all(lane["records"] == lane["learned"] for lane in read_stats(name)["lanes"]), 120, "everything learned")  # noqa: B023
        if fleet:
            for name in self.names:  # seal each host's last window and wait until it is applied back
                with attach(name) as client:
                    client.flush(timeout=120)
            total = sum(read_stats(name)["trajectories_processed"] for name in self.names)

            def applied_all() -> bool:
                views = [read_stats(n)["fleet"] for n in self.names]
                return all(f["applied_signals"] + f["lost_signals"] >= total for f in views)

            wait(applied_all, 120, "every replica to apply or count all")
            fleet_views = [read_stats(name)["fleet"] for name in self.names]
            self.flusher_failures += [p.returncode for p in self.flushers.values() if p.poll() is not None]
        adapters = []
        for name in self.names:
            with attach(name) as client:
                adapters.append(client._ledger.read("up", "down", "grad_up"))
            code = stop_process(self.flushers[name])
            if code != 0:
                self.flusher_failures.append(code)
        return self.account(adapters, fleet_views if fleet else None)

    def account(self, adapters: list[tuple], fleet: list[dict] | None) -> dict:
        stats = {name: read_stats(name) for name in self.names}
        attempted = committed = dropped = 0
        per_lane: dict[tuple[str, int], list[int]] = {}
        for path, name, killed in self.done:
            lane, results, finished = read_progress(path)
            if lane is None:
                continue
            ones = results.count("1")
            attempted += len(results) + (1 if killed and not finished else 0)
            committed += ones
            dropped += len(results) - ones
            per_lane.setdefault((name, lane), [0, 0])  # records that returned True, killed in flight
            per_lane[name, lane][0] += ones
            per_lane[name, lane][1] += killed and not finished
        learned = sum(s["trajectories_processed"] for s in stats.values())
        drops = sum(s["lane_dropped"] for s in stats.values())
        lost = attempted - learned - drops
        lanes = {(name, lane["lane"]): lane for name, s in stats.items() for lane in s["lanes"]}
        lanes_ok = all(
            ones <= lanes[key]["records"] <= ones + in_flight if key in lanes else ones == 0 for key, (ones, in_flight) in per_lane.items()
        )
        each_learned_once = all(
            s["trajectories_processed"] == s["recorded"] == sum(x["learned"] for x in s["lanes"]) for s in stats.values()
        )
        checks = {
            "every committed trajectory learned, none twice": each_learned_once,
            "learned >= records that returned True": learned >= committed,
            "lane drops >= records that returned False": drops >= dropped,
            "0 <= lost <= worker kills": 0 <= lost <= self.worker_kills,
            "per lane: committed <= records <= committed + killed in flight": lanes_ok,
            "weights finite": all(bool(np.isfinite(up).all() and np.isfinite(g).all()) for up, _, g in adapters),
            "no worker failed": self.worker_failures == 0,
            "final flushers stopped cleanly": not self.flusher_failures,
        }
        report = {
            "seconds": self.args.seconds,
            "seed": self.args.seed,
            "engines": len(self.names),
            "workers_spawned": self.spawned,
            "worker_kills": self.worker_kills,
            "flusher_restarts": self.flusher_restarts,
            "attempted": attempted,
            "learned": learned,
            "lane_drops": drops,
            "lost_to_kills": lost,
            "returned_true": committed,
            "returned_false": dropped,
            "flushes_performed": sum(s["flushes_performed"] for s in stats.values()),
        }
        if fleet is not None:
            report["redis_kills"] = self.redis_kills
            report["failovers"] = self.failovers
            report["evictions"] = self.evictions
            report["fleet_applied_signals"] = [f["applied_signals"] for f in fleet]
            report["fleet_lost_signals"] = [f["lost_signals"] for f in fleet]
            report["fleet_entries"] = fleet[0]["applied_entries"]
            report["fleet_resyncs"] = sum(f["resyncs"] for f in fleet)
            checks["every replica applied or counted lost every learned signal, once"] = all(
                f["applied_signals"] + f["lost_signals"] == learned for f in fleet
            )
            checks["every replica counted the same losses"] = len({(f["lost_entries"], f["lost_signals"]) for f in fleet}) == 1
            checks["the hosts sealed exactly what was learned"] = sum(f["sealed_signals"] for f in fleet) == learned
            checks["no entry bad"] = all(f["bad_entries"] == 0 for f in fleet)
            if not self.failovers and not self.evictions or self.args.fleet_min_replicas and not self.evictions:
                checks["nothing lost"] = all(f["lost_entries"] == 0 for f in fleet)
            checks["every replica's adapter is the same bytes"] = all(
                up.tobytes() == adapters[0][0].tobytes() and down.tobytes() == adapters[0][1].tobytes() for up, down, _ in adapters
            )
        report["checks"] = checks
        report["balanced"] = all(checks.values())
        return report

    def evict(self) -> None:
        """Delete one fleet key, as an eviction would (through the primary; skipped while there is none)."""
        server = self.sentinels.primary() if self.sentinels is not None else self.redis
        if server is None or server.proc is None or server.proc.poll() is not None:
            return
        which = ("seqs", "snap", "meta", "log")[int(self.rng.integers(4))]
        c = server.client()
        try:
            c.delete(f"sona:{{{self.name}}}:{which}")
            self.evictions += 1
        except Exception:  # a failover under way: not this time
            pass
        finally:
            c.close()

    def cleanup(self) -> None:
        for pid in list(self.workers):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for proc in self.flushers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.close()
        if self.sentinels is not None:
            self.sentinels.close()
        for name in self.names:
            segment.unlink(name)
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
