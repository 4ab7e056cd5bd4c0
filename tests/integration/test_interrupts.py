"""A producer interrupted at random points of attach, record and close (KeyboardInterrupt, a time limit) survives:
close() never fails afterwards, nothing leaks, and what an interrupted record() means is said exactly."""

from __future__ import annotations

import json

import pytest

from sona_shm.stats import read_stats

from support import ROOT, wait_for

INTERRUPTED = str(ROOT / "tests" / "interrupted.py")


@pytest.mark.guarantee("an-interrupted-client-leaks-nothing")
def test_interruptions_at_random_points_leak_nothing_and_every_committed_record_is_learned_once(procs, name):
    procs.flusher(name, "--hidden-dim", "32", "--lanes", "4", "--lane-slots", "64", "--capacity", "0", "--max-steps", "1")
    results = []
    for seed in range(2):  # one after the other: each checks at its end that it holds no lane lock
        p = procs.start(INTERRUPTED, name, "--seed", str(seed), "--ops", "1500")
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, (out, err[-3000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["close_errors"] == 0 and r["lanes_held"] == 0
        # Descriptors are opened in C (native.Descriptor): no number is lost between the kernel's answer and its
        # owner. The pure-Python twin stores os.open's number one bytecode later: a signal exactly there loses it.
        assert r["fds_leaked"] == 0 if r["c"] else r["fds_leaked"] <= r["interrupted_attach"] + r["interrupted_record"]
        assert r["interrupted_record"] > 0 and r["interrupted_close"] + r["interrupted_attach"] > 0  # the timer did land there
    committed = sum(r["moved"] for r in results)
    assert committed == sum(r["accepted"] + r["noted"] for r in results)  # True, or the note: nothing else was committed
    wait_for(lambda: read_stats(name)["trajectories_processed"] == committed, what="every committed record to be learned")
    stats = read_stats(name)
    assert stats["recorded"] == committed and stats["backlog"] == 0 and stats["lanes_live"] == 0
