"""Another user cannot attach to an engine; its group can when the engine was created with --group;
nobody takes over a segment or doorbell another user put in /dev/shm."""

from __future__ import annotations

import os
import stat
import sys

import numpy as np
import pytest

from sona_shm import SonaShmError, Trajectory, UntrustedSegmentError, open_consumer
from sona_shm.cli import EXIT_LAYOUT_MISMATCH
from sona_shm.engine.client import attach
from sona_shm.engine.flusher import Flusher
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig
from sona_shm.shm.segment import DEFAULT_MODE, GROUP_MODE
from sona_shm.supervise import die_with_parent, set_deadline

from children import fork_child
from conftest import SMALL
from support import run

NOBODY = 65534

pytestmark = [
    pytest.mark.guarantee("another-user-s-object-is-never-used"),
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root"),
]


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


def as_user(children, uid: int, action) -> None:
    """Run ``action()`` in a forked child as ``uid``/``gid`` ``uid`` (no supplementary groups)."""
    parent = os.getpid()

    def child() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        die_with_parent(parent=parent)  # after setuid(), which clears the setting
        action()

    assert children.wait(children.add(fork_child(child, deadline=60))) == 0


def squat(children, path: str, mode: int, content: bytes = b"") -> None:
    """Another user creates ``path`` with ``mode`` (what anyone can do in world-writable /dev/shm)."""

    def create() -> None:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        os.fchmod(fd, mode)  # past the umask
        os.write(fd, content)
        os.close(fd)

    as_user(children, NOBODY, create)


@pytest.mark.parametrize("mode", [0o666, 0o600])
def test_the_flusher_never_takes_over_a_segment_another_user_put_there(children, name, mode):
    """An empty 0666 file was 're-initialised' by a root flusher: the other user then read routes and wrote the ledger."""
    path = f"/dev/shm/sona_shm.{name}"
    squat(children, path, mode)
    with pytest.raises(UntrustedSegmentError) as refused:
        Flusher(name, config=EngineConfig(**SMALL))
    if mode == 0o666:
        assert f"{path}: mode 0666 allows more than an engine's 0600" in str(refused.value)
    else:
        assert f"{path}: owned by uid {NOBODY} (gid {NOBODY}), expected this process's uid 0" in str(refused.value)
    st = os.stat(path)
    assert (st.st_uid, st.st_size, stat.S_IMODE(st.st_mode)) == (NOBODY, 0, mode)  # not touched
    assert not os.path.exists(f"/dev/shm/sem.sona_shm.{name}.bell")


def test_the_flusher_refuses_an_own_segment_open_wider_than_its_mode(name):
    Flusher(name, config=EngineConfig(**SMALL)).close()
    os.chmod(f"/dev/shm/sona_shm.{name}", 0o644)
    with pytest.raises(UntrustedSegmentError, match="mode 0644 allows more than an engine's 0600"):
        Flusher(name, config_overrides={})
    os.chmod(f"/dev/shm/sona_shm.{name}", GROUP_MODE)
    with pytest.raises(UntrustedSegmentError, match="start the flusher with --group to adopt a group engine"):
        Flusher(name, config_overrides={})
    Flusher(name, config_overrides={}, mode=GROUP_MODE).close()  # with --group it is adopted


def test_the_flusher_refuses_a_doorbell_another_user_put_there_and_leaves_nothing(children, name):
    bell = f"/dev/shm/sem.sona_shm.{name}.bell"
    squat(children, bell, 0o666, b"\0" * 32)  # a semaphore file: sem_t is 32 zero bytes
    with pytest.raises(UntrustedSegmentError, match=f"{bell}: mode 0666 allows more than an engine's 0600"):
        Flusher(name, config=EngineConfig(**SMALL))
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")
    assert os.stat(bell).st_uid == NOBODY


def test_producers_refuse_a_complete_segment_another_user_put_there(children, name, tmp_path):
    """A squatter who copies a valid engine under the name would get every producer's records."""
    Flusher(name, config=EngineConfig(**SMALL)).close()
    path = f"/dev/shm/sona_shm.{name}"
    with open(path, "rb") as f:
        image = f.read()
    segment.unlink(name)
    squat(children, path, 0o666, image)
    with pytest.raises(UntrustedSegmentError, match="mode 0666 allows more than an engine's 0660"):
        attach(name)
    os.chmod(path, 0o600)  # as root: now only its owner's mode
    with pytest.raises(UntrustedSegmentError, match=f"owned by uid {NOBODY} .* or a group engine \\(0660\\) of one of its groups"):
        attach(name)
    with pytest.raises(UntrustedSegmentError):
        open_consumer(name)
    assert run([sys.executable, "-m", "sona_shm", "flusher", "--name", name], timeout=60).returncode == EXIT_LAYOUT_MISMATCH


def test_a_symlink_in_place_of_a_segment_is_not_followed(name, tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"\0" * 4096)
    os.symlink(target, f"/dev/shm/sona_shm.{name}")
    try:
        with pytest.raises(UntrustedSegmentError, match="cannot be opened as a segment"):
            Flusher(name, config=EngineConfig(**SMALL))
        assert target.read_bytes() == b"\0" * 4096
    finally:
        os.unlink(f"/dev/shm/sona_shm.{name}")
