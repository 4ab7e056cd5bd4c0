"""scripts/demo.py (what ./scripts/demo runs) end to end: counts match, nothing is left behind, even on Ctrl-C."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

from sona_shm.shm.segment import start_ticks

from support import ROOT, popen, run

DEMO = str(ROOT / "scripts" / "demo.py")
STARTED = re.compile(r"flusher pid (\d+); gunicorn pid (\d+) with .* \(pids ([\d, ]+)\)")


def started_pids(line: str) -> list[int]:
    match = STARTED.search(line)
    assert match, line
    return [int(match.group(1)), int(match.group(2)), *map(int, match.group(3).split(", "))]


def assert_all_gone(name: str, pids: list[int]) -> None:
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}") and not os.path.exists(f"/dev/shm/sem.sona_shm.{name}.bell")
    alive = [pid for pid in pids if start_ticks(pid)]  # each was reaped by its parent before the demo exited
    assert not alive, f"processes left behind: {alive}"


def test_the_demo_learns_exactly_what_gunicorn_accepted_and_cleans_up(name):
    command = [sys.executable, "-u", DEMO, "--seconds", "1", "--workers", "2", "--threads", "2", "--clients", "2", "--name", name]
    done = run(command, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "= exactly the feedback the server accepted" in done.stdout
    assert re.search(r"routing: held-out accuracy \d+\.\d% before learning, \d+\.\d% after \(300 queries", done.stdout)
    assert "trajectories_processed" in done.stdout and "flusher exit 0" in done.stdout
    assert "needs two reads" not in done.stdout and "(rates over the last" in done.stdout  # piped: the final table has its rates
    assert f"removed /sona_shm.{name}, /sona_shm.{name}.bell" in done.stdout
    assert_all_gone(name, started_pids(done.stdout))


def test_ctrl_c_stops_everything_and_removes_the_segment(name):
    proc = popen(
        [sys.executable, "-u", DEMO, "--seconds", "600", "--workers", "2", "--name", name],
        deadline=600,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while not STARTED.search(line):  # the demo serves traffic from here on
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready and proc.poll() is None, f"the demo did not start: {line}"
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C must not cut the clean-up short
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted; stopping everything" in out and "flusher exit 0" in out and f"removed /sona_shm.{name}" in out
    assert_all_gone(name, started_pids(line))
