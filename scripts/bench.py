#!/usr/bin/env python3
"""sona_shm side by side with what a Python user would glue together instead.

    python scripts/bench.py [--quick] [--json] [--producers N] [--seconds S] [--repeat R] [--buffer-trajectories K]

Everything at hidden_dim 256, rank 2. Trajectories: T1 = query + 1 step (activations
float32[256], attention float32[64], reward) + quality; T4 = 4 steps. Sections:

1. throughput: N producer processes record flat out for S seconds into one consumer.
   sona_shm: ``record()`` into lanes, the flusher (started with the CLI) learns them.
   Peers: ``multiprocessing.Queue`` and ``faster_fifo.Queue`` (bounded, put blocks when
   full) carry the same trajectories (as tuples of arrays, cheaper to pickle than the
   dataclass) to one consumer process that only receives them (it learns nothing, so
   the comparison flatters the peers). sona_shm producers use ``record(timeout=)``, which
   likewise waits when the lane is full. Delivered = what the
   consumer got (sona_shm: learned) per second until the last one arrived. The systems
   run interleaved, R rounds; medians are reported, and ratios against sona_shm.
1b. the buffer for consumers: N producers record K T1 trajectories in all (waiting for
   room), into an engine whose buffer keeps every one (capacity K: each learned
   trajectory is copied into a buffer slot never used before) and into one whose buffer
   is full (capacity 10000, or K/20 if less: later ones are learned, not copied), and
   through a ``multiprocessing.Queue``; delivered = learned (received) per second, timed
   from the moment every producer (and the queue's consumer) is ready, and how long the
   flusher took to create each engine (it reserves and faults in the buffer). The ratio
   keeps-everything / mp.Queue is reported of the medians and as the median of the rounds'
   ratios (each round runs the three back to back: like with like on a loaded machine).
2. producer latency: ``record()`` and ``forward()`` timed call by call in a producer
   while N-1 others record flat out and the flusher learns (median, p99).
3. learning rate: the flusher's vectorised learning (signals + accumulate + flushes),
   in-process on batches of 32, 256, 1024 (trajectories per second).
4. freshness: flush_threshold 1; a producer records, another process polls forward()
   until the adapter changes: record() returning -> change visible (median, p99); and
   the idle flusher's CPU use.
5. routing: the routing rule's C learner on a stream of feedback clustered around the
   routes (the router learns them), at K = 8, h = 256 and K = 32, h = 384, bandit and
   full information: signals/s of learn_routing over lane slots (the flusher's) and of
   learn_routing_rows (InstantLoop's); and route()'s C call, µs, greedy and exploring
   (epsilon 0.1, softmax, SquareCB) at K = 8, h = 256.

Timings include ~60 ns of ``perf_counter_ns`` itself. ``--quick`` is a smoke run (the
test suite runs it to check the script works, never to judge a number).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from sona_shm import Step, Trajectory
from sona_shm.engine.client import attach
from sona_shm.engine.flusher import WAKE_TIMEOUT
from sona_shm.learn.learner import Learner
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig
from sona_shm.stats import read_stats
from sona_shm.supervise import die_with_parent, set_deadline, start_flusher, stop_process

HIDDEN_DIM = 256
RANK = 2
ATTENTION_DIM = 64
POOL = 256  # distinct trajectories each producer cycles through
QUEUE_SIZE = 10_000
CTX = mp.get_context("fork")
#: Seconds any process this script starts may live; they also die with the script.
CHILD_DEADLINE = 900.0
#: This script's pid, as its forked children expect their parent to be.
PARENT = os.getpid()


def child_start() -> None:
    """First thing in every forked child: die with the script, and end after CHILD_DEADLINE."""
    die_with_parent(parent=PARENT)
    set_deadline(CHILD_DEADLINE)


def orphaned() -> bool:
    """True once the script that started this child is gone (for children that loop)."""
    return os.getppid() != PARENT


def make_pool(seed: int, steps: int, size: int = POOL) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    vec = lambda n: rng.standard_normal(n).astype(np.float32)  # noqa: E731

    def step() -> Step:
        return Step(vec(HIDDEN_DIM), rng.random(ATTENTION_DIM).astype(np.float32), float(rng.standard_normal()))

    return [Trajectory(vec(HIDDEN_DIM), [step() for _ in range(steps)], float(rng.random())) for _ in range(size)]


def pct(samples_ns: list[int] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    return {"median_us": float(np.median(arr)), "p99_us": float(np.percentile(arr, 99)), "n": int(arr.size)}


def flusher_options(**config: Any) -> list[str]:
    opts = ["--quiet", "--hidden-dim", str(HIDDEN_DIM), "--rank", str(RANK), "--attention-dim", str(ATTENTION_DIM)]
    for key, value in config.items():
        opts += ["--" + key.replace("_", "-"), str(value)]
    return opts


class Engine:
    """A scratch engine with its flusher child; removed on exit."""

    def __init__(self, tag: str, **config: Any) -> None:
        self.name = f"bench-{os.getpid()}-{tag}"
        segment.unlink(self.name)
        self.proc = start_flusher(self.name, *flusher_options(**config), deadline=CHILD_DEADLINE)
        deadline = time.monotonic() + 60
        while True:
            try:
                if read_stats(self.name)["flusher"]["alive"]:
                    break
            except segment.SegmentNotFoundError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the flusher did not start")
            time.sleep(0.01)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        segment.unlink(self.name)


# ----------------------------------------------------------------- 1. throughput


def _sona_producer(name: str, seed: int, steps: int, go, seconds: float, out, ready) -> None:
    child_start()
    pool = make_pool(seed, steps)
    with attach(name, timeout=30) as client:
        ready.release()
        go.wait()
        cpu0, accepted, attempted = time.process_time(), 0, 0
        deadline = time.monotonic() + seconds
        record = client.record
        while time.monotonic() < deadline:
            for t in pool:
                # Wait for room when the lane is full, as the peers' bounded queues block
                # in put(): both then leave the CPU to their consumer.
                accepted += record(t, timeout=5.0)
            attempted += len(pool)
        out.put((accepted, attempted, time.process_time() - cpu0))


def as_message(t: Trajectory) -> tuple:
    """What a careful user would pickle: plain arrays and floats (~30% cheaper than the dataclass)."""
    return (t.query, [(s.activations, s.attention, s.reward) for s in t.steps], t.quality)


def _queue_producer(queue, seed: int, steps: int, go, seconds: float, out, ready) -> None:
    child_start()
    pool = [as_message(t) for t in make_pool(seed, steps)]
    ready.release()
    go.wait()
    cpu0, sent = time.process_time(), 0
    deadline = time.monotonic() + seconds
    put = queue.put
    while time.monotonic() < deadline:
        for t in pool:
            put(t)
        sent += len(pool)
    put(None)
    out.put((sent, sent, time.process_time() - cpu0))


def _queue_consumer(queue, producers: int, many: bool, out, ready) -> None:
    child_start()
    ready.release()
    received, done = 0, 0
    while done < producers:
        items = queue.get_many(max_messages_to_get=1024, timeout=60) if many else [queue.get(timeout=60)]
        for item in items:
            if item is None:
                done += 1
            else:
                received += 1
    out.put((received, time.perf_counter()))


def wait_ready(ready, processes: int) -> None:
    """Wait until every child started for a run has said it is ready (attached, its pool made): the measured window
    starts with all of them ready, however slowly a loaded machine forks and attaches them."""
    for _ in range(processes):
        if not ready.acquire(timeout=120):
            raise RuntimeError("a child did not get ready within 120 s")


def run_throughput(system: str, producers: int, steps: int, seconds: float) -> dict[str, float]:
    go, out, ready = CTX.Event(), CTX.Queue(), CTX.Semaphore(0)
    if system == "sona_shm":
        with Engine(f"tp{steps}", lanes=max(8, producers + 2), flush_threshold=100) as engine:
            before = read_stats(engine.name)["trajectories_processed"]
            procs = [CTX.Process(target=_sona_producer, args=(engine.name, p, steps, go, seconds, out, ready)) for p in range(producers)]
            for p in procs:
                p.start()
            with attach(engine.name) as client:  # to ask when everything is learned
                wait_ready(ready, producers)  # forking and attaching are excluded from the measured window
                start = time.perf_counter()
                go.set()
                results = [out.get(timeout=seconds + 120) for _ in procs]
                for p in procs:
                    p.join(60)
                recorded = sum(r[0] for r in results)
                while read_stats(engine.name)["trajectories_processed"] - before < recorded:
                    client.flush(timeout=60)
                end = time.perf_counter()
        delivered = recorded
    else:
        if system == "faster_fifo":
            import faster_fifo

            queue = faster_fifo.Queue(max_size_bytes=64 * 2**20)
        else:
            queue = CTX.Queue(maxsize=QUEUE_SIZE)
        consumer = CTX.Process(target=_queue_consumer, args=(queue, producers, system == "faster_fifo", out, ready))
        procs = [CTX.Process(target=_queue_producer, args=(queue, p, steps, go, seconds, out, ready)) for p in range(producers)]
        consumer.start()
        for p in procs:
            p.start()
        wait_ready(ready, producers + 1)
        start = time.perf_counter()
        go.set()
        results, got = [], None
        for _ in range(producers + 1):
            item = out.get(timeout=seconds + 300)
            if len(item) == 2:
                got = item
            else:
                results.append(item)
        for p in [*procs, consumer]:
            p.join(60)
        delivered, end = got
        attempted = sum(r[1] for r in results)
        assert delivered == attempted, (system, delivered, attempted)
    cpu = sum(r[2] for r in results)
    attempted = sum(r[1] for r in results)
    return {
        "delivered_per_s": delivered / (end - start),
        "producer_cpu_us_per_traj": cpu / attempted * 1e6,
        "dropped": attempted - delivered,
    }


# ----------------------------------------------------------------- 1b. the buffer for consumers


def _sona_count_producer(name: str, seed: int, go, count: int, out, ready) -> None:
    child_start()
    pool = make_pool(seed, 1)
    with attach(name, timeout=30) as client:
        ready.release()
        go.wait()
        cpu0, accepted = time.process_time(), 0
        record = client.record
        for k in range(count):
            accepted += record(pool[k % POOL], timeout=5.0)  # waits for room like a blocking put()
        out.put((accepted, count, time.process_time() - cpu0))


def _queue_count_producer(queue, seed: int, go, count: int, out, ready) -> None:
    child_start()
    pool = [as_message(t) for t in make_pool(seed, 1)]
    ready.release()
    go.wait()
    cpu0 = time.process_time()
    put = queue.put
    for k in range(count):
        put(pool[k % POOL])
    put(None)
    out.put((count, count, time.process_time() - cpu0))


#: Buffer capacity of the "full" runs: the engine default (what the issue measured), or a
#: twentieth of the trajectories when that is less (so that it fills in short runs too).
FULL_CAPACITY = 10_000


def run_buffer(mode: str, producers: int, total: int) -> dict[str, float]:
    """``total`` T1 trajectories from ``producers`` processes into one engine whose buffer keeps
    all of them (``keep``), or has FULL_CAPACITY slots (``full``: later ones are learned, not
    copied; ``total // 20`` slots if fewer), or through a multiprocessing.Queue (``queue``). Delivered = learned (or received)
    per second, from the start signal until the last one; ``start_s``: how long the flusher
    took to create its engine (sona_shm only)."""
    per = total // producers
    go, out, ready = CTX.Event(), CTX.Queue(), CTX.Semaphore(0)
    if mode == "queue":
        queue = CTX.Queue(maxsize=QUEUE_SIZE)
        consumer = CTX.Process(target=_queue_consumer, args=(queue, producers, False, out, ready))
        procs = [CTX.Process(target=_queue_count_producer, args=(queue, p, go, per, out, ready)) for p in range(producers)]
        consumer.start()
        for p in procs:
            p.start()
        wait_ready(ready, producers + 1)
        start = time.perf_counter()
        go.set()
        results, got = [], None
        for _ in range(producers + 1):
            item = out.get(timeout=600)
            if len(item) == 2:
                got = item
            else:
                results.append(item)
        for p in [*procs, consumer]:
            p.join(60)
        delivered, end = got
        return {"delivered_per_s": delivered / (end - start), "delivered": delivered}
    capacity = per * producers if mode == "keep" else min(FULL_CAPACITY, total // 20)
    t0 = time.perf_counter()
    with Engine(f"buf-{mode}", lanes=max(8, producers + 2), capacity=capacity) as engine:
        start_s = time.perf_counter() - t0
        procs = [CTX.Process(target=_sona_count_producer, args=(engine.name, p, go, per, out, ready)) for p in range(producers)]
        for p in procs:
            p.start()
        with attach(engine.name) as client:
            wait_ready(ready, producers)  # forking and attaching are excluded from the measured window
            start = time.perf_counter()
            go.set()
            results = [out.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(60)
            recorded = sum(r[0] for r in results)
            while read_stats(engine.name)["trajectories_processed"] < recorded:
                client.flush(timeout=60)
            end = time.perf_counter()
            stats = read_stats(engine.name)
        kept, dropped = stats["buffer"]["len"], stats["buffer"]["dropped"]
        if recorded != per * producers or kept + dropped != recorded or (mode == "keep" and dropped):
            raise RuntimeError(f"buffer {mode}: recorded {recorded} of {per * producers}, kept {kept}, dropped {dropped}")
    return {"delivered_per_s": recorded / (end - start), "delivered": recorded, "kept": kept, "capacity": capacity, "start_s": start_s}


# ----------------------------------------------------------------- 2. latency


def _background(name: str, seed: int, steps: int, seconds: float) -> None:
    child_start()
    pool = make_pool(seed, steps)
    with attach(name, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for t in pool:
                client.record(t)


def time_calls(fn: Callable, args: list[tuple], repeat: int) -> list[int]:
    clock, samples = time.perf_counter_ns, []
    for _ in range(repeat):
        for a in args:
            t0 = clock()
            fn(*a)
            samples.append(clock() - t0)
    return samples


def run_latency(producers: int, seconds: float) -> dict[str, dict]:
    results = {}
    with Engine("lat", lanes=max(8, producers + 2)) as engine, attach(engine.name) as client:
        for steps in (1, 4):
            others = [CTX.Process(target=_background, args=(engine.name, 100 + p, steps, seconds)) for p in range(producers - 1)]
            for p in others:
                p.start()
            pool = make_pool(7, steps, 512)
            samples: list[int] = []
            deadline = time.monotonic() + seconds * 0.8
            while time.monotonic() < deadline:
                samples += time_calls(client.record, [(t,) for t in pool], 1)
            for p in others:
                p.join(seconds + 60)
            results[f"record T{steps}"] = pct(samples)
        client.flush(timeout=60)  # a non-zero adapter from here on
        rng = np.random.default_rng(3)
        x = rng.standard_normal(HIDDEN_DIM).astype(np.float32)
        batch = rng.standard_normal((32, HIDDEN_DIM)).astype(np.float32)
        calls = max(2000, int(20000 * seconds))
        results["forward 1"] = pct(time_calls(client.forward, [(x,)], calls))
        results["forward 32"] = pct(time_calls(client.forward, [(batch,)], calls))
    results.update(run_route_latency(max(2000, int(20000 * seconds))))
    return results


def run_route_latency(calls: int) -> dict[str, dict]:
    """``route()`` beside ``forward()`` on a routing engine with K = 8 routes, interleaved call by call."""
    with tempfile.TemporaryDirectory(prefix="sona-bench-") as scratch:
        path = os.path.join(scratch, "routes.npz")
        rng = np.random.default_rng(8)
        routes = rng.standard_normal((ROUTES, HIDDEN_DIM)).astype(np.float32)
        np.savez(path, vectors=routes)
        with Engine("route", rule="routing", routes=path, lanes=2) as engine, attach(engine.name) as client:
            for k in range(200):  # a learned, non-zero adapter
                client.feedback(rng.standard_normal(HIDDEN_DIM).astype(np.float32), best=k % ROUTES)
            client.flush(timeout=60)
            x = rng.standard_normal(HIDDEN_DIM).astype(np.float32)
            forward, route = [], []
            for _ in range(calls // 100):
                forward += time_calls(client.forward, [(x,)], 100)
                route += time_calls(client.route, [(x,)], 100)
    return {"forward 1 (K8 engine)": pct(forward), "route 1 (K8)": pct(route)}


# ----------------------------------------------------------------- 3. learning rate


ROUTES = 8  #: routes of the routing-rule rows (the issue's K = 8)


def run_learning(seconds: float) -> dict[str, float]:
    """The flusher's learning of one batch of lane slots (what Flusher._learn_slots runs:
    the C learner when built, else numpy), in-process, on slot-shaped data: the reference
    rule on T1/T4 trajectories, and the routing rule on feedback (K = 8 routes)."""
    from sona_shm.learn.learner import learn_block, learning_signals
    from sona_shm.shm import lane
    from sona_shm.shm.layout import Layout

    results = {}
    speedups = lane._speedups
    for rule, steps in (("reference", 1), ("reference", 4), ("routing", 1)):
        k = ROUTES if rule == "routing" else 0
        layout = Layout(EngineConfig(hidden_dim=HIDDEN_DIM, rank=RANK, attention_dim=ATTENTION_DIM, rule=rule, routes=k))
        unit = np.random.default_rng(7).standard_normal((k, HIDDEN_DIM)).astype(np.float32)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True) if k else 1
        for batch in (32, 256, 1024):
            slots = np.zeros(batch, dtype=layout.slot_dtype)
            rng = np.random.default_rng(batch)
            slots["seq"] = np.arange(1, batch + 1)
            slots["query"] = rng.standard_normal((batch, HIDDEN_DIM))
            slots["steps"]["act"][:, :steps] = rng.standard_normal((batch, steps, HIDDEN_DIM))
            slots["meta"]["reward"][:, :steps] = rng.standard_normal((batch, steps))
            slots["n_steps"] = steps
            slots["quality"] = rng.random(batch)
            if rule == "routing":  # half bandit, half full-information feedback
                slots["route_index"] = rng.integers(1, k + 1, batch)
                slots["best_index"] = np.where(np.arange(batch) % 2, rng.integers(1, k + 1, batch), 0)
            raw = slots.view(np.uint8).reshape(batch, layout.slot_bytes)
            learner = Learner(HIDDEN_DIM, RANK, layout.config.lr, 100, rule=rule, unit=unit if k else None)
            n_steps = slots["n_steps"].astype(np.int64)
            route_index = slots["route_index"].astype(np.int64) - 1  # stored + 1 as uint16: 0 - 1 must be -1, not 65535
            best_index = slots["best_index"].astype(np.int64) - 1
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                if speedups is not None:
                    learn_block(learner, layout, raw, 1)
                elif rule == "routing":
                    learner.learn_feedback(slots["query"], route_index, best_index, slots["quality"])
                else:
                    query, rewards, act = slots["query"], slots["meta"]["reward"][:, :steps], slots["steps"]["act"][:, :steps]
                    learner.learn(learning_signals(query, rewards, act, n_steps), slots["quality"])
                done += batch
            label = f"routing K{k}" if rule == "routing" else f"T{steps}"
            results[f"{label} batch {batch}"] = done / (time.perf_counter() - t0)
    return results


# ----------------------------------------------------------------- 4. freshness


def _watcher(name: str, ready, seen, samples: int, seconds: float, out) -> None:
    """Poll forward() until the adapter changed ``samples`` times (or ``seconds`` passed); put the change times.

    ``seen`` (shared) counts the changes so far: the recording side waits for it before
    it records the next trajectory, so that no change can hide behind another.
    """
    child_start()
    with attach(name, timeout=30) as client:
        x = np.ones(HIDDEN_DIM, np.float32)
        last = client.forward(x)
        ready.set()
        stamps: list[int] = []
        deadline = time.monotonic() + seconds
        polls = 0
        while len(stamps) < samples:
            now = client.forward(x)
            if not np.array_equal(now, last):
                stamps.append(time.perf_counter_ns())
                seen.value = len(stamps)
                last = now
            polls += 1
            if polls % 1024 == 0 and (time.monotonic() > deadline or orphaned()):
                break
        out.put(stamps)


def run_freshness(samples: int) -> dict[str, Any]:
    with Engine("fresh", flush_threshold=1, lanes=4) as engine:
        ready, seen, out = CTX.Event(), CTX.Value("i", 0), CTX.Queue()
        watcher = CTX.Process(target=_watcher, args=(engine.name, ready, seen, samples, 120.0, out))
        watcher.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("freshness: the watcher did not attach within 60 s")
            pool = make_pool(11, 1, samples)
            sent = []
            with attach(engine.name) as client:
                for k, t in enumerate(pool):
                    deadline = time.monotonic() + 10
                    while seen.value < k:  # the watcher saw the previous change: each record is its own
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"freshness: the watcher saw {seen.value} of {k} changes within 10 s")
                        time.sleep(0.0005)
                    client.sync(timeout=10)
                    time.sleep(0.002)  # let the flusher fall idle, as between real requests
                    client.record(t)
                    sent.append(time.perf_counter_ns())
            stamps = out.get(timeout=120)
            watcher.join(60)
        finally:
            if watcher.is_alive():  # only when something above failed
                watcher.kill()
            watcher.join()
        if len(stamps) != samples:
            raise RuntimeError(f"freshness: the watcher saw {len(stamps)} of {samples} changes")
        lag = np.array(stamps) - np.array(sent)
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_s() -> float:
            with open(f"/proc/{engine.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        c0, t0 = cpu_s(), time.monotonic()
        time.sleep(2.0)
        idle = (cpu_s() - c0) / (time.monotonic() - t0)
    return {**pct(lag), "idle_flusher_cpu_percent": idle * 100, "wake_timeout_s": WAKE_TIMEOUT}


# ----------------------------------------------------------------- 0. calibration


def run_calibration() -> dict[str, dict[str, float]]:
    """The floors anchors.md lists, measured here, to compare machines (thread CPU time, µs)."""
    import pickle

    import posix_ipc

    t = make_pool(5, 1, 1)[0]
    msg = pickle.dumps(as_message(t), protocol=pickle.HIGHEST_PROTOCOL)
    src = np.ones(256, np.float32)
    dst = np.zeros(4096, np.float32)[:256]
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
    down = np.ones((2, 256), np.float32)

    def cpu_us(fn: Callable[[], object], n: int = 20000) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time_ns()
            for _ in range(n):
                fn()
            best = min(best, (time.thread_time_ns() - t0) / n / 1000)
        return best

    def acquire_release() -> None:
        sem.acquire(0)
        sem.release()

    try:
        here = {
            "numpy copy of 256 float32": cpu_us(lambda: dst.__setitem__(Ellipsis, src)),
            "posix_ipc acquire(0)+release": cpu_us(acquire_release),
            "pickle.dumps of a T1 trajectory": cpu_us(lambda: pickle.dumps(as_message(t), protocol=pickle.HIGHEST_PROTOCOL), 5000),
            "pickle.loads of a T1 trajectory": cpu_us(lambda: pickle.loads(msg), 5000),
            "np.dot, one vector, rank 2": cpu_us(lambda: down @ src),
        }
    finally:
        sem.unlink()
        sem.close()
    anchors = {  # anchors.md, "Floors" and the queues' pickling figures
        "numpy copy of 256 float32": 0.11,
        "posix_ipc acquire(0)+release": 0.12,
        "pickle.dumps of a T1 trajectory": 7.7,
        "pickle.loads of a T1 trajectory": 4.6,
        "np.dot, one vector, rank 2": 1.8,
    }
    return {k: {"here_us": v, "anchors_us": anchors[k], "ratio": v / anchors[k]} for k, v in here.items()}


# ----------------------------------------------------------------- main


# ----------------------------------------------------------------- 5. routing


#: (K, hidden_dim) of the routing section: the shapes of the rule's throughput targets (1M and 200k signals/s).
ROUTING_SHAPES = ((8, 256), (32, 384))


def routing_stream(
    k: int, h: int, n: int, bandit: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit routes ``float32[k, h]`` and ``n`` feedbacks on them: queries near a random route ``y`` (cosine ~0.6),
    full information (``best = y``) or bandit (the route served is ``y`` two times in three, else another; reward 1
    if it was ``y``); returns ``(unit, query, route_index, best_index, quality)``."""
    rng = np.random.default_rng(seed)
    unit = rng.standard_normal((k, h))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    query = (unit[y] + rng.standard_normal((n, h)) * (1.33 / np.sqrt(h))).astype(np.float32)
    served = np.where(rng.random(n) < 2 / 3, y, (y + rng.integers(1, k, n)) % k)
    none = np.full(n, -1, np.int64)
    if bandit:
        return unit.astype(np.float32), query, served, none, (served == y).astype(np.float32)
    return unit.astype(np.float32), query, none, y, np.ones(n, np.float32)


def _learn_once(learner: Learner, *stream: Any) -> None:
    """One pass of the C learner over a stream: lane slots ``(layout, raw)`` as the flusher learns them
    (learn_routing), or rows ``(query, route_index, best_index, quality)`` as InstantLoop does (learn_routing_rows)."""
    from sona_shm.learn.learner import learn_block

    if len(stream) == 2:
        learn_block(learner, *stream, 1)
    else:
        learner.learn_feedback(*stream)


def run_routing(seconds: float) -> dict[str, float]:
    """Section 5 (module docstring): signals/s of the routing rule's C learners, and route()'s µs per call."""
    from sona_shm.config import DEFAULT_TEMPERATURE
    from sona_shm.native import speedups
    from sona_shm.shm.layout import Layout

    if speedups is None:
        return {}
    results: dict[str, float] = {}
    n = 4096
    for k, h in ROUTING_SHAPES:
        config = EngineConfig(hidden_dim=h, rank=RANK, rule="routing", routes=k, max_steps=1, attention_dim=0)
        layout = Layout(EngineConfig(hidden_dim=h, rank=RANK, max_steps=1, attention_dim=0))  # the slots (alike under both rules)
        for regime in ("bandit", "full"):
            unit, query, route_index, best_index, quality = routing_stream(k, h, n, regime == "bandit")
            slots = np.zeros(n, dtype=layout.slot_dtype)
            slots["seq"] = np.arange(1, n + 1)
            slots["query"], slots["quality"] = query, quality
            slots["route_index"], slots["best_index"] = route_index + 1, best_index + 1
            raw = slots.view(np.uint8).reshape(n, layout.slot_bytes)
            for entry in ("slots", "rows"):
                learner = Learner(h, RANK, config.lr, config.flush_threshold, rule="routing", unit=unit, temperature=DEFAULT_TEMPERATURE)
                stream = (learner, layout, raw) if entry == "slots" else (learner, query, route_index, best_index, quality)
                _learn_once(*stream)  # the router learns the routes first: what is measured is a router in use
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    _learn_once(*stream)
                    done += n
                results[f"learn_routing{'_rows' if entry == 'rows' else ''} K{k} h{h} {regime}"] = done / (time.perf_counter() - t0)
    k, h = ROUTING_SHAPES[0]
    unit, query, *_ = routing_stream(k, h, 1, False)
    rng = np.random.default_rng(1)
    down = (rng.standard_normal((RANK, h)) * 0.01).astype(np.float32)
    up_scaled = (rng.standard_normal((RANK, h)) * 0.01).astype(np.float32)
    bias, active, names = np.zeros(k, np.float32), np.ones(k, np.uint8), tuple(f"route{i}" for i in range(k))
    calls = max(20_000, int(200_000 * seconds))
    for label, mode, parameter in (("greedy", 0, 0.0), ("epsilon 0.1", 1, 0.1), ("softmax", 2, 0.0), ("squarecb", 3, 1000.0)):
        args = (query[0], down, up_scaled, unit, bias, active, names, mode, parameter, DEFAULT_TEMPERATURE, -1.0)
        best = min(timeit.repeat(functools.partial(speedups.route, *args), number=calls, repeat=3))
        results[f"route K{k} h{h} {label} µs"] = best / calls * 1e6
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--seconds", type=float, default=None, help="length of each measured phase")
    p.add_argument("--repeat", type=int, default=None, help="rounds of the interleaved throughput runs")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: throughput,buffer,latency,learning,freshness,routing")
    p.add_argument(
        "--buffer-trajectories",
        type=int,
        default=None,
        help="T1 trajectories per run of the buffer section (default 200000: a 2.3 GiB buffer; --quick 4000)",
    )
    args = p.parse_args()
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    repeat = args.repeat or (1 if args.quick else 5)
    skip = set(filter(None, args.skip.split(",")))
    calibration = run_calibration()
    systems = ["sona_shm", "multiprocessing.Queue"]
    try:
        import faster_fifo  # noqa: F401

        systems.append("faster_fifo")
    except ImportError:
        print("faster-fifo is not installed (pip install .[bench]); comparing with multiprocessing.Queue only", file=sys.stderr)

    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
            "cpu": _cpu_name(), "producers": args.producers, "seconds": seconds, "repeat": repeat,
            "c_fast_paths": _c_paths(),
        },
        "calibration": calibration,
    }  # fmt: skip
    if "throughput" not in skip:
        runs: dict[str, dict[str, list]] = {}
        for steps in (1, 4):
            for r in range(repeat):
                order = systems[r % len(systems) :] + systems[: r % len(systems)]  # rotate who goes first
                for system in order:
                    res = run_throughput(system, args.producers, steps, seconds)
                    for k, v in res.items():
                        runs.setdefault(f"T{steps} {system}", {}).setdefault(k, []).append(v)
        report["throughput"] = {key: {k: statistics.median(v) for k, v in vals.items()} for key, vals in runs.items()}
        report["throughput_runs"] = runs
    if "buffer" not in skip:
        total = args.buffer_trajectories or (4000 if args.quick else 200_000)
        buffer_runs: dict[str, dict[str, list]] = {}
        modes = ["keep", "full", "queue"]
        for r in range(repeat):
            for mode in modes[r % 3 :] + modes[: r % 3]:  # rotate who goes first
                for k, v in run_buffer(mode, args.producers, total).items():
                    buffer_runs.setdefault(mode, {}).setdefault(k, []).append(v)
        report["buffer"] = {mode: {k: statistics.median(v) for k, v in vals.items()} for mode, vals in buffer_runs.items()}
        report["buffer"]["trajectories"] = total
        # Each round runs the three modes back to back: the ratio within a round compares like with like on a machine
        # whose load changes from minute to minute (issue 21, item 7).
        per_round = [k / q for k, q in zip(buffer_runs["keep"]["delivered_per_s"], buffer_runs["queue"]["delivered_per_s"])]
        report["buffer"]["keep_vs_queue"] = {
            "of_medians": report["buffer"]["keep"]["delivered_per_s"] / report["buffer"]["queue"]["delivered_per_s"],
            "median_of_rounds": statistics.median(per_round),
            "rounds": per_round,
        }
        report["buffer_runs"] = buffer_runs
    if "latency" not in skip:
        report["latency"] = run_latency(args.producers, seconds)
    if "learning" not in skip:
        report["learning_per_s"] = run_learning(seconds / 2)
    if "freshness" not in skip:
        report["freshness"] = run_freshness(50 if args.quick else 500)
    if "routing" not in skip:
        report["routing"] = run_routing(seconds / 2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, systems)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _c_paths() -> bool:
    from sona_shm.engine import client

    return client._speedups is not None


def print_report(report: dict[str, Any], systems: list[str]) -> None:
    m = report["machine"]
    print(f"sona_shm bench: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, numpy {m['numpy']}, "
          f"C fast paths {'on' if m['c_fast_paths'] else 'OFF'}; hidden 256, rank 2, {m['producers']} producers")  # fmt: skip
    cal = report["calibration"]
    factor = statistics.median(c["ratio"] for c in cal.values())
    print(f"\n0. this machine against the one anchors.md was measured on (thread CPU time, µs): median {factor:.1f}x slower")
    for k, c in cal.items():
        print(f"   {k:<34} {c['here_us']:>8.2f}  (anchors {c['anchors_us']:.2f}, {c['ratio']:.1f}x)")
    if "throughput" in report:
        print(f"\n1. delivered throughput, {m['producers']} producers -> 1 consumer, median of {m['repeat']} interleaved rounds")
        print(f"   {'workload':<28} {'traj/s':>12} {'vs sona_shm':>12} {'producer CPU µs/traj':>22}")
        for steps in (1, 4):
            ours = report["throughput"][f"T{steps} sona_shm"]["delivered_per_s"]
            for system in systems:
                r = report["throughput"][f"T{steps} {system}"]
                ratio = "" if system == "sona_shm" else f"{ours / r['delivered_per_s']:.1f}x slower"
                print(f"   T{steps} {system:<25} {r['delivered_per_s']:>12,.0f} {ratio:>12} {r['producer_cpu_us_per_traj']:>22.2f}")
    if "buffer" in report:
        b = report["buffer"]
        keep, full, queue = (b[mode]["delivered_per_s"] for mode in ("keep", "full", "queue"))
        print(f"\n1b. the buffer for consumers: {b['trajectories']:,} T1 trajectories, {m['producers']} producers, "
              f"median of {m['repeat']} interleaved rounds")  # fmt: skip
        print(f"   {'buffer':<44} {'traj/s':>12} {'vs full':>9} {'vs mp.Queue':>12}")
        print(f"   {'keeps every one (capacity = trajectories)':<44} {keep:>12,.0f} {keep / full:>8.0%} {keep / queue:>11.1f}x"
              f"   (engine created in {b['keep']['start_s']:.2f} s)")  # fmt: skip
        full_label = f"full (capacity {b['full']['capacity']:,}): learned, not kept"
        print(f"   {full_label:<44} {full:>12,.0f} {'':>9} {full / queue:>11.1f}x"
              f"   (engine created in {b['full']['start_s']:.2f} s)")  # fmt: skip
        print(f"   {'multiprocessing.Queue (received only)':<44} {queue:>12,.0f}")
        ratio = b["keep_vs_queue"]
        print(f"   keeps every one / mp.Queue: {ratio['of_medians']:.1f}x of the medians, {ratio['median_of_rounds']:.1f}x the median "
              f"round (rounds: {', '.join(f'{r:.1f}x' for r in ratio['rounds'])})")  # fmt: skip
    if "latency" in report:
        print("\n2. producer calls while the others record and the flusher learns (µs)")
        print(f"   {'operation':<22} {'median':>8} {'p99':>8} {'calls':>9}")
        for op, r in report["latency"].items():
            print(f"   {op:<22} {r['median_us']:>8.2f} {r['p99_us']:>8.2f} {r['n']:>9}")
        lat = report["latency"]
        if "route 1 (K8)" in lat:
            ratio = lat["route 1 (K8)"]["median_us"] / lat["forward 1 (K8 engine)"]["median_us"]
            print(f"   route() / forward(), medians, K = 8: {ratio:.2f}x (target <= 1.5x)")
    if "learning_per_s" in report:
        print("\n3. flusher learning rate (signals + accumulate + flushes), trajectories/s")
        for k, v in report["learning_per_s"].items():
            print(f"   {k:<24} {v:>14,.0f}")
    if "freshness" in report:
        f = report["freshness"]
        print(f"\n4. freshness, flush_threshold 1: record() -> change visible in another process: "
              f"median {f['median_us']:.0f} µs, p99 {f['p99_us']:.0f} µs ({f['n']} samples); "
              f"idle flusher {f['idle_flusher_cpu_percent']:.2f}% of a core")  # fmt: skip
    if report.get("routing"):
        print("\n5. routing rule, C: learning (signals/s, a clustered stream) and route() (µs per call)")
        for k, v in report["routing"].items():
            print(f"   {k:<40} {v:>14,.2f}" if k.endswith("µs") else f"   {k:<40} {v:>14,.0f}")


if __name__ == "__main__":
    sys.exit(main())
