"""A producer interrupted at random points inside sona_shm (tests/integration/test_interrupts.py).

    python tests/interrupted.py ENGINE --seed S --ops N

A timer (``setitimer``) fires every few tens of microseconds; its handler raises
KeyboardInterrupt when it lands in sona_shm's own code (what a Ctrl-C or a Celery soft time
limit does to a worker that survives it), and does nothing elsewhere. The loop attaches,
records and closes, catching the interruptions; it prints one JSON line: how many record()
calls returned True, how many raised with the "committed" note, how many heads moved, how
many calls of each kind were interrupted, and whether a descriptor or lane lock leaked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sona_shm  # noqa: E402
from sona_shm.engine.client import COMMITTED_NOTE  # noqa: E402
from sona_shm.shm.layout import LOCK_LANE_BASE  # noqa: E402
from sona_shm.shm.segment import Segment  # noqa: E402

PACKAGE = str(Path(sona_shm.__file__).resolve().parent)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", type=int, default=2000)
    args = p.parse_args()
    rng = random.Random(args.seed)
    h = Segment.open(args.engine, writable=False).layout.hidden_dim
    x = np.ones(h, np.float32)

    def interrupt(signum, frame):
        if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(20e-6, 400e-6))  # not in sona_shm: try again soon

    def arm() -> None:
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(20e-6, 400e-6))

    signal.signal(signal.SIGALRM, interrupt)
    fds_before = len(os.listdir("/proc/self/fd"))
    counts = dict(accepted=0, noted=0, moved=0, interrupted_attach=0, interrupted_record=0, interrupted_close=0, close_errors=0)
    client = None
    for _ in range(args.ops):
        arm()
        try:
            if client is None:
                try:
                    client = sona_shm.attach(args.engine)
                except KeyboardInterrupt:
                    counts["interrupted_attach"] += 1
                    continue
            before = client._writer.head if client._writer is not None else None
            try:
                if client.record(sona_shm.Trajectory(x, [], 1.0)):
                    counts["accepted"] += 1
                    counts["moved"] += 1
            except KeyboardInterrupt as exc:
                counts["interrupted_record"] += 1
                noted = COMMITTED_NOTE in getattr(exc, "__notes__", ())
                moved = client._writer is not None and before is not None and client._writer.head != before
                counts["noted"] += noted
                counts["moved"] += moved
                if noted != moved:
                    print(json.dumps({"error": f"note {noted} but head moved {moved}"}))
                    return 1
            if rng.random() < 0.2:
                try:
                    client.close()
                except KeyboardInterrupt:
                    counts["interrupted_close"] += 1
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    try:
                        client.close()  # again, uninterrupted: must not raise
                    except Exception as exc:  # noqa: BLE001 - any error here is the bug under test
                        counts["close_errors"] += 1
                        print(json.dumps({"error": f"close() after an interrupted close raised {exc!r}"}))
                        return 1
                client = None
        except KeyboardInterrupt:
            pass  # landed between two calls (the handler only raises inside sona_shm, so: in a close)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if client is not None:
        client.close()
    import gc

    gc.collect()  # segments an interruption left unreachable close themselves
    probe = Segment.open(args.engine, writable=False)
    held = probe.held_locks([LOCK_LANE_BASE + lane for lane in range(probe.layout.lanes)])
    probe.close()
    counts["lanes_held"] = sum(held)
    counts["fds_leaked"] = len(os.listdir("/proc/self/fd")) - fds_before
    from sona_shm import native

    counts["c"] = native.speedups is not None
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
