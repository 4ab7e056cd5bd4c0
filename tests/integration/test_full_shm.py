"""A full /dev/shm kills nobody: a 64 MiB /dev/shm (Docker's default) in a private mount namespace, filled to the last page.

Before segments were reserved at creation, the defaults (309 MiB) were created sparse
on it, and the flusher died of SIGBUS (exit 135) after ~5,400 trajectories, then again
on every restart, and producers on their next record: committed trajectories were lost.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from support import ROOT, run

ALLOWED = os.geteuid() == 0 and shutil.which("unshare") is not None
pytestmark = [
    pytest.mark.guarantee("no-process-dies-of-sigbus-on-a-full-dev-shm"),
    pytest.mark.skipif(
        not ALLOWED and os.environ.get("CI") != "true",
        reason="a private mount namespace with its own /dev/shm needs root and unshare (CI runs this as root)",
    ),
]


def test_a_full_64_mib_dev_shm_refuses_what_does_not_fit_and_kills_nobody(name):
    script = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {ROOT / 'tests' / 'full_shm.py'} {name}"
    done = run(["unshare", "-m", "sh", "-c", script], timeout=600)
    assert done.returncode == 0, done.stderr  # the script itself did not die of SIGBUS
    report = json.loads(done.stdout.splitlines()[-1])
    # The defaults do not fit, and the refusal says by how much and what does.
    assert report["refused_code"] == 1 and "needs 309.2 MiB" in report["refused"] and "/dev/shm has 64.0 MiB free" in report["refused"]
    assert report["options"] == ["--capacity", "2800", "--lane-slots", "64"]
    # Every page left was taken, then every lane and buffer page written: nothing died, nothing was lost.
    assert report["filler_bytes"] > 0 and report["lanes_taken"] == 32 and report["no_more_lanes"] == "NoFreeLaneError"
    assert report["recorded"] == report["learned"] == 2 * 32 * 64
    assert report["buffer_len"] == report["capacity"] == 2800 and report["buffer_dropped"] == report["learned"] - 2800
    assert report["flusher_code"] == 0, report["flusher_stderr"]
