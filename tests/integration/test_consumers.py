"""Real processes: a flusher, producers and consumers draining the buffer concurrently."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from sona_shm import DrainTimeoutError, TrajectoryBatch, attach, open_consumer
from sona_shm.stats import read_stats

from support import ROOT, assert_same_trajectory, make_trajectories, run

pytestmark = pytest.mark.guarantee("drained-means-handed-out-once")

PRODUCER = str(ROOT / "tests" / "producer.py")
CONSUMER = str(ROOT / "tests" / "consumer.py")
H = 32
ENGINE = ("--hidden-dim", str(H), "--max-steps", "4", "--attention-dim", "8", "--lanes", "8", "--lane-slots", "128")


def finish(proc: subprocess.Popen, what: str) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}): {err}"
    return out


def recorded_by_query(seeds: range, count: int) -> dict[bytes, object]:
    """What ``tests/producer.py`` records for these seeds, keyed by the query's bytes."""
    expected = {t.query.tobytes(): t for seed in seeds for t in make_trajectories(seed, count, H)}
    assert len(expected) == len(seeds) * count  # every query is distinct, so it identifies its trajectory
    return expected


def test_two_consumers_and_three_producers_account_for_every_trajectory(procs, name, tmp_path):
    procs.flusher(name, *ENGINE, "--capacity", "64")
    count, seeds = 1500, range(3)
    total = count * len(seeds)
    outs = [tmp_path / f"consumer-{k}.npz" for k in range(2)]
    consumers = [procs.start(CONSUMER, name, "--out", str(out), "--expect", str(total), "--seed", str(k)) for k, out in enumerate(outs)]
    producers = [procs.start(PRODUCER, name, "--seed", str(s), "--count", str(count)) for s in seeds]
    for p in producers:
        finish(p, "producer")
    drained = [json.loads(finish(c, "consumer"))["drained"] for c in consumers]

    batches = [TrajectoryBatch.load(out) for out in outs]
    assert [len(b) for b in batches] == drained
    ids = [b.traj_id.tolist() for b in batches]
    every = ids[0] + ids[1]
    assert len(every) == len(set(every))  # no trajectory was handed out twice
    stats = read_stats(name)
    buffer = stats["buffer"]
    assert stats["trajectories_processed"] == total and stats["lane_dropped"] == 0
    assert buffer["len"] == 0 and buffer["drained"] == len(every)
    assert buffer["drained"] + buffer["len"] + buffer["dropped"] == total
    assert buffer["success_rate"] == pytest.approx((total - buffer["dropped"]) / total)
    expected = recorded_by_query(seeds, count)
    for batch in batches:
        for got in batch.trajectories():
            assert_same_trajectory(got, expected[got.query.tobytes()])
    lanes = 8
    for mine in ids:  # oldest first: each lane's trajectories come out in the order it recorded them
        for lane in range(lanes):
            of_lane = [i for i in mine if i % lanes == lane]
            assert of_lane == sorted(of_lane)


def test_without_a_consumer_the_buffer_fills_and_then_drains_by_cli(procs, name, tmp_path):
    procs.flusher(name, *ENGINE, "--capacity", "50")
    finish(procs.start(PRODUCER, name, "--seed", "5", "--count", "300"), "producer")
    stats = read_stats(name)
    assert stats["trajectories_processed"] == 300
    assert (stats["buffer"]["len"], stats["buffer"]["dropped"]) == (50, 250)
    assert stats["buffer"]["success_rate"] == pytest.approx(50 / 300)

    out = tmp_path / "first.npz"
    cli = run([sys.executable, "-m", "sona_shm", "drain", "--name", name, "--out", str(out), "--max", "20"], timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert f"drained 20 trajectories from {name!r}" in cli.stdout
    recorded = make_trajectories(5, 300, H)
    with np.load(out) as data:  # what a training job does
        assert np.array_equal(data["query"], np.stack([t.query for t in recorded[:20]]))
    with attach(name) as client:
        rest = client.drain()
        assert len(rest) == 30
        for got, expected in zip(rest, recorded[20:50]):  # the oldest were kept, the newest dropped
            assert_same_trajectory(got, expected)
        assert client.buffer_stats() == (0, 250, pytest.approx(50 / 300))
        assert client.stats()["buffer"]["drained"] == 50


def test_a_consumer_killed_mid_drain_loses_nothing_and_wedges_nobody(procs, name, tmp_path):
    procs.flusher(name, *ENGINE, "--capacity", "256")
    finish(procs.start(PRODUCER, name, "--seed", "6", "--count", "200"), "producer")
    holder = procs.start(CONSUMER, name, "--hold", "50")
    line = holder.stdout.readline()
    assert line, f"the holding consumer died: {holder.stderr.read()}"
    held = json.loads(line)["ids"]
    assert len(held) == 50  # copied out, lock held, tail not moved: now it dies
    with open_consumer(name) as consumer:
        with pytest.raises(DrainTimeoutError, match=f"pid {holder.pid}"):
            consumer.drain(timeout=0.1)
        assert consumer.buffer_stats()[0] == 200
    out = tmp_path / "after.npz"
    waiting = procs.start(CONSUMER, name, "--out", str(out), "--expect", "200")  # blocks on the lock
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
    assert json.loads(finish(waiting, "consumer"))["drained"] == 200
    batch = TrajectoryBatch.load(out)
    assert set(held) <= set(batch.traj_id.tolist()) and batch.traj_id.tolist()[:50] == held
    expected = recorded_by_query(range(6, 7), 200)
    for got in batch.trajectories():
        assert_same_trajectory(got, expected[got.query.tobytes()])
    buffer = read_stats(name)["buffer"]
    assert (buffer["drained"], buffer["len"], buffer["dropped"]) == (200, 0, 0)
