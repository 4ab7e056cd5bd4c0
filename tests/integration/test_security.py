"""Another user cannot attach to an engine; its group can when the engine was created with --group."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sona_shm import SonaShmError, Trajectory
from sona_shm.client import attach
from sona_shm.flusher import Flusher
from sona_shm.layout import EngineConfig
from sona_shm.segment import DEFAULT_MODE, GROUP_MODE
from sona_shm.supervise import die_with_parent, set_deadline

from conftest import SMALL

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")


def attach_as(children, name: str, uid: int, gid: int) -> str:
    """Fork, drop to ``uid``/``gid`` (no supplementary groups), try to attach and record; what happened."""
    read, write = os.pipe()
    parent = os.getpid()
    pid = children.add(os.fork())
    if pid == 0:
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            die_with_parent(parent=parent)  # after setuid(), which clears the setting
            set_deadline(60)
            try:
                with attach(name) as client:
                    recorded = client.record(Trajectory(np.ones(SMALL["hidden_dim"]), [], 1.0))
                    client._segment.ring()  # the doorbell semaphore is reachable too
                    message = f"attached: lane {client.lane}, recorded {recorded}"
            except SonaShmError as exc:
                message = f"{type(exc).__name__}: {exc}"
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    assert children.wait(pid) == 0
    with os.fdopen(read, "rb") as f:
        return f.read().decode()


def engine_with_mode(name: str, mode: int) -> Flusher:
    return Flusher(name, config=EngineConfig(**SMALL), mode=mode)


def test_another_user_cannot_attach_to_a_default_engine(children, name):
    flusher = engine_with_mode(name, DEFAULT_MODE)
    try:
        result = attach_as(children, name, NOBODY, NOBODY)
        assert result == f"SegmentNotFoundError: segment {name!r}: permission denied (it belongs to another user or group)"
        assert flusher.scan() == 0
    finally:
        flusher.close()


def test_group_engine_admits_its_group_only(children, name):
    flusher = engine_with_mode(name, GROUP_MODE)
    try:
        group = os.stat(f"/dev/shm/sona_shm.{name}").st_gid
        result = attach_as(children, name, NOBODY, group)
        assert result.startswith("attached: lane ") and result.endswith("recorded True"), result
        assert flusher.scan() == 1
        stranger = NOBODY if group != NOBODY else NOBODY - 1
        assert "permission denied" in attach_as(children, name, NOBODY, stranger)
    finally:
        flusher.close()
