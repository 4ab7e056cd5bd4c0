"""sona_shm.asgi: the lifespan attaches and closes, raw ASGI lifespan messages, awaitable flush/sync against a real flusher."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sona_shm import ClosedError, SegmentNotFoundError, Trajectory
from sona_shm.asgi import Engine
from sona_shm.stats import read

H = 16


def run(coro):
    return asyncio.run(coro)


def test_the_lifespan_attaches_at_startup_and_closes_at_shutdown(engine, name):
    engine(hidden_dim=H)
    sona = Engine(name, timeout=0)
    with pytest.raises(ClosedError, match="is not attached: pass engine.lifespan to the app"):
        _ = sona.client

    async def serve() -> tuple[int, dict]:
        async with sona.lifespan(object()) as state:
            assert state == {"sona_shm": sona} and sona.attached
            lane = sona.client.lane
            assert sona.client.record(Trajectory(np.ones(H), [], 1.0))
            return lane, read(name).as_dict()

    lane, during = run(serve())
    assert [row["lane"] for row in during["lanes"] if row["alive"]] == [lane] and during["recorded"] == 1
    assert not sona.attached and read(name).lanes_live == 0  # the lane is free again


def test_the_name_comes_from_the_environment(engine, name, monkeypatch):
    engine(hidden_dim=H)
    monkeypatch.setenv("SONA_SHM_NAME", name)
    monkeypatch.setenv("SONA_SHM_ATTACH_TIMEOUT", "0")
    sona = Engine()

    async def serve() -> str:
        async with sona.lifespan(None):
            return sona.client.name

    assert run(serve()) == name


def test_a_missing_engine_fails_the_startup_with_the_reason(name):
    sona = Engine(name, timeout=0)

    async def serve() -> None:
        async with sona.lifespan(None):
            pass

    with pytest.raises(SegmentNotFoundError, match=f"segment {name!r} does not exist"):
        run(serve())
    assert not sona.attached


def test_a_raw_asgi_app_gets_the_lifespan_handled(engine, name):
    engine(hidden_dim=H)
    sona = Engine(name, timeout=0)
    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(sona.client.lane).encode()})

    wrapped = sona.wrap(app)

    async def server() -> list[dict]:
        inbox: asyncio.Queue = asyncio.Queue()
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        inbox.put_nowait({"type": "lifespan.startup"})
        lifespan = asyncio.create_task(wrapped({"type": "lifespan"}, inbox.get, send))
        while not sent:
            await asyncio.sleep(0)
        await wrapped({"type": "http"}, inbox.get, send)  # served between startup and shutdown
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await lifespan
        return sent

    sent = run(server())
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "http.response.start",
        "http.response.body",
        "lifespan.shutdown.complete",
    ]
    assert seen == ["http"] and int(sent[2]["body"]) >= 0 and not sona.attached


def test_a_raw_asgi_startup_failure_is_reported_to_the_server(name):
    wrapped = Engine(name, timeout=0).wrap(None)  # type: ignore[arg-type]
    sent: list[dict] = []

    async def server() -> None:
        async def receive() -> dict:
            return {"type": "lifespan.startup"}

        async def send(message: dict) -> None:
            sent.append(message)

        await wrapped({"type": "lifespan"}, receive, send)

    run(server())
    assert sent[0]["type"] == "lifespan.startup.failed" and f"segment {name!r} does not exist" in sent[0]["message"]


def test_flush_and_sync_are_awaited_in_a_thread_while_the_loop_runs(procs, name):
    procs.flusher(name, "--hidden-dim", str(H), "--flush-threshold", "1000", "--lanes", "4")
    sona = Engine(name, timeout=10)

    async def serve() -> tuple[int, int]:
        async with sona.lifespan(None):
            for _ in range(5):
                assert sona.client.record(Trajectory(np.ones(H), [], 1.0))
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            await sona.sync(timeout=30)
            learned = read(name).trajectories_processed
            await sona.flush(timeout=30)
            task.cancel()
            return learned, ticks

    learned, ticks = run(serve())
    stats = read(name)
    assert learned == 5 and stats.pending_signals == 0 and stats.flushes_performed == 1
    assert ticks > 0  # the loop ran other tasks while it waited


def test_waits_refuse_bad_timeouts(engine, name):
    engine(hidden_dim=H)
    sona = Engine(name, timeout=0)

    async def serve() -> None:
        async with sona.lifespan(None):
            await sona.sync(timeout=float("nan"))

    with pytest.raises(ValueError, match="timeout: expected a finite number of seconds >= 0, got nan"):
        run(serve())
    with pytest.raises(ValueError, match="timeout: expected a finite number of seconds >= 0, got -1"):
        Engine(name, timeout=-1)
    with pytest.raises(ValueError, match="name: expected 1-64 characters"):
        Engine("a/b")


def test_a_worker_never_takes_a_second_lane_with_hooks_and_lifespan(engine, name, monkeypatch):
    """The README's gunicorn hooks plus the ASGI lifespan in one worker: one lane whichever attaches first; the one
    that attached closes it."""
    from types import SimpleNamespace

    from sona_shm import gunicorn as hooks

    engine(hidden_dim=H)
    monkeypatch.setenv("SONA_SHM_NAME", name)
    monkeypatch.setenv("SONA_SHM_ATTACH_TIMEOUT", "0")
    server = SimpleNamespace(log=SimpleNamespace(info=lambda *a: None, error=lambda *a: None))
    try:
        hooks.post_fork(server, SimpleNamespace(pid=0))  # the hooks first (post_fork), then the app's lifespan
        sona = Engine()

        async def serve() -> int:
            async with sona.lifespan(None):
                assert sona.client is hooks.client()
                return read(name).lanes_live

        assert run(serve()) == 1  # one lane, the hooks'
        assert not hooks.client().closed and read(name).lanes_live == 1  # the lifespan's shutdown left it to the hooks
    finally:
        hooks.close()
    assert read(name).lanes_live == 0

    sona = Engine()

    async def lifespan_first() -> None:
        async with sona.lifespan(None):
            assert hooks.client() is sona.client and read(name).lanes_live == 1  # the hooks reuse the lifespan's
            hooks.close()  # (worker_exit) leaves it to the lifespan
            assert not sona.client.closed

    run(lifespan_first())
    assert read(name).lanes_live == 0
    assert hooks.client().lane >= 0 and read(name).lanes_live == 1  # after the lifespan closed it, the hooks attach anew
    hooks.close()
    assert read(name).lanes_live == 0
