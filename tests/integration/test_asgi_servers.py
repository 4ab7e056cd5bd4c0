"""examples/fastapi_app.py under a real `uvicorn --workers 2` and a real gunicorn with UvicornWorker, next to a real flusher.

Each test drives HTTP traffic, SIGKILLs one worker, waits for its replacement, drives
more, and checks through the engine's stats that every feedback the servers accepted
was learned exactly once.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sona_shm.shm.segment import start_ticks
from sona_shm.stats import read
from sona_shm.supervise import child_setup

from children import descendant_pids
from support import ROOT, app_feedback_body, env, fan_out, wait_for

pytestmark = pytest.mark.guarantee("under-gunicorn-and-uvicorn")

H = 32
#: A small engine with the example apps' four routes (tests/data/routes-h32.npz, support.route_table(32)).
FLUSHER = ("--hidden-dim", str(H), "--lr", "0.05", "--max-steps", "4", "--attention-dim", "8", "--flush-threshold", "50", "--lanes", "6")
FLUSHER += ("--routes", str(ROOT / "tests" / "data" / "routes-h32.npz"))
MALFORMED = [b'{"embedding": [NaN]}', b'{"embedding": [1, 2, 3]}', b"{not json"]
GOOD = np.random.default_rng(7).standard_normal(H)
#: Seconds a server may take to start serving on a loaded 2-core machine.
START_TIMEOUT = 120
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()


@pytest.fixture
def serve(name, tmp_path):
    """``serve(kind)`` starts fastapi_app under ``uvicorn`` or ``gunicorn`` with 2 workers and waits until both attached."""
    servers: list[tuple[Server, list[tuple[int, int]]]] = []

    def start(kind: str) -> Server:
        log = tmp_path / f"{kind}.log"
        environment = {**env(), "SONA_SHM_NAME": name, "SONA_SHM_ATTACH_TIMEOUT": "30", "XDG_RUNTIME_DIR": str(tmp_path)}
        # Workers die with their master, the master with this test (die_with_parent/, die_with_master_conf.py).
        environment["PYTHONPATH"] = os.pathsep.join([str(ROOT / "examples"), str(HERE / "die_with_parent"), environment["PYTHONPATH"]])
        environment["SONA_SHM_TEST_DIE_WITH_PARENT"] = "1"
        for _attempt in range(3):  # a free port can be taken by another process before the server binds it
            port = _free_port()
            if kind == "uvicorn":
                argv = ["-m", "uvicorn", "--app-dir", str(ROOT / "examples"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
            else:  # "gunicorn-hooks": the README's gunicorn hooks too, so post_fork attaches before the lifespan
                conf = "hooks_die_with_master_conf.py" if kind == "gunicorn-hooks" else "die_with_master_conf.py"
                argv = ["-m", "gunicorn", "-c", str(HERE / conf), "-k", "uvicorn.workers.UvicornWorker"]
                argv += ["--workers", "2", "--bind", f"127.0.0.1:{port}"]
                argv += ["--pythonpath", str(ROOT / "examples"), "--graceful-timeout", "5"]
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [sys.executable, *argv, "fastapi_app:app"],
                    stdout=out,
                    stderr=out,
                    env=environment,
                    preexec_fn=child_setup(deadline=600),  # SIGKILL when the test process dies; SIGALRM at the deadline
                )
            server = Server(proc, port, log)
            servers.append((server, []))
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if read(name).lanes_live >= 2 and server.request("GET", "/healthz")[0] == 200:
                        servers[-1][1].extend((pid, start_ticks(pid)) for pid in descendant_pids(proc.pid))
                        return server
                except OSError:
                    pass  # not accepting yet
                time.sleep(0.05)
            if proc.poll() is None or "address already in use" not in server.log().lower():
                break
        raise AssertionError(f"{kind} did not serve with two attached workers within {START_TIMEOUT} s\n--- log ---\n{server.log()}")

    yield start
    for server, known in servers:
        workers = known + [(pid, start_ticks(pid)) for pid in descendant_pids(server.proc.pid)]
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        for pid, ticks in workers:  # whatever outlived its master, by pid and start time
            if ticks and start_ticks(pid) == ticks:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def feedback_body(i: int) -> bytes:
    return app_feedback_body(i, H, GOOD)


def drive(server: Server, count: int, *, start: int = 0, threads: int = 2) -> Counter:
    """``count`` requests: feedback mostly, some routes, some malformed; anything unexpected fails the test."""

    def request(i: int) -> str:
        if i % 10 == 0:
            status, answer = server.request("POST", "/route" if i % 20 else "/feedback", MALFORMED[i // 10 % len(MALFORMED)])
            assert status == 400 and answer["error"], (status, answer)
            return "malformed"
        if i % 10 == 1:
            status, answer = server.request("POST", "/route", json.dumps({"embedding": [0.5] * H}).encode())
            assert status == 200 and len(answer["embedding"]) == H, (status, answer)
            return "routed"
        status, answer = server.request("POST", "/feedback", feedback_body(i))
        assert status == 200, (status, answer)
        return "accepted" if answer["accepted"] else "refused"

    return fan_out(request, count, threads=threads, start=start)


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn", "gunicorn-hooks"])
def test_every_accepted_feedback_is_learned_once_across_a_killed_worker(procs, serve, name, kind):
    """With gunicorn-hooks every worker attaches in post_fork and again in the app's lifespan: one lane each."""
    procs.flusher(name, *FLUSHER)
    server = serve(kind)
    probe = [0.5] * H
    status, before = server.request("POST", "/route", json.dumps({"embedding": probe}).encode())
    assert status == 200 and before["embedding"] == probe  # nothing learned yet: the adapter is zero

    first = drive(server, 400)
    workers = sorted(lane.pid for lane in read(name).lanes if lane.alive)
    assert len(workers) == 2 and set(workers) <= set(descendant_pids(server.proc.pid))  # one lane per worker
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)  # mid-service, between requests: nothing of it is in flight
    wait_for(
        lambda: (s := read(name)).lanes_live == 2 and victim not in [lane.pid for lane in s.lanes if lane.alive],
        timeout=START_TIMEOUT,
        what=f"a replacement for the killed {kind} worker",
    )
    second = drive(server, 400, start=400)
    accepted, refused = first["accepted"] + second["accepted"], first["refused"] + second["refused"]
    assert first["malformed"] + second["malformed"] == 80 and accepted > 500

    status, answer = server.request("POST", "/flush")  # awaits engine.flush(): the flusher learned what this worker committed
    assert status == 200 and answer == {"flushed": True}
    wait_for(
        lambda: (s := read(name)).trajectories_processed >= accepted and s.pending_signals == 0,
        timeout=120,
        what=f"{accepted} trajectories learned and flushed",
    )
    stats = read(name)
    assert stats.recorded == stats.trajectories_processed == accepted  # every accepted feedback learned, exactly once
    assert stats.lane_dropped == refused and stats.backlog == 0
    assert sum(lane.learned for lane in stats.lanes) == accepted

    status, after = server.request("POST", "/route", json.dumps({"embedding": probe}).encode())
    assert status == 200 and after["embedding"] != probe  # the workers apply what was learned
    metrics = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
    finally:
        metrics.close()
    assert f'sona_shm_trajectories_processed_total{{engine="{name}"}} {float(accepted)}' in text
