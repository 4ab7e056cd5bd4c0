"""scripts/soak.py, short: worker recycling, random worker kills and flusher restarts, and the accounting balances."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import need_redis
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


@pytest.mark.guarantee("many-hosts-learn-one-adapter")
def test_short_fleet_soak_balances(name):
    """Three engines as one fleet: worker and flusher kills, redis-server kill -9s, and the fleet-wide accounting."""
    need_redis()
    proc = popen(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "4", "--json", "--name", name, "--recycle-after", "500"]
        + ["--fleet", "3", "--redis-kill-every", "1.5"],
        deadline=300,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    report = json.loads(out)
    assert proc.returncode == 0 and report["balanced"], (report["checks"], err[-3000:])
    assert report["engines"] == 3 and report["redis_kills"] >= 1 and report["flusher_restarts"] >= 1
    assert report["fleet_applied_signals"] == [report["learned"]] * 3 and report["learned"] >= report["returned_true"] > 0


@pytest.mark.guarantee("many-hosts-learn-one-adapter")
def test_short_fleet_soak_with_sentinel_failovers_and_evictions_balances(name):
    """Three engines following a primary through three Sentinels: a failover (kill -9 of the primary) and fleet keys
    deleted as evictions would, besides the worker and flusher kills; what they lose is counted alike everywhere."""
    need_redis()
    if shutil.which("redis-sentinel") is None:
        need_sentinel()
    proc = popen(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "8", "--json", "--name", name, "--recycle-after", "500"]
        + ["--fleet", "3", "--sentinel", "--failover-every", "2", "--evict-every", "2"],
        deadline=300,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    report = json.loads(out)
    assert proc.returncode == 0 and report["balanced"], (report["checks"], err[-3000:])
    assert report["failovers"] >= 1 and report["evictions"] >= 1
    applied = [a + lost for a, lost in zip(report["fleet_applied_signals"], report["fleet_lost_signals"], strict=True)]
    assert applied == [report["learned"]] * 3 and len(set(report["fleet_lost_signals"])) == 1


def need_sentinel() -> None:
    if os.environ.get("CI") == "true":
        pytest.fail("redis-sentinel missing under CI=true (Debian: apt-get install redis-sentinel; ./scripts/test does it as root)")
    pytest.skip("redis-sentinel is not installed (Debian: apt-get install redis-sentinel)")
