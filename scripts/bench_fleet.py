#!/usr/bin/env python3
"""What a fleet costs: hosts learning one adapter through a redis-server on this machine.

    python scripts/bench_fleet.py [--quick] [--json] [--seconds S] [--repeat R]

Everything at hidden_dim 256, rank 2, the reference rule unless said otherwise; every
redis-server is started here (loopback, a scratch directory, ``appendfsync always``
unless said otherwise) and killed at the end. Sections:

1. learning throughput of one host: 2 producer processes record T1 trajectories flat out
   (``record(timeout=)``) for S seconds into an engine without a fleet, and into the same
   engine with ``--fleet`` (flush threshold 100); learned/s until everything recorded is
   learned, and for the fleet also until it is applied back from the stream. R rounds,
   interleaved; medians. The issue's target: the fleet >= 90% of the engine without.
   Then the same for the routing rule (K = 8 routes, full-information feedback) without a
   fleet, with one, and with ``--fleet-lag 0`` (lock-step: a round trip per window).
2. record -> applied on another host: two hosts, flush threshold 1 (every trajectory is a
   window); a producer records one trajectory into host A every 20 ms; this process polls
   host B's weights generation: from record() returning to B's adapter changing.
3. publishing: the idempotent publish script (one EVALSHA) from one client, windows of
   the reference rule's size (2112 bytes) and the routing rule's (8256 bytes): windows/s
   with one window per call, with 64 per call in one entry each, and with 64 per call in
   as few entries as the entry bounds allow (what the flusher does), and the latency of a
   one-window call, under ``appendfsync always`` and ``everysec``.
4. bytes per window: the stream's MEMORY USAGE and the AOF's growth, per window.
5. replay: a replica applies 20 000 windows read in pages of ``READ_COUNT`` entries
   (XRANGE, decode, check, apply): windows/s, as a joining host replays the stream after a
   snapshot.
6. outage: one host, producers paced at 2 000 trajectories/s (20 windows/s); redis-server
   is SIGSTOPped for 3 s: the outbox depth over time, and how long the host takes to have
   every window published and applied back after it resumes.

``--quick`` is a smoke run (the test suite runs it to check the script works, never to
judge a number).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
from bench import CHILD_DEADLINE, HIDDEN_DIM, RANK, child_start, make_pool, pct

from sona_shm.engine.client import attach
from sona_shm.fleet.member import READ_COUNT
from sona_shm.fleet.replica import Replica, host_key
from sona_shm.fleet.stream import FleetLog, connect
from sona_shm.fleet.window import write_window
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig, Layout
from sona_shm.shm.ledger import Ledger
from sona_shm.shm.segment import Segment
from sona_shm.stats import read_stats
from sona_shm.supervise import start_flusher, stop_process

from children import RedisServer

CTX = mp.get_context("fork")
OPTIONS = ["--quiet", "--hidden-dim", str(HIDDEN_DIM), "--rank", str(RANK), "--attention-dim", "64", "--lanes", "8"]


class Host:
    """A scratch engine and its flusher (with ``--fleet`` when ``server`` is given); removed on exit."""

    def __init__(self, tag: str, server: RedisServer | None, key: str = "bench", *extra: str) -> None:
        self.name = f"bench-{os.getpid()}-{tag}"
        segment.unlink(self.name)
        fleet = ["--fleet", server.url, "--fleet-key", key, "--host-id", self.name] if server is not None else []
        self.proc = start_flusher(self.name, *OPTIONS, *fleet, *extra, deadline=CHILD_DEADLINE)
        deadline = time.monotonic() + 60
        while True:
            try:
                stats = read_stats(self.name)
                if stats["flusher"]["alive"] and (server is None or stats["fleet"]["epoch"]):
                    break
            except segment.SegmentNotFoundError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the flusher of {self.name} did not start")
            time.sleep(0.01)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        segment.unlink(self.name)


def redis(directory: str, appendfsync: str = "always") -> RedisServer:
    path = tempfile.mkdtemp(dir=directory)
    return RedisServer(path, appendfsync=appendfsync, deadline=CHILD_DEADLINE).start()


# ----------------------------------------------------------------- 1. throughput


def feedback_pool(seed: int, routes: str) -> list:
    """Full-information feedback on the routes of file ``routes`` (what a routing engine learns from)."""
    from sona_shm.learn.routes import feedback_trajectory, load_routes

    table = load_routes(routes)
    rng = np.random.default_rng(seed)
    return [
        feedback_trajectory(
            table, rng.standard_normal(HIDDEN_DIM).astype(np.float32), route=None, reward=None, best=int(k % 8), unit_reward=True
        )
        for k in range(256)
    ]


def _producer(name: str, seed: int, go, seconds: float, rate: float, out, routes: str | None = None) -> None:
    child_start()
    pool = make_pool(seed, 1) if routes is None else feedback_pool(seed, routes)
    with attach(name, timeout=30) as client:
        go.wait()
        accepted = 0
        start = time.monotonic()
        deadline = start + seconds
        k = 0
        while time.monotonic() < deadline:
            if rate:  # paced: the k-th record at k / rate seconds
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            accepted += client.record(pool[k % len(pool)], timeout=5.0)
            k += 1
        out.put(accepted)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` (all its threads) used so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_throughput(
    host: Host, seconds: float, fleet: bool, producers: int = 2, routes: str | None = None, server: RedisServer | None = None
) -> dict[str, float]:
    go, out = CTX.Event(), CTX.Queue()
    before = read_stats(host.name)
    cpu0 = cpu_seconds(host.proc.pid), cpu_seconds(server.proc.pid) if server is not None else 0.0
    procs = [CTX.Process(target=_producer, args=(host.name, p, go, seconds, 0.0, out, routes)) for p in range(producers)]
    for p in procs:
        p.start()
    time.sleep(0.2)  # the producers attach (not measured)
    start = time.perf_counter()
    go.set()
    recorded = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join(60)
    with attach(host.name) as client:
        while read_stats(host.name)["trajectories_processed"] - before["trajectories_processed"] < recorded:
            time.sleep(0.001)
        learned_at = time.perf_counter()
        result = {"learned_per_s": recorded / (learned_at - start), "recorded": recorded}
        result["flusher_cpu_us_per_traj"] = (cpu_seconds(host.proc.pid) - cpu0[0]) / recorded * 1e6
        if server is not None:
            result["redis_cpu_us_per_traj"] = (cpu_seconds(server.proc.pid) - cpu0[1]) / recorded * 1e6
        if fleet:
            client.flush(timeout=120)  # the last window sealed, published and applied back
            applied = read_stats(host.name)["fleet"]["applied_signals"] - before["fleet"]["applied_signals"]
            result["applied_back_per_s"] = applied / (time.perf_counter() - start)
            result["windows"] = read_stats(host.name)["fleet"]["applied_entries"] - before["fleet"]["applied_entries"]
        else:
            client.flush(timeout=120)
    return result


def run_routing_throughput(directory: str, seconds: float, repeat: int) -> dict[str, Any]:
    routes = os.path.join(directory, "routes.npz")
    rng = np.random.default_rng(8)
    np.savez(routes, vectors=rng.standard_normal((8, HIDDEN_DIM)).astype(np.float32))
    server = redis(directory)
    try:
        rule = ("--rule", "routing", "--routes", routes)
        runs: dict[str, list] = {"without": [], "fleet": [], "fleet lag 0": []}
        with (
            Host("rplain", None, "x", *rule) as h0,
            Host("rfleet", server, "rt", *rule) as h1,
            Host("rlock", server, "rt0", *rule, "--fleet-lag", "0") as h2,
        ):
            for _ in range(repeat):
                runs["without"].append(run_throughput(h0, seconds, False, routes=routes))
                runs["fleet"].append(run_throughput(h1, seconds, True, routes=routes, server=server))
                runs["fleet lag 0"].append(run_throughput(h2, seconds, True, routes=routes, server=server))
        medians = {k: statistics.median(r["learned_per_s"] for r in v) for k, v in runs.items()}
        cpu = {k: statistics.median(r["flusher_cpu_us_per_traj"] for r in v) for k, v in runs.items()}
        redis_cpu = {k: statistics.median(r["redis_cpu_us_per_traj"] for r in v) for k, v in runs.items() if k != "without"}
        return {
            "learned_per_s": medians,
            "share": {k: v / medians["without"] for k, v in medians.items()},
            "flusher_cpu_us_per_traj": cpu,
            "redis_cpu_us_per_traj": redis_cpu,
            "runs": runs,
        }
    finally:
        server.close()


# ----------------------------------------------------------------- 2. record -> applied elsewhere


def run_freshness(directory: str, samples: int) -> dict[str, Any]:
    server = redis(directory)
    try:
        with Host("fa", server, "fresh", "--flush-threshold", "1") as a, Host("fb", server, "fresh", "--flush-threshold", "1") as b:
            seg = Segment.open(b.name, writable=False)
            ledger = Ledger(seg)
            pool = make_pool(7, 1)
            lat = []
            with attach(a.name) as client:
                for k in range(samples):
                    gen, _ = ledger.generation()
                    client.record(pool[k % len(pool)])
                    t0 = time.perf_counter_ns()
                    deadline = time.monotonic() + 10
                    while ledger.generation()[0] == gen and time.monotonic() < deadline:
                        pass
                    lat.append(time.perf_counter_ns() - t0)
                    time.sleep(0.02)
            ledger.close()
            seg.close()
        return pct(lat)
    finally:
        server.close()


# ----------------------------------------------------------------- 3-5. publishing, bytes, replay


def windows(count: int, routing: bool) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = np.zeros(64 + 8 * HIDDEN_DIM * 4, np.uint8)
    result = []
    for seq in range(1, count + 1):
        g = rng.standard_normal(HIDDEN_DIM)
        grad_up = rng.standard_normal((RANK, HIDDEN_DIM)) if routing else np.stack([g, g])
        grad_down = rng.standard_normal((RANK, HIDDEN_DIM)) if routing else None
        size = write_window(out, seq=seq, n=100, cum=100 * seq, sealed_at=time.time(), grad_up=grad_up, grad_down=grad_down)
        result.append(out[:size].tobytes())
    return result


def publisher(server: RedisServer, key: str, host: str) -> tuple[FleetLog, dict[str, Any]]:
    """A FleetLog joined to fleet ``key`` as ``host``; the arguments publish() takes."""
    fleet = FleetLog(connect(server.url, timeout=5.0), key)
    layout = Layout(EngineConfig(hidden_dim=HIDDEN_DIM, rank=RANK, fleet_outbox=1))
    state = np.zeros(1, layout.ledger_dtype)
    replica = Replica(layout, state, np.zeros((1, layout.entry_bytes), np.uint8), host, None)
    token = "0" * 32
    fleet.join(
        config="{}",
        new_epoch=1,
        host_id=host,
        host_key=f"{host_key(host):016x}",
        token=token,
        max_hosts=64,
        takeover=True,
        snapshot=replica.snapshot().to_fields(),
        now=time.time(),
    )
    return fleet, {"host_id": host, "host_key": f"{host_key(host):016x}", "token": token}


def run_publish(directory: str, appendfsync: str, count: int) -> dict[str, Any]:
    server = redis(directory, appendfsync)
    try:
        out: dict[str, Any] = {}
        for rule, routing in (("reference", False), ("routing", True)):
            data = windows(count, routing)
            fleet, who = publisher(server, f"pub-{rule}", f"h-{rule}")
            lat = []
            t0 = time.perf_counter()
            half = count // 2
            for seq in range(1, half + 1):
                s = time.perf_counter_ns()
                fleet.publish(first_seq=seq, windows=[data[seq - 1]], **who)
                lat.append(time.perf_counter_ns() - s)
            single = half / (time.perf_counter() - t0)
            quarter = (count - half) // 2
            t0 = time.perf_counter()
            for first in range(half + 1, half + quarter + 1, 64):  # 64 per call, one entry each (the first design)
                fleet.publish(first_seq=first, windows=data[first - 1 : min(first + 63, half + quarter)], entry_windows=1, **who)
            batched_single = quarter / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for first in range(half + quarter + 1, count + 1, 64):  # 64 per call, as many to an entry as it takes
                fleet.publish(first_seq=first, windows=data[first - 1 : first + 63], **who)
            batched = (count - half - quarter) / (time.perf_counter() - t0)
            out[rule] = {
                "window_bytes": len(data[0]),
                "one_per_call_per_s": single,
                "64_per_call_one_per_entry_per_s": batched_single,
                "64_per_call_per_s": batched,
                "one_window_call": pct(lat),
            }
            fleet.close()
        return out
    finally:
        server.close()


def aof_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if ".aof" in f)
    return total


def run_bytes_and_replay(directory: str, count: int) -> dict[str, Any]:
    server = redis(directory)
    try:
        out: dict[str, Any] = {}
        for rule, routing in (("reference", False), ("routing", True)):
            data = windows(count, routing)
            key = f"replay-{rule}"
            before = aof_bytes(server.directory)
            fleet, who = publisher(server, key, "h")
            for first in range(1, count + 1, 64):
                fleet.publish(first_seq=first, windows=data[first - 1 : first + 63], **who)
            r = server.client()
            memory = r.memory_usage(f"sona:{{{key}}}:log", samples=0)
            r.close()
            grown = aof_bytes(server.directory) - before
            # A joining replica: read in pages, decode, check, apply (Replica.apply), from the start.
            layout = Layout(EngineConfig(hidden_dim=HIDDEN_DIM, rank=RANK, fleet_outbox=1, rule=rule, routes=2 if routing else 0))
            state = np.zeros(1, layout.ledger_dtype)
            state[0]["fleet_epoch"] = 1
            replica = Replica(layout, state, np.zeros((1, layout.entry_bytes), np.uint8), "reader", None)
            t0 = time.perf_counter()
            applied = 0
            while True:
                page = fleet.range(replica.cursor, READ_COUNT)
                if not page:
                    break
                applied += replica.apply(page)[0]
            seconds = time.perf_counter() - t0
            assert applied == count, (applied, count)
            out[rule] = {
                "window_bytes": len(data[0]),
                "stream_bytes_per_window": memory / count,
                "aof_bytes_per_window": grown / count,
                "replay_windows_per_s": count / seconds,
            }
            fleet.close()
        return out
    finally:
        server.close()


# ----------------------------------------------------------------- 6. outage


def run_outage(directory: str, pause: float, rate: float) -> dict[str, Any]:
    server = redis(directory)
    try:
        with Host("out", server, "outage") as host:
            go, out = CTX.Event(), CTX.Queue()
            seconds = pause + 3.0
            proc = CTX.Process(target=_producer, args=(host.name, 1, go, seconds, rate, out))
            proc.start()
            time.sleep(0.2)
            go.set()
            samples = []
            start = time.monotonic()
            paused, resumed = False, None
            try:
                while time.monotonic() < start + seconds:
                    now = time.monotonic()
                    if not paused and resumed is None and now >= start + 1.0:
                        server.pause()  # a partition: connections hang, nothing answers
                        paused = True
                    if paused and now >= start + 1.0 + pause:
                        server.resume()
                        paused, resumed = False, now
                    fleet = read_stats(host.name)["fleet"]
                    samples.append((round(now - start, 2), fleet["outbox"], "paused" if paused else "running", fleet["connected"]))
                    time.sleep(0.1)  # the sampling period
            finally:
                if paused:
                    server.resume()
            recorded = out.get(timeout=60)
            proc.join(60)
            with attach(host.name) as client:
                client.flush(timeout=60)
            drained = None
            for t, depth, _, _ in samples:
                if resumed is not None and t >= resumed - start and depth == 0:
                    drained = round(t - (resumed - start), 2)
                    break
            return {
                "pause_s": pause,
                "rate_per_s": rate,
                "recorded": recorded,
                "max_outbox": max(s[1] for s in samples),
                "outbox_drained_after_resume_s": drained,
                "samples": samples,
                "applied_signals": read_stats(host.name)["fleet"]["applied_signals"],
            }
    finally:
        server.close()


# ----------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one round")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seconds", type=float, default=3.0, help="throughput: seconds per run (default 3)")
    p.add_argument("--repeat", type=int, default=5, help="throughput: rounds (default 5)")
    args = p.parse_args()
    seconds, repeat = (0.5, 1) if args.quick else (args.seconds, args.repeat)
    directory = tempfile.mkdtemp(prefix="sona-bench-fleet-")
    report: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "quick": args.quick}
    try:
        server = redis(directory)
        try:
            plain, fleet = [], []
            with Host("plain", None, "x", "--flush-threshold", "100") as h0, Host("fleet", server, "tp", "--flush-threshold", "100") as h1:
                for _ in range(repeat):
                    plain.append(run_throughput(h0, seconds, False))
                    fleet.append(run_throughput(h1, seconds, True, server=server))
            p_rate = statistics.median(r["learned_per_s"] for r in plain)
            f_rate = statistics.median(r["learned_per_s"] for r in fleet)
            report["throughput"] = {
                "without_fleet_learned_per_s": p_rate,
                "fleet_learned_per_s": f_rate,
                "without_fleet_flusher_cpu_us_per_traj": statistics.median(r["flusher_cpu_us_per_traj"] for r in plain),
                "fleet_flusher_cpu_us_per_traj": statistics.median(r["flusher_cpu_us_per_traj"] for r in fleet),
                "fleet_redis_cpu_us_per_traj": statistics.median(r["redis_cpu_us_per_traj"] for r in fleet),
                "fleet_applied_back_per_s": statistics.median(r["applied_back_per_s"] for r in fleet),
                "fleet_share": f_rate / p_rate,
                "runs": {"without": plain, "fleet": fleet},
            }
        finally:
            server.close()
        report["routing_throughput"] = run_routing_throughput(directory, seconds, repeat)
        report["record_to_applied_elsewhere"] = run_freshness(directory, 30 if args.quick else 300)
        count = 256 if args.quick else 4000
        report["publish"] = {mode: run_publish(directory, mode, count) for mode in ("always", "everysec")}
        report["stream"] = run_bytes_and_replay(directory, 512 if args.quick else 20_000)
        report["outage"] = run_outage(directory, 0.5 if args.quick else 3.0, 2000.0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def print_report(r: dict[str, Any]) -> None:
    t = r["throughput"]
    print(f"1. learning throughput, one host, 2 producers (medians of {len(t['runs']['fleet'])} runs)")
    print(f"   without fleet: {t['without_fleet_learned_per_s']:>10,.0f} learned/s")
    print(
        f"   with --fleet:  {t['fleet_learned_per_s']:>10,.0f} learned/s ({t['fleet_share']:.0%}); "
        f"applied back {t['fleet_applied_back_per_s']:,.0f}/s"
    )
    print(
        f"   flusher CPU per trajectory: {t['without_fleet_flusher_cpu_us_per_traj']:.2f} us without, "
        f"{t['fleet_flusher_cpu_us_per_traj']:.2f} us with the fleet (+ redis-server {t['fleet_redis_cpu_us_per_traj']:.2f} us)"
    )
    rt = r["routing_throughput"]
    print(f"   routing rule flusher CPU per trajectory (us): {rt['flusher_cpu_us_per_traj']}, redis-server: {rt['redis_cpu_us_per_traj']}")
    print(
        "   routing rule, K = 8, full-information feedback: "
        + ", ".join(f"{k} {v:,.0f}/s ({rt['share'][k]:.0%})" for k, v in rt["learned_per_s"].items())
    )
    f = r["record_to_applied_elsewhere"]
    print(f"2. record -> applied on another host: median {f['median_us']:,.0f} us, p99 {f['p99_us']:,.0f} us (n={f['n']})")
    print("3. publishing (one client, the idempotent script)")
    for mode, rules in r["publish"].items():
        for rule, v in rules.items():
            c = v["one_window_call"]
            print(
                f"   appendfsync {mode:8} {rule:9} {v['window_bytes']:>5} B: {v['one_per_call_per_s']:>7,.0f}/s one per call, "
                f"{v['64_per_call_one_per_entry_per_s']:>7,.0f}/s 64 per call one per entry, "
                f"{v['64_per_call_per_s']:>7,.0f}/s 64 per call grouped; "
                f"one call median {c['median_us']:,.0f} us, p99 {c['p99_us']:,.0f} us"
            )
    print("4-5. stream bytes and replay")
    for rule, v in r["stream"].items():
        print(
            f"   {rule:9} window {v['window_bytes']} B: stream {v['stream_bytes_per_window']:,.0f} B/window, "
            f"AOF {v['aof_bytes_per_window']:,.0f} B/window; replay {v['replay_windows_per_s']:,.0f} windows/s"
        )
    o = r["outage"]
    print(
        f"6. outage of {o['pause_s']} s at {o['rate_per_s']:.0f} traj/s: outbox up to {o['max_outbox']} windows, "
        f"empty {o['outbox_drained_after_resume_s']} s after Redis resumed"
    )


if __name__ == "__main__":
    sys.exit(main())
