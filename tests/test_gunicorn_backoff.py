"""sona_shm.gunicorn.client() remembers a failed attach: one wait per process, then back-off without waiting."""

from __future__ import annotations

import pytest

import sona_shm.gunicorn as hooks
from sona_shm import SegmentNotFoundError
from sona_shm.engine.client import attach as real_attach

H = 16


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def watched(monkeypatch, name):
    """SONA_SHM_NAME=name, a fake monotonic clock, and a log of every attach() client() makes."""
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0.05")
    clock = Clock()
    monkeypatch.setattr(hooks, "_now", clock)
    calls: list[float] = []

    def attach(engine: str, *, timeout: float):
        calls.append(timeout)
        return real_attach(engine, timeout=timeout)

    monkeypatch.setattr(hooks, "attach", attach)
    yield clock, calls
    hooks.close()


def test_a_missing_engine_waits_once_then_raises_at_once_until_the_backoff_passed(watched, engine, name):
    clock, calls = watched
    with pytest.raises(SegmentNotFoundError, match=f"segment {name!r} does not exist"):
        hooks.client()
    assert calls == [0.05]  # the first attempt waits the attach timeout
    for _ in range(3):
        with pytest.raises(SegmentNotFoundError, match=r"remembered from 1 failed attach\(es\); next attempt in 1\.0 s"):
            hooks.client()
    assert calls == [0.05]  # ...and nobody tries again within the back-off window

    delays = []
    for failures in range(2, 9):
        clock.now = hooks._failure.retry_at  # the window has passed: one attempt, without waiting
        with pytest.raises(SegmentNotFoundError):
            hooks.client()
        assert calls[-1] == 0.0 and len(calls) == failures
        delays.append(round(hooks._failure.retry_at - clock.now, 6))
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]  # doubling, capped at BACKOFF_MAX

    engine(hidden_dim=H)  # the flusher creates it
    with pytest.raises(SegmentNotFoundError, match="remembered"):
        hooks.client()  # still inside the window
    clock.now = hooks._failure.retry_at
    client = hooks.client()
    assert client.name == name and hooks._failure is None and hooks.client() is client


def test_another_engine_name_is_not_held_back_by_an_old_failure(watched, monkeypatch, engine, name):
    clock, calls = watched
    with pytest.raises(SegmentNotFoundError):
        hooks.client()
    other = f"{name}-b"
    from sona_shm.shm import segment

    try:
        from sona_shm.engine.flusher import Flusher
        from sona_shm.shm.layout import EngineConfig

        flusher = Flusher(other, config=EngineConfig(hidden_dim=H, lanes=2, lane_slots=4, capacity=4))
        monkeypatch.setenv(hooks.ENV_NAME, other)
        assert hooks.client().name == other and calls == [0.05, 0.05]
        hooks.close()
        flusher.close()
    finally:
        segment.unlink(other)


def test_close_forgets_the_failure(watched, engine, name):
    clock, calls = watched
    with pytest.raises(SegmentNotFoundError):
        hooks.client()
    hooks.close()
    engine(hidden_dim=H)
    assert hooks.client().name == name and calls == [0.05, 0.05]  # a fresh start waits again
