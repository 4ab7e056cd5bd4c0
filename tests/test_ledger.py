"""The ledger latch: readers always get one whole commit, never a mix."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np

from sona_shm.shm.ledger import Ledger
from sona_shm.shm.segment import Segment
from sona_shm.supervise import die_with_parent, set_deadline


def test_publish_makes_the_other_copy_current(name, engine):
    engine()
    seg = Segment.open(name)
    ledger = Ledger(seg)
    try:
        before = ledger.commit
        record = ledger.snapshot()
        record[0]["generation"] = 41
        record[0]["lane_tail"][1] = 7
        assert ledger.publish(record) == before + 1
        assert ledger.generation() == (41, before + 1)
        assert ledger.lane_tail(1) == 7 and ledger.read("generation") == (41,)
        # the copy that was current is untouched: a writer dying now loses nothing committed
        assert ledger.copies[before & 1]["generation"] != 41
    finally:
        ledger.close()
        seg.close()


def _writer(name: str, ready, parent: int) -> None:
    die_with_parent(parent=parent)
    set_deadline(120)
    seg = Segment.open(name)
    ledger = Ledger(seg)
    record = ledger.snapshot()
    ready.set()
    k = 0
    while True:  # killed by the test (or with it, or at the deadline)
        k += 1
        record[0]["generation"] = k
        record[0]["up"] = k
        record[0]["lane_tail"] = k
        ledger.publish(record)
        # A flusher commits once per scan of the lanes; this writer commits ~10x faster
        # than the real one ever does, so readers are overlapped all the time.
        until = time.perf_counter() + 20e-6
        while time.perf_counter() < until:
            pass


def test_readers_never_see_a_torn_commit_while_a_writer_process_races(name, engine):
    engine()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(name, ready, os.getpid()))
    proc.start()
    seg = Segment.open(name, writable=False)
    ledger = Ledger(seg)
    try:
        assert ready.wait(30)
        seen = set()
        deadline = time.monotonic() + 60
        # Read until the writer has really been publishing meanwhile (how fast depends on
        # the scheduler, so count generations, not reads); every read must be consistent.
        while len(seen) <= 10 and time.monotonic() < deadline:
            generation, up, tails = ledger.read("generation", "up", "lane_tail")
            assert (up == np.float32(generation)).all() and (tails == generation).all()
            seen.add(generation)
        assert len(seen) > 10, f"the writer published only {len(seen)} generations in 60 s"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        ledger.close()
        seg.close()
