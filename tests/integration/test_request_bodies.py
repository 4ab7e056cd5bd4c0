"""Request bodies of the example apps under real servers: chunked bodies are read up to the limit, never further.

examples/router_app.py under a real gunicorn and examples/fastapi_app.py under a real
uvicorn, next to a real flusher. A chunked body has no Content-Length to check before
reading, so each app must stop reading at ``MAX_BODY``: a flood gets its 413 while the
client is still sending (bytes sent stay within the limit plus the sockets' buffers)
and the worker's peak memory barely moves. A valid chunked feedback is accepted by both.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sona_shm.shm.segment import start_ticks
from sona_shm.stats import read
from sona_shm.supervise import child_setup

from children import child_pids, listening_socket, process_running, start_gunicorn, stop_gunicorn, wait_until_serving
from support import ROOT, app_feedback, env

pytestmark = pytest.mark.guarantee("a-request-body-is-read-only-up-to-its-limit")

H = 32
FLUSHER = ("--hidden-dim", str(H), "--max-steps", "4", "--attention-dim", "8", "--lanes", "4", "--lane-slots", "64", "--capacity", "64")
FLUSHER += ("--routes", str(ROOT / "tests" / "data" / "routes-h32.npz"))
MAX_BODY = 4 << 20  # examples/router_requests.py
#: What the flooding client offers: a body 128 times the limit.
FLOOD = 512 << 20
#: Generous bounds for a server that stops at the limit: the limit plus what loopback sockets buffer (a few MiB each way),
#: and the worker's peak memory; a server that reads the whole flood exceeds both by hundreds of MiB.
SENT_BOUND = 64 << 20
PEAK_GROWTH_BOUND = 64 << 20


class App:
    """One server process (gunicorn master, or uvicorn) of an example app, and the pid of the worker that serves."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker(self) -> int:
        workers = child_pids(self.proc.pid)
        return workers[0] if workers else self.proc.pid  # gunicorn: its one worker; uvicorn without --workers: itself


@pytest.fixture
def apps(procs, name, tmp_path):
    """``apps(kind)``: router_app under gunicorn (1 sync worker) or fastapi_app under uvicorn, serving engine ``name``."""
    procs.flusher(name, *FLUSHER)
    started: list[tuple[App, list[tuple[int, int]]]] = []

    def start(kind: str) -> App:
        sock = listening_socket()
        port = sock.getsockname()[1]
        log = tmp_path / f"{kind}.log"
        environment = {**env(), "SONA_SHM_NAME": name, "SONA_SHM_ATTACH_TIMEOUT": "30", "XDG_RUNTIME_DIR": str(tmp_path)}
        with open(log, "w") as out:
            try:
                if kind == "gunicorn":
                    argv = ("-c", "python:sona_shm.gunicorn", "--pythonpath", str(ROOT / "examples"), "--workers", "1")
                    proc = start_gunicorn("router_app:app", sock, *argv, stdout=out, stderr=out, env=environment)
                else:
                    fd = sock.fileno()
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "examples"), "--fd", str(fd), "fastapi_app:app"],
                        pass_fds=(fd,),
                        stdout=out,
                        stderr=out,
                        env=environment,
                        preexec_fn=child_setup(deadline=600),  # SIGKILL when the test process dies; SIGALRM at the deadline
                    )
            finally:
                sock.close()
        app = App(proc, port, log)
        started.append((app, []))
        try:
            wait_until_serving(port, proc, timeout=120)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n--- {kind} log ---\n{app.log()}") from None
        started[-1][1].extend((pid, start_ticks(pid)) for pid in [proc.pid, *child_pids(proc.pid)])
        return app

    yield start
    for app, pids in started:
        stop_gunicorn(app.proc)  # SIGTERM (uvicorn too), SIGKILL after 30 s; then any worker left, by pid and start time
        left = [pid for pid, ticks in pids if process_running(pid, ticks)]
        assert not left, f"server processes outlived the test: {left}"


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def chunked_flood(port: int, path: str, total: int) -> tuple[int, int, dict]:
    """POST up to ``total`` bytes as 1 MiB chunks, stopping the moment the server answers.

    Returns (body bytes sent, status, JSON answer). A server that reads the whole body
    answers only after all of it was sent (and the terminating chunk).
    """
    piece = 1 << 20
    chunk = b"%x\r\n" % piece + b" " * piece + b"\r\n"  # JSON whitespace: a body that is only too large
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        sent = 0
        pending = memoryview(b"")
        while True:
            if not pending:
                if sent >= total:
                    sock.sendall(b"0\r\n\r\n")
                    break
                pending = memoryview(chunk)
            readable, writable, _ = select.select([sock], [sock], [], 120)
            if readable:
                break  # the server answered (or closed) while the body was still coming
            assert writable, "the server neither read nor answered for 120 s"
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed on us: its answer, if any, is in our receive buffer
            sent += n
            pending = pending[n:]
        response = http.client.HTTPResponse(sock)
        response.begin()
        return sent, response.status, json.loads(response.read())
    finally:
        sock.close()


def chunked_post(port: int, path: str, body: bytes, pieces: int = 3) -> tuple[int, dict]:
    """POST ``body`` with ``Transfer-Encoding: chunked`` in ``pieces`` chunks (http.client frames them)."""
    step = max(1, -(-len(body) // pieces))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        parts = [body[i : i + step] for i in range(0, len(body), step)]
        conn.request("POST", path, body=iter(parts), headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_an_over_limit_chunked_body_gets_413_without_being_read(apps, name, kind):
    app = apps(kind)
    worker = app.worker()
    before = peak_rss(worker)
    sent, status, answer = chunked_flood(app.port, "/feedback", FLOOD)
    growth = peak_rss(worker) - before
    print(f"{kind}: {sent / 2**20:.1f} MiB sent before the answer; worker peak RSS {before / 2**20:.1f} MiB, grew {growth / 2**20:.1f} MiB")
    assert status == 413, (status, answer)
    assert MAX_BODY < sent < SENT_BOUND  # the client got its answer while it was still sending
    assert growth < PEAK_GROWTH_BOUND
    assert answer == {"error": f"body: expected at most {MAX_BODY} bytes, got more (a chunked body, not read past the limit)"}
    assert app.worker() == worker  # the same worker serves on
    status, answer = chunked_post(app.port, "/feedback", json.dumps(app_feedback(H)).encode())
    assert (status, answer) == (200, {"accepted": True})
    assert read(name).recorded == 1  # the refused body recorded nothing


def test_a_valid_chunked_feedback_is_accepted_by_both_apps(apps, name):
    bodies = [
        json.dumps({"embedding": [1] * H, "route": "code", "reward": 1}, separators=(",", ":")).encode(),  # a bandit feedback
        json.dumps(app_feedback(H)).encode(),
    ]
    servers = [apps("gunicorn"), apps("uvicorn")]
    for app in servers:
        for body in bodies:
            for pieces in (1, 3, len(body)):  # one chunk, a few, and one byte per chunk
                assert chunked_post(app.port, "/feedback", body, pieces) == (200, {"accepted": True}), app.log()
        status, answer = chunked_post(app.port, "/route", json.dumps({"embedding": [0.5] * H}).encode())
        assert status == 200 and answer["route"] in ("code", "math", "chat", "search")
    assert read(name).recorded == 2 * len(bodies) * 3  # record() published each before its answer went out
    status, answer = chunked_post(servers[0].port, "/route", b"", 1)  # a chunked body with no data: both say it is empty
    assert (
        (status, answer)
        == chunked_post(servers[1].port, "/route", b"", 1)
        == (400, {"error": "body: expected a JSON object, got an empty body"})
    )
