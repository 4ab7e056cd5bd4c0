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
   the reference rule's size (2112 bytes) and the routing rule's (8304 bytes: the deltas of K = 8
   route rows and biases): windows/s
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

``--testbed`` (root) runs instead the sections on the namespaced testbed (tests/testbed: every
host its own network and /dev/shm, links with a delay; engines at hidden_dim 16):

T1. record -> applied on another host, through a Redis in a third host, at 0.1, 1 and 20 ms
    one-way delay on every link (flush threshold 1: one window a record, spaced well apart),
    and at 1 ms with ``--fleet-min-replicas 1`` (a replica in a fourth host); the issue's
    target: median <= 2 x RTT + 2 ms.
T2. a Sentinel failover (primary, two replicas, three Sentinels; 1 ms links): two hosts
    following the Sentinels, producers paced at 200 signals/s each, the primary killed:
    the outage (the longest stretch without a change of what a host applied) and the
    signals lost (counted), with and without ``--fleet-min-replicas 1``; target: outage
    <= 10 s, nothing lost uncounted, nothing lost at all with ``--fleet-min-replicas 1``.
T3. fan-out: N hosts (2, 4, 8) paced at 300 signals/s each through one Redis: Redis's egress
    (INFO total_net_output_bytes) and CPU per signal and its egress per host, and the same
    at 4 hosts with flush threshold 1000 (larger windows: the way to cut egress, at the
    price of freshness: a window seals every 1000 signals instead of 100).

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
from pathlib import Path
from typing import Any

import numpy as np
from bench import CHILD_DEADLINE, HIDDEN_DIM, RANK, child_start, make_pool, pct

from sona_shm.engine.client import attach
from sona_shm.fleet.member import READ_COUNT
from sona_shm.fleet.replica import Replica, host_key
from sona_shm.fleet.stream import FleetLog, connect
from sona_shm.fleet.window import max_window_bytes, split_windows, write_window
from sona_shm.learn.learner import DeltaWindow, Window
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig, Layout
from sona_shm.shm.ledger import Ledger
from sona_shm.shm.segment import Segment
from sona_shm.stats import read_stats
from sona_shm.supervise import start_flusher, stop_process

from children import RedisServer

CTX = mp.get_context("fork")
ROUTES = 8  # the routing rule's sections: K routes
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
            table, rng.standard_normal(HIDDEN_DIM).astype(np.float32), route=None, reward=None, best=int(k % ROUTES), unit_reward=True
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
    np.savez(routes, vectors=rng.standard_normal((ROUTES, HIDDEN_DIM)).astype(np.float32))
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
        windows = stream_windows(server, "rt")
        medians = {k: statistics.median(r["learned_per_s"] for r in v) for k, v in runs.items()}
        cpu = {k: statistics.median(r["flusher_cpu_us_per_traj"] for r in v) for k, v in runs.items()}
        redis_cpu = {k: statistics.median(r["redis_cpu_us_per_traj"] for r in v) for k, v in runs.items() if k != "without"}
        return {
            "learned_per_s": medians,
            "share": {k: v / medians["without"] for k, v in medians.items()},
            "flusher_cpu_us_per_traj": cpu,
            "redis_cpu_us_per_traj": redis_cpu,
            "stream": windows,
            "runs": runs,
        }
    finally:
        server.close()


def stream_windows(server: RedisServer, key: str) -> dict[str, float]:
    """The windows fleet ``key``'s stream holds, as the flusher sealed them: their count, mean bytes, bytes per signal
    (a window's ``n`` is bytes 24..32 of its head) and route rows carried (SFW2, bytes 50..52)."""
    r = server.client()
    try:
        rows = r.xrange(f"sona:{{{key}}}:log")
    finally:
        r.close()
    count = size = signals = route_rows = 0
    for _, fields in rows:
        if b"w" not in fields or not fields[b"w"]:
            continue
        parts = split_windows(fields[b"w"], int(fields[b"e"]) - int(fields[b"s"]) + 1) or []
        for raw in parts:
            count += 1
            size += len(raw)
            signals += int.from_bytes(raw[24:32], "little")
            route_rows += int.from_bytes(raw[50:52], "little")
    return {
        "windows": count,
        "bytes_per_window": size / max(1, count),
        "bytes_per_signal": size / max(1, signals),
        "signals_per_window": signals / max(1, count),
        "route_rows_per_window": route_rows / max(1, count),
    }


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
    out = np.zeros(max_window_bytes(HIDDEN_DIM, RANK, ROUTES, routing=True), np.uint8)
    result = []
    for seq in range(1, count + 1):
        g = rng.standard_normal(HIDDEN_DIM)
        if routing:  # a window of 100 feedbacks that moved every route's row and bias
            f32 = np.float32
            window: Window | DeltaWindow = DeltaWindow(
                None,
                None,
                rng.standard_normal(ROUTES).astype(f32),
                np.arange(ROUTES),
                rng.standard_normal((ROUTES, HIDDEN_DIM)).astype(f32),
                100,
            )
        else:
            window = Window(np.stack([g, g]), 100)
        size = write_window(out, window, rank=RANK, seq=seq, cum=100 * seq, sealed_at=time.time())
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
            layout = Layout(EngineConfig(hidden_dim=HIDDEN_DIM, rank=RANK, fleet_outbox=1, rule=rule, routes=ROUTES if routing else 0))
            state = np.zeros(1, layout.ledger_dtype)
            state[0]["fleet_epoch"] = 1
            state[0]["routes_used"] = ROUTES if routing else 0
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


# ----------------------------------------------------------------- on the testbed (--testbed)

TB_FLAGS = ["--hidden-dim", "16", "--rank", "2", "--lr", "0.01", "--capacity", "64", "--max-steps", "4", "--attention-dim", "8"]
TB_FLAGS += ["--lanes", "4", "--lane-slots", "512", "--fleet-outbox", "256"]


def _testbed_modules() -> Any:
    tests = Path(__file__).resolve().parents[1] / "tests"
    if str(tests) not in sys.path:
        sys.path.append(str(tests))
    import fleet_agent

    import testbed

    return testbed, fleet_agent


def _agent(host: Any, log_dir: Path, *args: str) -> Any:
    _, fleet_agent = _testbed_modules()
    return fleet_agent.FleetHost(host, log_dir, *TB_FLAGS, *args)


def _plain_agent(host: Any) -> Any:
    """A second agent in a host (no flusher): one agent serves one request at a time."""
    _, fleet_agent = _testbed_modules()
    agent = object.__new__(fleet_agent.FleetHost)
    agent.host, agent.name = host, host.name
    agent.flusher = None
    agent.log = open(os.devnull, "w")  # noqa: SIM115 - closed by close()
    import subprocess

    from support import env

    agent.agent = host.run([sys.executable, fleet_agent.__file__], env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return agent


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def tb_latency(delay: float, samples: int, min_replicas: int = 0) -> dict[str, Any]:
    """Record -> applied on another host through a Redis in a third host, every link ``delay`` one way."""
    testbed, _ = _testbed_modules()
    log_dir = Path(tempfile.mkdtemp(prefix="sona-bench-tb-"))
    with testbed.Testbed("sonabench", deadline=CHILD_DEADLINE, delay=delay) as tb:
        r = tb.add_host("r")
        replicas = [tb.add_host("r2")] if min_replicas else []
        with testbed.RedisTopology(tb, primary=r, replicas=replicas, sentinels=[]) as topo:
            url = topo.servers[0].url
            extra = ["--fleet-min-replicas", str(min_replicas)] if min_replicas else []
            a = _agent(tb.add_host("a"), log_dir, "--flush-threshold", "1", "--fleet", url, "--fleet-key", "lat", *extra)
            b = _agent(tb.add_host("b"), log_dir, "--flush-threshold", "1", "--fleet", url, "--fleet-key", "lat", *extra)
            try:
                for h in (a, b):
                    _wait(h.joined, 60, f"{h.name} to join")
                spacing = max(0.03, 8 * delay)
                b.agent.stdin.write(
                    json.dumps({"op": "watch", "name": "fleet", "changes": samples, "timeout": samples * spacing + 30}) + "\n"
                )
                b.agent.stdin.flush()
                time.sleep(0.2)  # the watcher reads its first generation (not a measurement)
                sent = a.ask(op="timed", name="fleet", count=samples, spacing=spacing)["times"]
                seen = json.loads(b.agent.stdout.readline())["times"]
            finally:
                a.close()
                b.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    n = min(len(sent), len(seen))
    lat = [int((seen[k] - sent[k]) * 1e9) for k in range(n)]
    result = pct(lat)
    result["rtt_ms"] = 2 * delay * 1e3  # a host's round trip to Redis
    result["target_ms"] = 2 * result["rtt_ms"] + 2  # the target for the median
    result["matched"] = n == samples
    return result


def tb_failover(min_replicas: int, seconds: float, rate: float, restart: bool = True) -> dict[str, Any]:
    """Two hosts following the primary through three Sentinels (1 ms links; a primary and two replicas), producers paced
    on both; the primary is killed: how long the fleet applied nothing, and what was lost (counted) once it settled."""
    testbed, _ = _testbed_modules()
    log_dir = Path(tempfile.mkdtemp(prefix="sona-bench-tb-"))
    with testbed.Testbed("sonabench", deadline=CHILD_DEADLINE, delay=0.001) as tb:
        # Two replicas: with --fleet-min-replicas 1 the promoted one still has a replica to confirm the stream.
        nodes = {n: tb.add_host(n) for n in ("ra", "rb", "rc", "s1", "s2", "s3")}
        topo = testbed.RedisTopology(
            tb, primary=nodes["ra"], replicas=[nodes["rb"], nodes["rc"]], sentinels=[nodes[s] for s in ("s1", "s2", "s3")]
        ).start()
        try:
            sentinels = ",".join(f"{n.addr}:{n.port}" for n in topo.sentinels)
            extra = ["--fleet-sentinel", sentinels, "--fleet-service", topo.master_name, "--fleet-key", "fo"]
            extra += ["--fleet-min-replicas", str(min_replicas)] if min_replicas else []
            hosts = [_agent(tb.add_host(n), log_dir, "--flush-threshold", "20", *extra) for n in ("a", "b")]
            watcher = _plain_agent(hosts[1].host)
            try:
                for h in hosts:
                    _wait(h.joined, 60, f"{h.name} to join")
                for i, h in enumerate(hosts):
                    h.agent.stdin.write(json.dumps({"op": "paced", "name": "fleet", "rate": rate, "seconds": seconds, "seed": i}) + "\n")
                    h.agent.stdin.flush()
                start = time.monotonic()
                old = topo.servers[0]
                samples: list[tuple[float, int]] = []
                killed_at = None
                while time.monotonic() < start + seconds:
                    view = watcher.ask(op="fleet", name="fleet")
                    samples.append((time.monotonic(), view["fleet"]["applied_signals"]))
                    if killed_at is None and time.monotonic() > start + 2.0:
                        old.kill()
                        killed_at = time.monotonic()
                    time.sleep(0.02)
                committed = sum(json.loads(h.agent.stdout.readline())["accepted"] for h in hosts)
                new = topo.wait_failover(old)
                if restart:  # the old primary back from its AOF, made a replica by the Sentinels (~10 s)
                    old.start()
                    topo.wait_replica_of(old, new)
                for h in hosts:
                    h.flush(120)
                views = _wait(
                    lambda: (
                        (v := [h.fleet() for h in hosts])
                        and all(x["fleet"]["applied_signals"] + x["fleet"]["lost_signals"] == committed for x in v)
                        and v
                    ),
                    120,
                    "every replica to apply or count everything",
                )
                alive = all(h.flusher.poll() is None for h in hosts)
            finally:
                watcher.close()
                for h in hosts:
                    h.close()
        finally:
            topo.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    changes = [t for (t, a), (_, b) in zip(samples, samples[1:], strict=False) if b != a]
    gaps = [(t1 - t0, t0) for t0, t1 in zip(changes, changes[1:], strict=False)]
    # The stall: the longest stretch without a change of what host b applied, among those that reach past the kill.
    outage = max((g for g, t0 in gaps if t0 + g >= killed_at), default=None) if killed_at else None
    f = views[0]["fleet"]
    return {
        "samples": len(samples),
        "changes_after_kill": sum(t >= (killed_at or 0) for t in changes),
        "min_replicas": min_replicas,
        "committed": committed,
        "applied_signals": f["applied_signals"],
        "lost_signals": f["lost_signals"],
        "lost_entries": f["lost_entries"],
        "replicas_agree": len({(v["fleet"]["applied_signals"], v["fleet"]["lost_signals"], v["adapter"]) for v in views}) == 1,
        "no_flusher_exited": alive,
        "outage_s": outage,
    }


def tb_egress(hosts: int, threshold: int, seconds: float, rate: float) -> dict[str, Any]:
    """``hosts`` hosts (hidden_dim 256, the reference rule: a window is 2,112 bytes) paced at ``rate`` signals/s each
    through a lone Redis (0.1 ms links): Redis's egress and CPU."""
    testbed, _ = _testbed_modules()
    log_dir = Path(tempfile.mkdtemp(prefix="sona-bench-tb-"))
    with testbed.Testbed("sonabench", deadline=CHILD_DEADLINE, delay=0.0001) as tb:
        r = tb.add_host("r")
        with testbed.RedisTopology(tb, primary=r, replicas=[], sentinels=[]) as topo:
            server = topo.servers[0]
            extra = ["--hidden-dim", str(HIDDEN_DIM), "--flush-threshold", str(threshold), "--fleet", server.url, "--fleet-key", "eg"]
            agents = [_agent(tb.add_host(f"h{i}"), log_dir, *extra) for i in range(hosts)]
            try:
                for h in agents:
                    _wait(h.joined, 120, f"{h.name} to join")
                c = server.client()
                before = c.info()
                for i, h in enumerate(agents):
                    request = {"op": "paced", "name": "fleet", "rate": rate, "seconds": seconds, "seed": i, "hidden": HIDDEN_DIM}
                    h.agent.stdin.write(json.dumps(request) + "\n")
                    h.agent.stdin.flush()
                committed = sum(json.loads(h.agent.stdout.readline())["accepted"] for h in agents)
                for h in agents:
                    h.flush(120)
                _wait(lambda: all(h.fleet()["fleet"]["applied_signals"] >= committed for h in agents), 120, "everything applied")
                after = c.info()
                c.close()
            finally:
                for h in agents:
                    h.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    out = after["total_net_output_bytes"] - before["total_net_output_bytes"]
    cpu = (after["used_cpu_user"] + after["used_cpu_sys"]) - (before["used_cpu_user"] + before["used_cpu_sys"])
    return {
        "hosts": hosts,
        "flush_threshold": threshold,
        "signals": committed,
        "egress_bytes_per_signal": out / committed,
        "egress_bytes_per_s_per_host": out / seconds / hosts,
        "redis_cpu_us_per_signal": cpu / committed * 1e6,
    }


def run_testbed(quick: bool) -> dict[str, Any]:
    """T1-T3; ``quick``: a smoke run (few samples, one failover, one fan-out) that checks the script works."""
    report: dict[str, Any] = {"latency": {}, "failover": [], "egress": []}
    delays = ((0.001, 5),) if quick else ((0.0001, 200), (0.001, 200), (0.02, 60))
    for delay, n in delays:
        report["latency"][f"{delay * 1e3:g} ms"] = tb_latency(delay, n)
    if not quick:
        report["latency"]["1 ms, --fleet-min-replicas 1"] = tb_latency(0.001, 200, min_replicas=1)
    for min_replicas in (1,) if quick else (0, 1):
        report["failover"].append(tb_failover(min_replicas, 5.0 if quick else 14.0, 200.0, restart=not quick))
    for hosts, threshold in ((2, 100),) if quick else ((2, 100), (4, 100), (8, 100), (4, 1000)):
        report["egress"].append(tb_egress(hosts, threshold, 1.0 if quick else 5.0, 300.0))
    return report


def print_testbed(r: dict[str, Any]) -> None:
    print("T1. record -> applied on another host, through Redis in a third host (testbed links, flush threshold 1)")
    for label, v in r["latency"].items():
        print(
            f"   {label:>28} one-way: median {v['median_us'] / 1e3:7.2f} ms, p99 {v['p99_us'] / 1e3:7.2f} ms "
            f"(n={v['n']}; target median <= {v['target_ms']:.1f} ms)"
        )
    print("T2. Sentinel failover (kill -9 of the primary), two hosts paced at 200 signals/s each")
    for v in r["failover"]:
        print(
            f"   --fleet-min-replicas {v['min_replicas']}: outage {v['outage_s'] or float('nan'):.1f} s, committed {v['committed']}, "
            f"lost {v['lost_signals']} signals ({v['lost_entries']} windows), replicas agree {v['replicas_agree']}, "
            f"no flusher exited {v['no_flusher_exited']}"
        )
    print("T3. Redis egress and CPU against the number of hosts (300 signals/s per host)")
    for v in r["egress"]:
        print(
            f"   {v['hosts']} hosts, flush threshold {v['flush_threshold']}: {v['egress_bytes_per_signal']:,.0f} B/signal, "
            f"{v['egress_bytes_per_s_per_host'] / 1e3:,.1f} kB/s per host, Redis CPU {v['redis_cpu_us_per_signal']:.1f} us/signal"
        )


# ----------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one round")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seconds", type=float, default=3.0, help="throughput: seconds per run (default 3)")
    p.add_argument("--repeat", type=int, default=5, help="throughput: rounds (default 5)")
    p.add_argument("--testbed", action="store_true", help="the sections on the namespaced testbed (root): T1-T3")
    args = p.parse_args()
    if args.testbed:
        tb_report = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "quick": args.quick, "testbed": run_testbed(args.quick)}
        if args.json:
            print(json.dumps(tb_report, indent=2))
        else:
            print_testbed(tb_report["testbed"])
        return 0
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
    w = rt["stream"]
    print(
        f"   routing rule windows as sealed: {w['windows']:,} windows of {w['signals_per_window']:.1f} signals, "
        f"{w['bytes_per_window']:,.0f} B each ({w['route_rows_per_window']:.1f} route rows), {w['bytes_per_signal']:.1f} B/signal"
    )
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
