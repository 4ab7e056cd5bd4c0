"""scripts/bench.py --quick runs end to end and reports every figure (never judged on time)."""

from __future__ import annotations

import json
import subprocess
import sys

from support import ROOT, env


def test_bench_quick_reports_every_operation():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", "--producers", "2", "--seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    for op in ("record T1", "record T4", "forward 1", "forward 32"):
        assert report[op]["calls"] > 0 and report[op]["median_us"] > 0 and report[op]["p99_us"] >= report[op]["median_us"]
    assert report["_engine"]["trajectories_processed"] > 0
