"""Persistence through the real command: checkpoints of a running flusher, restore on start, leftover segments."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from sona_shm import LayoutMismatchError
from sona_shm.cli import EXIT_CHECKPOINT, EXIT_LAYOUT_MISMATCH, EXIT_OK
from sona_shm.engine.client import attach
from sona_shm.shm.layout import LAYOUT_VERSION
from sona_shm.shm.segment import Segment
from sona_shm.stats import read_stats
from sona_shm.store.checkpoint import read_checkpoint
from sona_shm.supervise import stop_process

from support import make_trajectories, run, wait_for

H = 16
OPTIONS = ["--hidden-dim", str(H), "--flush-threshold", "10", "--lanes", "2", "--lane-slots", "64", "--capacity", "100"]


def sona_shm(*argv: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sona_shm", *argv], timeout=120)


def checkpointed(path: str) -> int:
    try:
        return read_checkpoint(path).counters["trajectories_processed"]
    except Exception:
        return -1


def test_flusher_checkpoints_periodically_and_at_sigterm_and_restores_a_new_segment(procs, name, tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    flusher = procs.flusher(name, *OPTIONS, "--checkpoint", path, "--checkpoint-interval", "0.1")
    with attach(name) as client:
        for t in make_trajectories(1, 25, H):
            assert client.record(t)
        client.sync(timeout=30)
        wait_for(lambda: checkpointed(path) == 25, what="a periodic checkpoint with all 25 trajectories")
        assert read_checkpoint(path).counters["pending"] == 5  # written while running: pending gradients included
        for t in make_trajectories(2, 3, H):
            assert client.record(t)
    assert stop_process(flusher) == EXIT_OK
    final = read_checkpoint(path)  # written at SIGTERM, after the final drain and flush
    assert final.counters["trajectories_processed"] == 28 and final.counters["pending"] == 0
    assert final.config.lane_slots == 64 and final.config.hidden_dim == H
    assert sona_shm("destroy", "--name", name).returncode == EXIT_OK

    restarted = procs.flusher(name, "--checkpoint", path)  # no options: the checkpoint's engine
    stats = read_stats(name)
    assert stats["config"]["hidden_dim"] == H and stats["config"]["lane_slots"] == 64
    assert stats["trajectories_processed"] == 28 and stats["flushes_performed"] == final.counters["flushes_performed"]
    with attach(name) as client:
        x = np.linspace(-1, 1, H, dtype=np.float32)
        scale = np.float32(1 / np.sqrt(2))
        np.testing.assert_allclose(client.forward(x), x + (x @ final.down.T) @ (final.up * scale), atol=1e-7)
    assert stop_process(restarted) == EXIT_OK


@pytest.mark.guarantee("a-checkpoint-is-whole-or-absent")
def test_flusher_refuses_a_new_segment_from_a_corrupt_checkpoint(procs, name, tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"\x10\0\0\0\0\0\0\0{not json}      ")
    result = sona_shm("flusher", "--name", name, "--checkpoint", str(path), *OPTIONS)
    assert result.returncode == EXIT_CHECKPOINT
    assert f"checkpoint {path}: not a valid safetensors file: header is not valid JSON" in result.stderr
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}") and not os.path.exists(f"/dev/shm/sem.sona_shm.{name}.bell")
    assert path.read_bytes().startswith(b"\x10")  # left as it was, for someone to look at


@pytest.mark.guarantee("leftovers-are-recognised")
def test_segment_left_by_a_crashed_run_is_adopted(procs, name):
    assert sona_shm("create", "--name", name, *OPTIONS).returncode == EXIT_OK
    with attach(name) as client:
        for t in make_trajectories(3, 7, H):
            assert client.record(t)
    crashed = procs.flusher(name)
    crashed.kill()
    crashed.wait()
    same = procs.flusher(name, *OPTIONS)  # the same options: adopted
    assert read_stats(name)["trajectories_processed"] == 7
    assert stop_process(same) == EXIT_OK
    other = sona_shm("flusher", "--name", name, "--hidden-dim", "32")
    assert other.returncode == EXIT_LAYOUT_MISMATCH
    assert "hidden_dim: segment has 16, requested 32" in other.stderr and f"sona-shm destroy --name {name}" in other.stderr


@pytest.mark.guarantee("leftovers-are-recognised")
@pytest.mark.parametrize("damage", ["version", "magic"])
def test_segment_of_another_layout_is_refused_with_the_way_out(name, damage):
    assert sona_shm("create", "--name", name, *OPTIONS).returncode == EXIT_OK
    seg = Segment.open(name)
    if damage == "version":
        struct.pack_into("<I", seg.buf, 8, 99)  # a segment of a future sona_shm
    else:
        seg.buf[:8] = b"OTHERAPP"  # not ours at all
    seg.close()
    expected = f"layout version 99, this sona_shm reads version {LAYOUT_VERSION}" if damage == "version" else "not a sona_shm segment"
    for argv in (["flusher", "--name", name], ["stats", "--name", name]):
        result = sona_shm(*argv)
        assert result.returncode == EXIT_LAYOUT_MISMATCH, result.stderr
        assert expected in result.stderr and f"sona-shm destroy --name {name}" in result.stderr
    with pytest.raises(LayoutMismatchError, match=f"sona-shm destroy --name {name}"):
        attach(name)
    assert sona_shm("destroy", "--name", name).returncode == EXIT_OK
    assert sona_shm("create", "--name", name, *OPTIONS).returncode == EXIT_OK
    assert read_stats(name)["trajectories_processed"] == 0
