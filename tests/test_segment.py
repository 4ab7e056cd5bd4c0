"""Segments: names, creation modes, opening, locks, removal."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from sona_shm import InvalidInputError, SegmentNotFoundError
from sona_shm.engine.client import attach
from sona_shm.engine.flusher import Flusher
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig

from conftest import SMALL


@pytest.mark.parametrize("bad", ["", "a/b", "-x", "x" * 65, "sp ace", None, 3, "ü"])
def test_names_are_validated(bad):
    with pytest.raises(InvalidInputError, match="name: expected 1-64 characters"):
        segment.check_name(bad)


def test_missing_segment_says_how_to_create_it(name):
    with pytest.raises(SegmentNotFoundError, match=f"sona-shm flusher --name {name}"):
        attach(name)


def test_default_mode_is_0600_and_group_is_0660(name, engine):
    engine().close()
    mode = stat.S_IMODE(os.stat(f"/dev/shm/sona_shm.{name}").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(f"/dev/shm/sem.sona_shm.{name}.bell").st_mode) == 0o600
    segment.unlink(name)
    old = os.umask(0o077)  # the group option must win over a strict umask
    try:
        Flusher(name, config=EngineConfig(**SMALL), mode=segment.GROUP_MODE).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(f"/dev/shm/sona_shm.{name}").st_mode) == 0o660
    assert stat.S_IMODE(os.stat(f"/dev/shm/sem.sona_shm.{name}.bell").st_mode) == 0o660


def test_attach_waits_for_the_flusher_to_create_the_segment(name, engine):
    result = {}
    started = threading.Event()

    def producer():
        started.set()
        try:
            with attach(name, timeout=30) as client:
                result["hidden_dim"] = client.hidden_dim
        except Exception as exc:  # pragma: no cover - reported below
            result["error"] = exc

    thread = threading.Thread(target=producer)
    thread.start()
    started.wait(10)
    engine(hidden_dim=24)
    thread.join(30)
    assert result == {"hidden_dim": 24}


def test_locks_are_exclusive_between_descriptors_and_probe_without_taking(name, engine):
    engine()
    a = segment.Segment.open(name)
    b = segment.Segment.open(name, writable=False)
    try:
        assert a.try_lock(200)
        assert b.is_locked(200) and not a.is_locked(200)  # a query never reports one's own lock
        assert a.held_locks([200, 201]) == [True, False]
        a.unlock(200)
        assert not b.is_locked(200)
    finally:
        a.close()
        b.close()
        a.close()  # twice is fine


def test_unlink_reports_what_it_removed(name, engine):
    engine().close()
    assert segment.unlink(name) == [f"/sona_shm.{name}", f"/sona_shm.{name}.bell"]
    assert segment.unlink(name) == []


def test_start_ticks_identify_a_process():
    me = os.getpid()
    ticks = segment.start_ticks(me)
    assert ticks > 0 and segment.process_alive(me, ticks)
    assert not segment.process_alive(me, ticks + 1)  # same pid, other start: a recycled pid
    assert segment.start_ticks(2**22 + 12345) == 0
