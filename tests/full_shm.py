"""Fill a small /dev/shm to the last page around a running engine; run by tests/integration/test_full_shm.py.

    unshare -m sh -c 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec python tests/full_shm.py NAME'

In that private /dev/shm: ``sona-shm create`` with the defaults must be refused with a
command that fits; a flusher started with that command's options runs; a filler file
then takes every page left; 32 producers (one per lane, all in this process) record
8-step trajectories through two turns of their rings, so that every page of every lane
and of the buffer is written. Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import numpy as np

from sona_shm import Step, Trajectory
from sona_shm.engine.client import attach
from sona_shm.errors import SegmentNotFoundError
from sona_shm.stats import read_stats
from sona_shm.supervise import start_flusher, stop_process

from support import run, wait_for

H, S, A = 256, 8, 64


def fill(path: str) -> int:
    """Write ``path`` until the file system is full; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (2**20, 4096):
            block = b"\1" * chunk
            while True:
                try:
                    written += f.write(block)
                except OSError:
                    break
    return written


def main() -> None:
    name = sys.argv[1]
    refused = run([sys.executable, "-m", "sona_shm", "create", "--name", name], timeout=120)
    match = re.search(r"This fits \([^)]*\): `sona-shm flusher --name \S+ ([^`]*)`", refused.stderr)
    options = shlex.split(match.group(1)) if match else []
    report = {"refused_code": refused.returncode, "refused": refused.stderr.strip(), "options": options}
    flusher = start_flusher(name, *options, "--quiet", deadline=600, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _alive(name, flusher), timeout=60, what="the flusher")
        report["filler_bytes"] = fill("/dev/shm/filler")
        rng = np.random.default_rng(0)
        steps = [Step(rng.standard_normal(H).astype(np.float32), rng.random(A).astype(np.float32), float(k)) for k in range(S)]
        clients = []
        try:
            while True:
                clients.append(attach(name))  # each holds its own lane: one process, every lane
        except Exception as exc:  # NoFreeLaneError once all are taken
            report["lanes_taken"], report["no_more_lanes"] = len(clients), type(exc).__name__
        layout = clients[0].layout
        recorded = 0
        for _ in range(2):
            for client in clients:
                for _ in range(layout.lane_slots):
                    recorded += client.record(Trajectory(rng.standard_normal(H).astype(np.float32), steps, 0.5), timeout=60)
        for client in clients:
            client.sync(timeout=120)
            client.close()
        stats = read_stats(name)
        report.update(
            recorded=recorded,
            learned=stats["trajectories_processed"],
            buffer_len=stats["buffer"]["len"],
            buffer_dropped=stats["buffer"]["dropped"],
            capacity=layout.capacity,
            lane_slots=layout.lane_slots,
        )
    finally:
        report["flusher_code"] = stop_process(flusher)
        report["flusher_stderr"] = flusher.stderr.read()
    print(json.dumps(report))


def _alive(name: str, flusher: subprocess.Popen) -> bool:
    if flusher.poll() is not None:
        raise RuntimeError(f"the flusher exited with {flusher.returncode}: {flusher.stderr.read()}")
    try:
        return read_stats(name)["flusher"]["alive"]
    except SegmentNotFoundError:
        return False


if __name__ == "__main__":
    main()
