"""scripts/bench.py and bench_fleet.py --quick run end to end and report every figure (never judged on time)."""

from __future__ import annotations

import json
import sys

from conftest import need_redis
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
    for op in ("record T1", "record T4", "forward 1", "forward 32", "forward 1 (K8 engine)", "route 1 (K8)"):
        assert report["latency"][op]["n"] > 0 and report["latency"][op]["p99_us"] >= report["latency"][op]["median_us"] > 0
    labels = ("T1", "T4", "routing K8")
    assert set(report["learning_per_s"]) == {f"{label} batch {b}" for label in labels for b in (32, 256, 1024)}
    assert report["freshness"]["n"] == 50 and report["freshness"]["median_us"] > 0
    buffer = report["buffer"]
    assert buffer["trajectories"] == 4000
    assert buffer["keep"]["delivered"] == buffer["keep"]["kept"] == 4000  # every one learned and kept
    assert buffer["full"]["delivered"] == 4000 and buffer["full"]["kept"] == 200  # the rest learned, not kept
    assert buffer["queue"]["delivered"] == 4000
    assert all(buffer[mode]["delivered_per_s"] > 0 for mode in ("keep", "full", "queue"))


def test_bench_fleet_quick_reports_every_section():
    need_redis()
    done = run([sys.executable, str(ROOT / "scripts" / "bench_fleet.py"), "--quick", "--json"], timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    t = report["throughput"]
    assert t["without_fleet_learned_per_s"] > 0 and t["fleet_learned_per_s"] > 0 and t["fleet_applied_back_per_s"] > 0
    assert report["record_to_applied_elsewhere"]["n"] == 30
    for mode in ("always", "everysec"):
        for rule in ("reference", "routing"):
            p = report["publish"][mode][rule]
            assert p["one_per_call_per_s"] > 0 and p["64_per_call_per_s"] > 0 and p["64_per_call_one_per_entry_per_s"] > 0
            assert p["one_window_call"]["n"] == 128
    assert report["publish"]["always"]["reference"]["window_bytes"] == 64 + 8 * 256  # one row: the reference rule's
    # The routing rule's windows as the flusher sealed them: deltas of the route rows they touched (K = 8), no adapter.
    w = report["routing_throughput"]["stream"]
    assert w["windows"] > 0 and 1 <= w["signals_per_window"] <= 100 and 0 < w["route_rows_per_window"] <= 8
    assert w["bytes_per_window"] <= 64 + 4 * 256 * 8 + 4 * 8 + 16 and w["bytes_per_signal"] > 0
    for rule in ("reference", "routing"):
        s = report["stream"][rule]
        assert s["stream_bytes_per_window"] > s["window_bytes"] and s["replay_windows_per_s"] > 0
    outage = report["outage"]
    assert outage["max_outbox"] > 0 and outage["applied_signals"] == outage["recorded"]  # nothing lost by the outage


def test_bench_fleet_testbed_quick_reports_every_section():
    """bench_fleet.py --testbed --quick on the namespaced testbed (root; under CI=true never skipped)."""
    from test_testbed import _need

    from testbed import missing_redis, missing_requirements

    _need(missing_requirements())
    _need(missing_redis())
    done = run([sys.executable, str(ROOT / "scripts" / "bench_fleet.py"), "--testbed", "--quick", "--json"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)["testbed"]
    (latency,) = report["latency"].values()
    assert latency["n"] == 5 and latency["p99_us"] >= latency["median_us"] > 0
    (failover,) = report["failover"]
    assert failover["min_replicas"] == 1 and failover["no_flusher_exited"] and failover["replicas_agree"]
    assert failover["applied_signals"] == failover["committed"] and failover["lost_signals"] == 0  # nothing lost with it
    (egress,) = report["egress"]
    assert egress["hosts"] == 2 and egress["egress_bytes_per_signal"] > 0 and egress["signals"] > 0
