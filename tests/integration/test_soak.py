"""scripts/soak.py, short: worker recycling, random worker kills and flusher restarts, and the accounting balances."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from support import ROOT, popen


@pytest.mark.guarantee("committed-means-learned-once")
def test_short_soak_balances(name):
    proc = popen(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "3", "--json", "--name", name, "--recycle-after", "500"],
        deadline=300,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a hung soak is killed with every worker and flusher it started
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    report = json.loads(out)
    assert proc.returncode == 0 and report["balanced"], (report["checks"], err)
    assert report["worker_kills"] >= 1 and report["flusher_restarts"] >= 1 and report["workers_spawned"] > report["worker_kills"]
    assert report["learned"] >= report["returned_true"] > 0
