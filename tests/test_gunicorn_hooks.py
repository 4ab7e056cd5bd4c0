"""sona_shm.gunicorn without a real gunicorn: settings it exports, the accessor, each hook."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from gunicorn.config import Config

import sona_shm.gunicorn as hooks
from sona_shm import InvalidInputError, NoFreeLaneError, SegmentNotFoundError, Trajectory

from children import fork_child
from support import wait_for

H = 16


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _add(self, level: str, msg: str, *args: object) -> None:
        self.lines.append((level, msg % args))

    def info(self, msg: str, *args: object) -> None:
        self._add("info", msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self._add("warning", msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self._add("error", msg, *args)


@pytest.fixture
def server(monkeypatch, name):
    """A stand-in for gunicorn's Arbiter with SONA_SHM_NAME set; this process's client is closed after."""
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0")
    yield SimpleNamespace(log=FakeLog())
    hooks.close()


def test_as_a_config_module_it_sets_exactly_the_four_hooks():
    settings = set(Config().settings)
    assert {k for k in vars(hooks) if k in settings} == {"when_ready", "post_fork", "worker_exit", "child_exit"}


@pytest.mark.parametrize(
    "value, fragment",
    [(None, "SONA_SHM_NAME: expected the engine's name in the environment"), ("a/b", "SONA_SHM_NAME: name: expected 1-64 characters")],
)
def test_engine_name_errors_name_the_variable(monkeypatch, value, fragment):
    monkeypatch.delenv(hooks.ENV_NAME, raising=False)
    if value is not None:
        monkeypatch.setenv(hooks.ENV_NAME, value)
    with pytest.raises(InvalidInputError, match=fragment):
        hooks.engine_name()


@pytest.mark.parametrize("raw, got", [("soon", "'soon'"), ("-1", "-1.0"), ("nan", "nan"), ("inf", "inf")])
def test_attach_timeout_must_be_seconds(monkeypatch, raw, got):
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, raw)
    with pytest.raises(InvalidInputError, match=f"SONA_SHM_ATTACH_TIMEOUT: expected a finite number of seconds >= 0, got {got}$"):
        hooks.attach_timeout()


def test_attach_timeout_defaults_to_ten_seconds(monkeypatch):
    monkeypatch.delenv(hooks.ENV_ATTACH_TIMEOUT, raising=False)
    assert hooks.attach_timeout() == 10.0


def test_client_attaches_once_and_again_after_close(engine, server):
    engine(hidden_dim=H)
    first = hooks.client()
    assert hooks.client() is first and first.record(Trajectory(np.ones(H), [], 1.0))
    hooks.close()
    second = hooks.client()
    assert second is not first and first._segment is None and second.lane >= 0


def test_post_fork_claims_a_lane_and_says_which(engine, server, name):
    engine(hidden_dim=H)
    hooks.post_fork(server, SimpleNamespace(pid=os.getpid()))
    lane = hooks.client().lane
    assert server.log.lines == [("info", f"sona_shm: worker {os.getpid()} attached to engine {name!r}, lane {lane}")]


def test_post_fork_without_an_engine_fails_the_boot_with_the_reason(server, name):
    with pytest.raises(SegmentNotFoundError):
        hooks.post_fork(server, SimpleNamespace(pid=os.getpid()))
    level, line = server.log.lines[0]
    assert level == "error" and f"segment {name!r} does not exist" in line


def test_worker_exit_closes_only_in_the_worker_itself(engine, server, name):
    engine(hidden_dim=H)
    client = hooks.client()
    lane = client.lane
    hooks.worker_exit(server, SimpleNamespace(pid=os.getpid() + 1))  # gunicorn calls it in the master too
    assert hooks.client() is client
    hooks.worker_exit(server, SimpleNamespace(pid=os.getpid()))
    assert engine.attach().lane == lane  # the same process claims the same first free lane: it is free


def test_when_ready_gives_a_masters_lane_back(engine, server):
    engine(hidden_dim=H, lanes=1)
    assert hooks.client().lane == 0  # as if the preloaded app attached in the master
    hooks.when_ready(server)
    other = engine.attach()  # the only lane is free for a worker
    assert other.lane == 0
    assert server.log.lines == [("info", "sona_shm: the master attached while loading the app; it holds no lane, workers claim their own")]


def test_child_exit_confirms_a_dead_workers_lane_is_free(engine, children, server, name):
    flusher = engine(hidden_dim=H)
    read, write = os.pipe()

    def worker() -> None:  # attach, record two, die without closing anything
        client = hooks.client()
        client.record(Trajectory(np.ones(H), [], 1.0))
        client.record(Trajectory(np.ones(H), [], 1.0))
        os.write(write, str(client.lane).encode())

    pid = children.add(fork_child(worker, deadline=60))
    os.close(write)
    assert children.wait(pid) == 0
    lane = int(os.read(read, 16))
    os.close(read)
    hooks.child_exit(server, SimpleNamespace(pid=pid))
    flusher.scan()
    hooks.child_exit(server, SimpleNamespace(pid=pid))
    assert server.log.lines == [
        ("info", f"sona_shm: worker {pid} exited; lane {lane} of engine {name!r} is free for the next worker ({detail})")
        for detail in ("the flusher has 2 trajectories it committed still to learn", "all it committed is learned")
    ]


def test_child_exit_of_a_worker_whose_lane_was_already_reused(engine, server, name):
    engine(hidden_dim=H)
    hooks.child_exit(server, SimpleNamespace(pid=2**22 + 1))  # above pid_max: owns no lane
    assert server.log.lines == [
        ("info", f"sona_shm: worker {2**22 + 1} exited; no lane of engine {name!r} is registered to it any more (reused, or never claimed)")
    ]


def test_child_exit_without_an_engine_warns_and_carries_on(server, name):
    hooks.child_exit(server, SimpleNamespace(pid=12345))
    [(level, line)] = server.log.lines
    assert level == "warning" and f"cannot inspect engine {name!r} after worker 12345 exited" in line


def reloading(server: SimpleNamespace, *, keeps: int, forked: int, graceful_timeout: float) -> SimpleNamespace:
    """``server`` as a master that keeps ``keeps`` workers and had ``forked`` others when it forked this one."""
    server.WORKERS = {pid: SimpleNamespace(pid=pid) for pid in range(1000, 1000 + forked)}
    server.num_workers = keeps
    server.cfg = SimpleNamespace(graceful_timeout=graceful_timeout)
    return server


class Worker(SimpleNamespace):
    def notify(self) -> None:
        self.beats = getattr(self, "beats", 0) + 1


def test_retiring_workers_is_the_surplus_of_the_master_at_the_fork(server):
    assert hooks.retiring_workers(server) == 0  # not a gunicorn Arbiter: no surplus known
    assert hooks.retiring_workers(reloading(server, keeps=4, forked=3, graceful_timeout=30)) == 0  # the 4th of a first start
    assert hooks.retiring_workers(reloading(server, keeps=4, forked=4, graceful_timeout=30)) == 1  # a reload's first new worker
    assert hooks.retiring_workers(reloading(server, keeps=4, forked=7, graceful_timeout=30)) == 4  # its last


def test_post_fork_without_a_free_lane_fails_at_once_outside_a_reload(engine, server, name):
    engine(hidden_dim=H, lanes=1)
    holder = engine.attach()
    with pytest.raises(NoFreeLaneError, match="all 1 lanes are held by live processes"):
        hooks.post_fork(reloading(server, keeps=2, forked=1, graceful_timeout=30), Worker(pid=os.getpid()))
    assert [level for level, _ in server.log.lines] == ["error"]
    holder.close()


def test_post_fork_during_a_reload_waits_for_the_lane_an_old_worker_frees(engine, server, name):
    engine(hidden_dim=H, lanes=1)
    old_worker = engine.attach()  # the previous generation's worker holds the only lane
    waiting = threading.Event()

    def old_worker_exits() -> None:  # once the new worker says it waits (the master has just told the old one to stop)
        wait_for(lambda: any("waits up to" in line for _, line in server.log.lines), what="the new worker to wait")
        waiting.set()
        old_worker.close()

    exiting = threading.Thread(target=old_worker_exits)
    exiting.start()
    worker = Worker(pid=os.getpid())
    try:
        hooks.post_fork(reloading(server, keeps=1, forked=1, graceful_timeout=30), worker)
    finally:
        exiting.join(60)
    assert waiting.is_set() and worker.beats >= 1  # it heartbeats while it waits
    assert server.log.lines == [
        (
            "info",
            f"sona_shm: worker {os.getpid()} waits up to 30 s (graceful_timeout) for a lane of engine {name!r}: all are held, and "
            "the master is stopping 1 worker(s) of the previous generation (a reload)",
        ),
        ("info", f"sona_shm: worker {os.getpid()} attached to engine {name!r}, lane 0"),
    ]


def test_post_fork_during_a_reload_gives_up_after_the_graceful_timeout(engine, server, name):
    engine(hidden_dim=H, lanes=1)
    holder = engine.attach()  # an old worker that never exits
    with pytest.raises(NoFreeLaneError, match=r"waited 0 s, gunicorn's graceful_timeout, for the 1 worker\(s\) being replaced"):
        hooks.post_fork(reloading(server, keeps=1, forked=1, graceful_timeout=0), Worker(pid=os.getpid()))
    assert server.log.lines[-1][0] == "error" and "the lanes must cover the workers plus every other producer" in server.log.lines[-1][1]
    holder.close()
