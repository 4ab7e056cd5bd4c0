"""scripts/bench.py --quick runs end to end and reports every figure (never judged on time)."""

from __future__ import annotations

import json
import sys

from support import ROOT, run


def test_bench_quick_reports_every_section():
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", "--producers", "2", "--seconds", "0.3"]
    done = run(command, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    systems = ["sona_shm", "multiprocessing.Queue"] + (["faster_fifo"] if "T1 faster_fifo" in report["throughput"] else [])
    for steps in (1, 4):
        for system in systems:
            r = report["throughput"][f"T{steps} {system}"]
            assert r["delivered_per_s"] > 0 and r["producer_cpu_us_per_traj"] > 0
    for op in ("record T1", "record T4", "forward 1", "forward 32"):
        assert report["latency"][op]["n"] > 0 and report["latency"][op]["p99_us"] >= report["latency"][op]["median_us"] > 0
    assert set(report["learning_per_s"]) == {f"T{s} batch {b}" for s in (1, 4) for b in (32, 256, 1024)}
    assert report["freshness"]["n"] == 50 and report["freshness"]["median_us"] > 0
    buffer = report["buffer"]
    assert buffer["trajectories"] == 4000
    assert buffer["keep"]["delivered"] == buffer["keep"]["kept"] == 4000  # every one learned and kept
    assert buffer["full"]["delivered"] == 4000 and buffer["full"]["kept"] == 200  # the rest learned, not kept
    assert buffer["queue"]["delivered"] == 4000
    assert all(buffer[mode]["delivered_per_s"] > 0 for mode in ("keep", "full", "queue"))
