"""A real gunicorn serving examples/router_app.py next to a real flusher, driven over HTTP.

Every test counts the feedback the server accepted and checks, through the monitor's
JSON, that exactly that many trajectories were learned: not one lost, not one twice.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sona_shm.engine.client import attach
from sona_shm.shm.ledger import Ledger
from sona_shm.shm.segment import Segment, start_ticks
from sona_shm.stats import read_stats

from children import child_pids, listening_socket, process_running, start_gunicorn, stop_gunicorn, wait_until_serving
from support import ROOT, app_feedback_body, env, fan_out, run, wait_for

pytestmark = pytest.mark.guarantee("under-gunicorn-and-uvicorn")

H = 32
APP_PATH = f"{ROOT / 'examples'},{Path(__file__).resolve().parent}"
#: A small engine; lr 0.05 so that a few thousand feedbacks move the adapter far beyond float noise.
FLUSHER = (
    *("--hidden-dim", str(H), "--lr", "0.05", "--max-steps", "4", "--attention-dim", "8"),
    *("--flush-threshold", "50", "--flush-interval", "0.2"),
    *("--routes", str(ROOT / "tests" / "data" / "routes-h32.npz")),  # the example apps' four routes (support.route_table(32))
)
#: Bodies the server must refuse with a 400 (and record nothing).
MALFORMED = [
    b'{"embedding": [NaN]}',
    b'{"embedding": [1, 2, 3]}',
    b"{not json",
    json.dumps({"embedding": [0.0] * H, "steps": [{"activations": [1.0], "reward": "high"}], "quality": 1}).encode(),
    json.dumps({"embedding": [0.0] * H, "steps": [], "quality": 1, "qualty": 2}).encode(),
]


class Server:
    """One gunicorn master on a loopback port, its log in a file."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def route(self, embedding: np.ndarray) -> np.ndarray:
        status, answer = self.request("POST", "/route", json.dumps({"embedding": embedding.tolist()}).encode())
        assert status == 200, answer
        return np.array(answer["embedding"], np.float32)


@pytest.fixture
def serve(name, tmp_path):
    """``serve(*gunicorn_options, config=..., app=...)`` starts a gunicorn for engine ``name`` and waits until it serves."""
    servers: list[Server] = []

    def start(*options: str, config: str = "python:sona_shm.gunicorn", app: str = "router_app:app") -> Server:
        sock = listening_socket()
        port = sock.getsockname()[1]
        log = tmp_path / f"gunicorn-{len(servers)}.log"
        # XDG_RUNTIME_DIR: gunicorn >= 25 puts its control socket there instead of ~/.gunicorn.
        environment = {**env(), "SONA_SHM_NAME": name, "SONA_SHM_ATTACH_TIMEOUT": "30", "XDG_RUNTIME_DIR": str(tmp_path)}
        with open(log, "w") as out:
            try:
                argv = ("-c", config, "--pythonpath", APP_PATH, "--log-level", "info", *options)
                proc = start_gunicorn(app, sock, *argv, stdout=out, stderr=out, env=environment)
            finally:
                sock.close()  # gunicorn has its own copy; ours would keep accepting if it died
        server = Server(proc, port, log)
        servers.append(server)
        try:
            wait_until_serving(port, proc, timeout=60)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n--- gunicorn log ---\n{server.log()}") from None
        return server

    yield start
    for server in servers:
        workers = [(pid, start_ticks(pid)) for pid in child_pids(server.proc.pid)]
        stop_gunicorn(server.proc)  # SIGTERM, SIGKILL after 30 s; workers still there then are SIGKILLed by pid
        left = [pid for pid, ticks in workers if process_running(pid, ticks)]
        assert not left, f"gunicorn workers outlived their master: {left}"


#: The direction good steps point along: consistent feedback moves the adapter measurably.
GOOD = np.random.default_rng(7).standard_normal(H)


def feedback_body(i: int) -> bytes:
    """Feedback ``i``: a good step along GOOD and a bad one against it, in random order."""
    return app_feedback_body(i, H, GOOD, shuffle=True)


def drive(server: Server, count: int, *, threads: int = 4, start: int = 0) -> Counter:
    """``count`` requests from ``threads`` client threads: mostly feedback, some routes, some malformed.

    Returns how many feedbacks were accepted and refused (lane full), routes answered
    and malformed bodies refused with a 400. Anything else fails the test.
    """

    def request(i: int) -> str:
        if i % 20 == 0:
            status, answer = server.request("POST", "/feedback" if i % 40 else "/route", MALFORMED[i // 20 % len(MALFORMED)])
            assert status == 400 and answer["error"], (status, answer)
            return "malformed"
        if i % 20 in (1, 2):
            assert server.route(np.random.default_rng(i).standard_normal(H).astype(np.float32)).shape == (H,)
            return "routed"
        status, answer = server.request("POST", "/feedback", feedback_body(i))
        assert status == 200, (status, answer)
        return "accepted" if answer["accepted"] else "refused"

    return fan_out(request, count, threads=threads, start=start)


def monitor_json(name: str) -> dict:
    """What ``sona-shm stats --json`` prints (and asserts it found a live flusher)."""
    command = [sys.executable, "-m", "sona_shm", "stats", "--name", name, "--json"]
    done = run(command, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def learned_exactly(name: str, accepted: int, refused: int) -> dict:
    """Wait until the flusher learned and flushed everything, then check the counts exactly."""
    assert read_stats(name)["recorded"] == accepted  # record() published each before its response went out
    wait_for(
        lambda: (s := read_stats(name))["trajectories_processed"] >= accepted and s["pending_signals"] == 0,
        timeout=60,
        what=f"{accepted} trajectories learned and flushed",
    )
    stats = monitor_json(name)
    assert stats["trajectories_processed"] == stats["recorded"] == accepted
    assert sum(lane["learned"] for lane in stats["lanes"]) == accepted and stats["backlog"] == 0
    assert stats["lane_dropped"] == refused
    assert stats["updates_applied"] == stats["signals_accumulated"] and stats["flushes_performed"] > 0
    return stats


def adapted(name: str, x: np.ndarray) -> np.ndarray:
    """``forward(x)`` computed from the weights the flusher published (read-only, no client)."""
    segment = Segment.open(name, writable=False)
    ledger = Ledger(segment)
    try:
        down, up = ledger.read("down", "up")
        return x + (x @ down.T) @ (up / np.float32(math.sqrt(segment.layout.rank)))
    finally:
        ledger.close()
        segment.close()


@pytest.mark.parametrize(
    "options",
    [
        ("--worker-class", "sync", "--workers", "3"),
        ("--worker-class", "gthread", "--workers", "2", "--threads", "4"),
    ],
    ids=["sync", "gthread"],
)
def test_every_accepted_feedback_is_learned_once_and_routes_change(procs, serve, name, options):
    procs.flusher(name, *FLUSHER, "--lanes", "8")
    server = serve(*options)
    probe = np.random.default_rng(99).standard_normal(H).astype(np.float32)
    np.testing.assert_array_equal(server.route(probe), probe)  # nothing learned: the adapter is zero

    counts = drive(server, 2400)
    assert counts["accepted"] > 2000 and counts["malformed"] == 120 and counts["routed"] == 240
    stats = learned_exactly(name, counts["accepted"], counts["refused"])
    assert stats["lanes_live"] == int(options[options.index("--workers") + 1])

    expected = adapted(name, probe)
    assert np.linalg.norm(expected - probe) > 1e-2
    for _ in range(12):  # several requests, so several workers answer: all apply the newest weights
        np.testing.assert_allclose(server.route(probe), expected, atol=1e-5)


def test_recycling_workers_with_max_requests_keeps_counts_and_reuses_lanes(procs, serve, name):
    procs.flusher(name, *FLUSHER, "--lanes", "4")
    server = serve("--worker-class", "sync", "--workers", "2", "--max-requests", "40", "--max-requests-jitter", "0")
    counts = drive(server, 1200, threads=2)
    stats = learned_exactly(name, counts["accepted"], counts["refused"])
    claims = sum(lane["claims"] for lane in stats["lanes"])
    assert claims >= 1200 // 40  # at least 30 workers came and went through 4 lanes
    wait_for(lambda: read_stats(name)["lanes_live"] == 2, what="two live workers")
    claims = sum(lane["claims"] for lane in read_stats(name)["lanes"])
    # child_exit ran for every worker that exited and never found a lane still locked.
    wait_for(lambda: len(re.findall(r"sona_shm: worker \d+ exited", server.log())) == claims - 2, what="child_exit of every exited worker")
    log = server.log()
    assert log.count("is free for the next worker") > 0
    assert "still locked" not in log and "cannot attach" not in log and "Worker failed to boot" not in log


def test_a_sigkilled_worker_loses_nothing_and_its_lane_is_reused(procs, serve, name):
    procs.flusher(name, *FLUSHER, "--lanes", "4")
    server = serve("--worker-class", "sync", "--workers", "2")
    first = drive(server, 400, threads=2)
    victim = child_pids(server.proc.pid)[0]
    lane = next(lane["lane"] for lane in read_stats(name)["lanes"] if lane["pid"] == victim)
    os.kill(victim, signal.SIGKILL)  # what gunicorn does to a worker past its timeout (worker_exit never runs)
    line = wait_for(
        lambda: next((ln for ln in server.log().splitlines() if f"worker {victim} exited; lane {lane} " in ln), None),
        what="child_exit to report the killed worker's lane",
    )
    assert "is free for the next worker" in line
    wait_for(lambda: read_stats(name)["lanes_live"] == 2, what="a replacement worker")
    second = drive(server, 400, threads=2, start=400)
    stats = learned_exactly(name, first["accepted"] + second["accepted"], first["refused"] + second["refused"])
    assert len(stats["lanes"]) <= 3  # two workers and one replacement: the dead worker's lane was reused or is free
    assert stats["lanes"][[lane["lane"] for lane in stats["lanes"]].index(lane)]["pid"] != victim or not any(
        row["alive"] for row in stats["lanes"] if row["lane"] == lane
    )


def test_preload_app_master_holds_no_lane(procs, serve, name):
    procs.flusher(name, *FLUSHER, "--lanes", "4")
    config = str(ROOT / "examples" / "gunicorn.conf.py")
    server = serve("--workers", "2", "--threads", "2", "--preload", config=config, app="preloaded_app:app")
    assert "the master attached while loading the app; it holds no lane" in server.log()
    wait_for(lambda: read_stats(name)["lanes_live"] == 2, what="two workers, each on its own lane")
    counts = drive(server, 400, threads=2)
    learned_exactly(name, counts["accepted"], counts["refused"])
    lanes = read_stats(name)["lanes"]
    assert server.proc.pid not in [lane["pid"] for lane in lanes if lane["alive"]]


class Load:
    """Client threads sending feedback without pause until stopped; every answer is counted, any other outcome recorded."""

    def __init__(self, server: Server, threads: int) -> None:
        self.server = server
        self.stop = threading.Event()
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self._guard = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k, threads)) for k in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, k: int, step: int) -> None:
        i = 100_000 + k  # bodies other tests do not send
        while not self.stop.is_set():
            try:
                status, answer = self.server.request("POST", "/feedback", feedback_body(i))
                outcome = ("accepted" if answer["accepted"] else "refused") if status == 200 else f"status {status}: {answer}"
            except (OSError, http.client.HTTPException) as exc:  # refused, reset: the server stopped serving
                outcome = f"{type(exc).__name__}: {exc}"
            with self._guard:
                if outcome in ("accepted", "refused"):
                    self.counts[outcome] += 1
                else:
                    self.errors.append(outcome)
            i += step

    def accepted(self) -> int:
        with self._guard:
            return self.counts["accepted"]

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(120)
        assert not any(t.is_alive() for t in self._threads)


@pytest.mark.guarantee("a-reload-never-stops-gunicorn")
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_a_reload_under_load_with_workers_at_75_percent_of_the_lanes_keeps_serving(procs, serve, name, worker_class):
    """``kill -HUP`` forks 6 new workers while the 6 old ones hold 6 of the 8 lanes and another producer the other 2.

    Lanes = workers + other producers, the README's rule: each new worker must wait for a
    lane an old one frees. Before the fix they failed to boot and gunicorn exited 3 in the
    middle of the traffic.
    """
    procs.flusher(name, *FLUSHER, "--lanes", "8")
    threads = ("--threads", "2") if worker_class == "gthread" else ()
    server = serve("--worker-class", worker_class, "--workers", "6", *threads, "--graceful-timeout", "60")
    wait_for(lambda: read_stats(name)["lanes_live"] == 6, what="six attached workers")
    old = set(child_pids(server.proc.pid))
    assert len(old) == 6
    others = [attach(name), attach(name)]  # another producer's two lanes (a consumer job, a batch scorer)

    load = Load(server, threads=4)
    try:
        wait_for(lambda: load.accepted() >= 200 or load.errors, timeout=120, what="traffic before the reload")
        os.kill(server.proc.pid, signal.SIGHUP)  # the routine reload

        def replaced() -> bool:
            live = {lane["pid"] for lane in read_stats(name)["lanes"] if lane["alive"]} - {os.getpid()}
            workers = set(child_pids(server.proc.pid))
            return (len(live) == 6 and not live & old and live == workers) or server.proc.poll() is not None or bool(load.errors)

        wait_for(replaced, timeout=180, what="the new generation of workers holding the lanes")
        after = load.accepted()
        wait_for(lambda: load.accepted() >= after + 200 or load.errors, timeout=120, what="traffic after the reload")
    finally:
        load.join()
        for other in others:
            other.close()

    log = server.log()
    assert server.proc.poll() is None, f"gunicorn exited with {server.proc.returncode}\n{log}"
    assert not load.errors, load.errors[:5]
    assert "Worker failed to boot" not in log and "cannot attach" not in log
    waited = re.findall(r"sona_shm: worker \d+ waits up to 60 s \(graceful_timeout\) for a lane", log)
    assert waited, log  # the case of the bug: some new workers found every lane held
    assert len(re.findall(r"sona_shm: worker \d+ attached to engine", log)) == 12  # 6 at start, 6 after the reload
    stats = learned_exactly(name, load.counts["accepted"], load.counts["refused"])
    print(
        f"{worker_class}: {load.counts['accepted']} feedbacks accepted, {load.counts['refused']} refused (lane full), "
        f"{stats['trajectories_processed']} learned; {len(waited)} new workers waited for a lane; no request failed"
    )
