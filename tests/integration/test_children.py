"""Every process the scripts and tests start dies with its parent and has a deadline."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from sona_shm.errors import SegmentNotFoundError
from sona_shm.shm.segment import start_ticks, unlink
from sona_shm.stats import read_stats

from children import descendant_pids, fork_child, process_running
from support import ROOT, popen, wait_for

pytestmark = pytest.mark.guarantee("children-die-with-the-test-or-script-that-started-them")


def descendants(pid: int) -> list[tuple[int, int]]:
    """``(pid, start ticks)`` of every live descendant of ``pid``."""
    return [(child, start_ticks(child)) for child in descendant_pids(pid)]


def test_a_forked_child_dies_with_its_parent(children, tmp_path):
    pid_file = tmp_path / "grandchild"

    def parent() -> None:
        grandchild = fork_child(signal.pause)
        pid_file.write_text(f"{grandchild} {start_ticks(grandchild)}")
        signal.pause()  # until the test kills this process

    pid = children.add(fork_child(parent, deadline=120))
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the grandchild's pid")
    grandchild, ticks = map(int, pid_file.read_text().split())
    assert process_running(grandchild, ticks)
    children.kill(pid)  # SIGKILL: no clean-up of its own ran
    wait_for(lambda: not process_running(grandchild, ticks), what="the grandchild to die with its parent")


def test_a_forked_child_ends_at_its_deadline(children):
    pid = children.add(fork_child(signal.pause, deadline=1))
    assert children.wait(pid) == -signal.SIGALRM


def test_what_the_bench_started_dies_with_it():
    """The freshness section's watcher once outlived a killed bench at 100% CPU (and its flusher slept on)."""
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--json", "--skip", "throughput,buffer,latency,learning"]
    bench = popen(command, deadline=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = f"bench-{bench.pid}-fresh"
    try:

        def watching() -> bool:
            try:
                return read_stats(engine)["lanes_live"] >= 1  # the watcher attached: it polls from now on
            except SegmentNotFoundError:
                return False

        wait_for(watching, timeout=120, what="the bench's freshness watcher")
        seen = descendants(bench.pid)
        assert len(seen) >= 2  # its flusher and its watcher at least
        bench.kill()
        bench.wait()
        wait_for(lambda: not [p for p, t in seen if process_running(p, t)], timeout=60, what="the bench's children to die with it")
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        unlink(engine)  # killed, the bench could not remove its engine
