"""Fixtures: scratch engine names that are always unlinked, and processes always killed."""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import signal
import subprocess

import pytest

from sona_shm.engine.client import attach
from sona_shm.engine.flusher import Flusher
from sona_shm.errors import SegmentNotFoundError
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig
from sona_shm.stats import read_stats

from support import env, popen, python_cmd, wait_for

#: Seconds a process a test starts may live (the kernel ends it then, and when the test process dies).
PROCESS_DEADLINE = 600

_PREFIX = f"t{os.getpid()}-"
_counter = itertools.count()


def _leftovers() -> list[str]:
    return sorted(p for p in os.listdir("/dev/shm") if _PREFIX in p)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments():
    """Fail the run if any test left a segment or semaphore of ours in /dev/shm."""
    yield
    left = _leftovers()
    for entry in left:
        name = entry.split("sona_shm.", 1)[-1].removesuffix(".bell")
        segment.unlink(name)
    assert not left, f"tests leaked shared-memory objects: {left}"


@pytest.fixture
def name():
    """A fresh engine name; its segment and doorbell are removed after the test."""
    engine = f"{_PREFIX}{next(_counter)}"
    yield engine
    segment.unlink(engine)


class Processes:
    """Subprocesses of one test; every one is killed by pid at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, extra_env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        if extra_env:
            kwargs["env"] = {**env(), **extra_env}
        proc = popen(python_cmd(*args), deadline=PROCESS_DEADLINE, **kwargs)
        self.procs.append(proc)
        return proc

    def flusher(self, engine: str, *options: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``sona-shm flusher`` and wait until it owns the segment."""
        proc = self.start("-m", "sona_shm", "flusher", "--name", engine, "--quiet", *options, extra_env=extra_env)

        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"flusher exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                return read_stats(engine)["flusher"]["alive"]
            except SegmentNotFoundError:
                return False

        wait_for(ready, what=f"flusher of {engine}")
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()


@pytest.fixture
def procs():
    p = Processes()
    yield p
    p.kill_all()


class Children:
    """Processes this test forked (``tests/faults.py``); the ones not yet reaped are killed at teardown.

    Only unreaped children are signalled: an unreaped pid cannot have been reused.
    """

    def __init__(self) -> None:
        self.live: set[int] = set()

    def add(self, pid: int) -> int:
        self.live.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        """Reap ``pid``; its exit code (negative: killed by that signal)."""
        _, status = os.waitpid(pid, 0)
        self.live.discard(pid)
        return os.waitstatus_to_exitcode(status)

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.wait(pid)

    def wait_stopped(self, pid: int) -> None:
        """Wait until ``pid`` stopped itself (SIGSTOP); fail if it exited instead."""
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            self.live.discard(pid)
            raise AssertionError(f"child {pid} exited ({os.waitstatus_to_exitcode(status)}) instead of stopping")

    def kill_all(self) -> None:
        for pid in list(self.live):
            self.kill(pid)


@pytest.fixture
def children():
    c = Children()
    yield c
    c.kill_all()


#: A small engine: fast to create, easy to fill.
SMALL = dict(hidden_dim=16, rank=2, lr=0.01, flush_threshold=10, capacity=64, max_steps=4, attention_dim=8, lanes=4, lane_slots=32)


@pytest.fixture
def engine(name):
    """``engine(routes=None, **config)``: an in-process Flusher on ``name`` that the test drives with ``scan()``.

    Also returns clients through ``engine.attach()``; everything is closed at teardown.
    """
    flushers: list[Flusher] = []
    clients = []

    def make(routes=None, options=None, **config) -> Flusher:
        """``options``: more keyword arguments of :class:`Flusher` (checkpoint, checkpoint_keep, guard, ...)."""
        if routes is not None:
            config.setdefault("routes", len(routes))
        flusher = Flusher(name, config=EngineConfig(**{**SMALL, **config}), routes=routes, **(options or {}))
        flushers.append(flusher)
        return flusher

    def attach_client(**kwargs):
        client = attach(name, **kwargs)
        clients.append(client)
        return client

    make.attach = attach_client
    yield make
    for client in clients:
        client.close()
    for flusher in flushers:
        flusher.close()


@pytest.fixture
def names():
    """``names(k)``: ``k`` fresh engine names (a test of several engines); all removed after the test."""
    made: list[str] = []

    def make(k: int = 1) -> list[str]:
        new = [f"{_PREFIX}{next(_counter)}" for _ in range(k)]
        made.extend(new)
        return new

    yield make
    for engine in made:
        segment.unlink(engine)


def need_redis() -> None:
    """Skip (or, under CI=true, fail) a test that needs redis-server and redis-py when they are missing."""
    found = (("redis-server", shutil.which("redis-server")), ("redis-py", importlib.util.find_spec("redis")))
    missing = [what for what, ok in found if not ok]
    if missing:
        how = "Debian: apt-get install redis-server (./scripts/test does it as root); pip install 'sona-shm[fleet]'"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{' and '.join(missing)} missing under CI=true; {how}")
        pytest.skip(f"{' and '.join(missing)} not installed ({how})")


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test on a free loopback port (AOF, appendfsync always, in tmp_path); killed by pid after it."""
    need_redis()
    from children import RedisServer

    server = RedisServer(str(tmp_path)).start()
    yield server
    server.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``): fixtures may show more when a test failed."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())
