"""gunicorn server hooks that give every worker its own sona_shm client, and the accessor apps use.

Use it as the whole configuration::

    SONA_SHM_NAME=router gunicorn -c python:sona_shm.gunicorn --workers 4 app:app

or import the hooks into your own ``gunicorn.conf.py`` (every hook you define yourself
must call ours; see ``examples/gunicorn.conf.py``)::

    from sona_shm.gunicorn import child_exit, post_fork, when_ready, worker_exit
    raw_env = ["SONA_SHM_NAME=router"]

In the app, call :func:`client` where you need the client (it is cheap: after the first
call it returns the same object)::

    import sona_shm.gunicorn
    adapted = sona_shm.gunicorn.client().forward(embedding)

The engine is named by the environment variable ``SONA_SHM_NAME`` (gunicorn's
``raw_env``/``-e`` sets it in the master before any worker forks);
``SONA_SHM_ATTACH_TIMEOUT`` (seconds, default 10) bounds the wait for the flusher to
create the segment.

What each hook does and why:

- ``post_fork`` (worker): attach and claim a lane, so a misconfigured engine fails the
  worker's boot loudly (gunicorn then stops with "Worker failed to boot") instead of
  failing requests one by one. One wait is not a misconfiguration: a reload
  (``kill -HUP``) forks the whole new generation of workers *before* it tells the old
  one to stop, so for a moment the master has up to twice its workers. A worker forked
  while the master has more workers than it keeps (the surplus it is about to stop)
  that finds every lane held waits for one of them to free a lane, for up to gunicorn's
  ``graceful_timeout`` (the time an old worker is given to finish), heartbeating so the
  master does not time it out; only then does it fail to boot. Any other worker (first
  start, a replacement, ``TTIN``) that finds no lane fails at once, as before.
- :func:`client` also attaches lazily on first use, so the app works under any server,
  and with ``preload_app = True``: a client attached in the master while importing the
  app is inherited by every worker, and each worker claims its own lane on first use.
  A failed attach is remembered: the first one waits up to ``SONA_SHM_ATTACH_TIMEOUT``
  (once per process), later calls raise the same error at once until a back-off delay
  (1 s, doubling up to 30 s) has passed, and then one call tries again without
  waiting. So a missing engine never blocks an event loop for longer than
  ``SONA_SHM_ATTACH_TIMEOUT`` once, then a few milliseconds per back-off period.
- ``when_ready`` (master, after a preloaded app was imported): a client the import
  attached in the master gives its lane back, so the master holds none.
- ``worker_exit`` (worker, on a normal exit, including ``max_requests`` recycling):
  close the client, releasing its lane at once.
- ``child_exit`` (master, after *any* worker death, also after the master SIGKILLed a
  timed-out worker, when ``worker_exit`` never ran): nothing needs repairing. A lane is
  owned through an open-file-description lock that the kernel released when the worker
  died, and what the worker committed stays in its lane and is learned by the flusher.
  The hook checks that the lane is indeed free and logs it with how many committed
  trajectories are still to be learned (or that a replacement worker, spawned before the
  master reaped this one, already reuses it). Lanes are therefore bounded and reused:
  recycling workers with ``max_requests`` never exhausts them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, NamedTuple

from .checks import check_timeout
from .engine.client import Client, attach
from .errors import InvalidInputError, NoFreeLaneError, SonaShmError
from .shm.segment import check_name
from .stats import LaneStats, read

ENV_NAME = "SONA_SHM_NAME"
ENV_ATTACH_TIMEOUT = "SONA_SHM_ATTACH_TIMEOUT"
DEFAULT_ATTACH_TIMEOUT = 10.0

_log = logging.getLogger("sona_shm.gunicorn")
#: Seconds before the first retry after a failed attach; doubled after each failure, up to BACKOFF_MAX.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0

_guard = threading.Lock()
_client: Client | None = None


class _Failure(NamedTuple):
    name: str | None  # the SONA_SHM_NAME it was for (another name starts afresh)
    error: SonaShmError  # what the last attempt raised
    failures: int  # attempts that failed in a row
    retry_at: float  # _now() before which client() raises at once


_failure: _Failure | None = None
_now = time.monotonic  # the back-off's clock (tests replace it)
#: The clients ``sona_shm.asgi.Engine`` lifespans attached in this process, by engine name: :func:`client` reuses
#: one rather than take a second lane for the same process (one process, one lane).
_lifespan_clients: dict[str, list[Client]] = {}
_borrowed = False  # _client is a lifespan's: close() leaves it to the lifespan


def current_client(name: str) -> Client | None:
    """The hooks' client of engine ``name`` in this process, if it is attached (the ASGI lifespan reuses it)."""
    current = _client
    if current is not None and not _borrowed and getattr(current, "name", None) == name and not current.closed:
        return current
    return None


def lifespan_attached(name: str, client: Client, attached: bool) -> None:
    """``sona_shm.asgi.Engine`` says it attached ``client`` to engine ``name`` in this process (or closes it)."""
    clients = _lifespan_clients.setdefault(name, [])
    if attached:
        clients.append(client)
    else:
        clients[:] = [c for c in clients if c is not client]
    if not clients:
        del _lifespan_clients[name]


def _lifespan_client(name: str) -> Client | None:
    return next((c for c in _lifespan_clients.get(name, ()) if not c.closed), None)


def engine_name() -> str:
    """The engine named by ``SONA_SHM_NAME``; raises naming the variable if it is unset or invalid."""
    value = os.environ.get(ENV_NAME)
    if not value:
        raise InvalidInputError(f"{ENV_NAME}: expected the engine's name in the environment (gunicorn -e {ENV_NAME}=NAME), got nothing")
    try:
        return check_name(value)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{ENV_NAME}: {exc}") from None


def attach_timeout() -> float:
    """Seconds :func:`client` waits for the segment, from ``SONA_SHM_ATTACH_TIMEOUT`` (default 10)."""
    raw = os.environ.get(ENV_ATTACH_TIMEOUT)
    if raw is None or raw == "":
        return DEFAULT_ATTACH_TIMEOUT
    try:
        value: object = float(raw)
    except ValueError:
        value = raw  # refused below, naming what was given
    return check_timeout(value, ENV_ATTACH_TIMEOUT)


def client() -> Client:
    """This process's client of the engine named by ``SONA_SHM_NAME``, attached on first use.

    Safe to call from every thread of a worker; raises :class:`SegmentNotFoundError`
    if no flusher created the engine within ``SONA_SHM_ATTACH_TIMEOUT``,
    :class:`NoFreeLaneError` if every lane is held by a live process.

    A failure is remembered (see the module docstring): only the first attempt waits
    for the segment; until the back-off delay has passed every call raises the
    remembered error again at once, then one call tries again without waiting.
    """
    global _client, _failure, _borrowed
    current = _client
    if current is not None and not (_borrowed and current.closed):
        return current
    failure = _failure
    if failure is not None and failure.name == os.environ.get(ENV_NAME) and _now() < failure.retry_at:
        raise _again(failure)
    with _guard:
        if _client is not None and not (_borrowed and _client.closed):
            return _client
        _client, _borrowed = None, False  # (a lifespan's client it borrowed was closed by its lifespan)
        failure = _failure
        if failure is not None and failure.name != os.environ.get(ENV_NAME):
            failure = None
        if failure is not None and _now() < failure.retry_at:
            raise _again(failure)  # another thread failed while we waited for the guard
        try:
            name = engine_name()
            lifespan = _lifespan_client(name)
            if lifespan is not None:  # an ASGI lifespan attached this process already: one process, one lane
                _client, _borrowed, _failure = lifespan, True, None
                return lifespan
            # Wait for the segment once per process; a retry only looks.
            _client = attach(name, timeout=attach_timeout() if failure is None else 0.0)
        except SonaShmError as exc:
            failures = 1 if failure is None else failure.failures + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
            _failure = _Failure(os.environ.get(ENV_NAME), exc, failures, _now() + delay)
            raise
        _failure = None
        return _client


def _again(failure: _Failure) -> SonaShmError:
    """The remembered error, raised anew (same class, same message, and when the next attempt is)."""
    wait = max(0.0, failure.retry_at - _now())
    error = type(failure.error)(f"{failure.error} (remembered from {failure.failures} failed attach(es); next attempt in {wait:.1f} s)")
    return error


def close() -> None:
    """Close this process's client, if any (its lane is free at once); :func:`client` attaches again."""
    global _client, _failure, _borrowed
    with _guard:
        current, _client = _client, None
        borrowed, _borrowed = _borrowed, False
        _failure = None
    if current is not None and not borrowed:  # a lifespan's client is its lifespan's to close
        current.close()


# ----------------------------------------------------------------- the hooks


def when_ready(server: Any) -> None:
    """Master, once listening: a client the (preloaded) app attached here gives its lane back."""
    current = _client
    if current is not None:
        current.release_lane()
        server.log.info("sona_shm: the master attached while loading the app; it holds no lane, workers claim their own")


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after the fork: attach and claim a lane (during a reload, waiting for one the
    old generation frees), or fail the boot with the reason."""
    try:
        lane = _claim_lane(server, worker)
    except SonaShmError as exc:
        server.log.error("sona_shm: worker %s cannot attach: %s", os.getpid(), exc)
        raise
    server.log.info("sona_shm: worker %s attached to engine %r, lane %d", os.getpid(), engine_name(), lane)


def _claim_lane(server: Any, worker: Any) -> int:
    """``client().lane`` (which claims the lane now); while the master is replacing workers, wait for a free one.

    The wait is bounded by gunicorn's ``graceful_timeout``: an old worker told to stop
    exits within it (gthread waits that long for its requests, sync finishes the one it
    serves), and its lane is free the moment it is dead.
    """
    global _failure
    try:
        return client().lane
    except NoFreeLaneError:
        surplus = retiring_workers(server)
        if not surplus:
            raise  # nobody is about to leave: too few lanes for the workers (and other producers)
    grace = float(getattr(getattr(server, "cfg", None), "graceful_timeout", 0) or 0)
    server.log.info(
        "sona_shm: worker %s waits up to %g s (graceful_timeout) for a lane of engine %r: all are held, and the master is "
        "stopping %d worker(s) of the previous generation (a reload)",
        os.getpid(),
        grace,
        engine_name(),
        surplus,
    )
    deadline = time.monotonic() + grace
    delay = 0.005
    while True:
        notify = getattr(worker, "notify", None)
        if notify is not None:
            notify()  # the heartbeat: this worker is booting, not stuck (the master times out silent workers)
        remaining = deadline - time.monotonic()
        time.sleep(max(0.0, min(delay, remaining)))  # polling a kernel lock table: nothing to wake us when a lane frees
        delay = min(delay * 2, 0.1)
        _failure = None  # retried on this wait's clock, not client()'s back-off
        try:
            return client().lane
        except NoFreeLaneError as exc:
            if remaining <= 0:
                raise NoFreeLaneError(
                    f"{exc} (waited {grace:g} s, gunicorn's graceful_timeout, for the {surplus} worker(s) being replaced to free "
                    "one: the lanes must cover the workers plus every other producer)"
                ) from None


def retiring_workers(server: Any) -> int:
    """How many workers the master (``server``, as this worker was forked from it) had beyond those it keeps.

    A reload forks the new generation before stopping the old one: the old workers are
    then the surplus the master is about to stop. Read in the worker, from the master's
    memory as it was at the fork (this worker itself is not in ``WORKERS`` yet).
    """
    workers = getattr(server, "WORKERS", None)
    keeps = getattr(server, "num_workers", None)
    if not isinstance(workers, dict) or not isinstance(keeps, int):
        return 0
    return max(0, len(workers) + 1 - keeps)


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, on a normal exit (``max_requests``, SIGTERM, SIGHUP reload): close, freeing the lane."""
    if worker.pid != os.getpid():
        return  # gunicorn also calls this in the master for a worker that had already vanished
    close()


def child_exit(server: Any, worker: Any) -> None:
    """Master, after any worker died (also SIGKILLed on timeout): confirm its lane is free, log it."""
    name = os.environ.get(ENV_NAME)
    if not name:
        return
    try:
        lanes = dead_worker_lanes(name, worker.pid)
    except SonaShmError as exc:
        server.log.warning("sona_shm: cannot inspect engine %r after worker %s exited: %s", name, worker.pid, exc)
        return
    if not lanes:
        # The master may reap a worker only after spawning its replacement, which can
        # already have claimed the same (free) lane; or the worker never attached.
        server.log.info(
            "sona_shm: worker %s exited; no lane of engine %r is registered to it any more (reused, or never claimed)", worker.pid, name
        )
    for lane in lanes:
        unlearned = lane.backlog
        backlog = f"the flusher has {unlearned} trajectories it committed still to learn" if unlearned else "all it committed is learned"
        if lane.alive:
            server.log.warning(
                "sona_shm: lane %d of engine %r is still locked although worker %s exited: a process it forked still has the engine "
                "open; the lane frees when that process exits (%s)",
                lane.lane,
                name,
                worker.pid,
                backlog,
            )
        else:
            server.log.info(
                "sona_shm: worker %s exited; lane %d of engine %r is free for the next worker (%s)", worker.pid, lane.lane, name, backlog
            )


def dead_worker_lanes(name: str, pid: int) -> list[LaneStats]:
    """The lanes of engine ``name`` last claimed by process ``pid`` (the monitor's lane rows).

    Read-only: a lock query says whether each is still held (``alive``).
    """
    return [lane for lane in read(name).lanes if lane.pid == pid]


def _after_fork_in_child() -> None:
    global _guard, _failure
    _guard = threading.Lock()  # another thread of the parent may have held it at the fork
    _failure = None  # a worker tries for itself: the engine may have appeared since the parent failed
    _lifespan_clients.clear()  # the parent's lifespans are not this process's lanes


os.register_at_fork(after_in_child=_after_fork_in_child)
