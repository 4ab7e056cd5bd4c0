"""Room for a segment: reserved whole at creation, refused with a configuration that fits, nothing left behind."""

from __future__ import annotations

import errno
import mmap
import os
import re
import shlex
import sys

import pytest

from sona_shm import NoSpaceError
from sona_shm.cli import EXIT_ERROR, EXIT_OK
from sona_shm.engine.flusher import Flusher
from sona_shm.shm import segment, space
from sona_shm.shm.layout import EngineConfig, Layout

from conftest import SMALL
from support import run

MiB = 2**20
pytestmark = pytest.mark.guarantee("no-process-dies-of-sigbus-on-a-full-dev-shm")


def leftovers(name: str) -> list[str]:
    return [entry for entry in os.listdir("/dev/shm") if entry in (f"sona_shm.{name}", f"sem.sona_shm.{name}.bell")]


def suggested(message: str) -> EngineConfig:
    """The configuration of the command a refusal suggests."""
    command = re.search(r"This fits \([^)]*\): `sona-shm flusher ([^`]*)`", message).group(1)
    words = shlex.split(command)
    options = dict(zip(words[::2], words[1::2]))
    options.pop("--name")
    return EngineConfig(**{flag[2:].replace("-", "_"): type(getattr(EngineConfig(), flag[2:].replace("-", "_")))(value)
                           for flag, value in options.items()})  # fmt: skip


def test_the_defaults_on_a_64_mib_dev_shm_are_refused_with_the_command_that_fits():
    layout = Layout(EngineConfig())
    with pytest.raises(NoSpaceError) as refused:
        space.check_room(layout, "router", room_bytes=64 * MiB, limit="/dev/shm has 64.0 MiB free")
    message = str(refused.value)
    assert f"segment 'router' needs {space.size_text(layout.total_bytes + space.BELL_BYTES)}" in message
    assert "309.2 MiB" in message and "/dev/shm has 64.0 MiB free" in message and "nothing was created" in message
    assert "--lane-slots or --capacity" in message
    fits = suggested(message)
    assert (fits.lanes, fits.hidden_dim, fits.max_steps, fits.attention_dim) == (32, 256, 8, 64)  # only capacities shrink
    assert Layout(fits).total_bytes + space.BELL_BYTES <= 0.9 * 64 * MiB
    assert fits.lane_slots == 64 and fits.capacity == 2800
    space.check_room(Layout(fits), "router", room_bytes=64 * MiB, limit="")  # and it is accepted


def test_an_engine_that_cannot_shrink_enough_says_so():
    with pytest.raises(NoSpaceError, match="even one slot per lane and no buffer do not fit: use fewer --lanes"):
        space.check_room(Layout(EngineConfig(lanes=4096, max_steps=64)), "big", room_bytes=64 * MiB, limit="")


def test_the_suggested_command_repeats_every_option_that_is_not_a_default():
    config = EngineConfig(hidden_dim=64, lr=0.01, lane_slots=16, capacity=100)
    assert space.command("x", config, group=True) == (
        "sona-shm flusher --name x --hidden-dim 64 --lr 0.01 --capacity 100 --lane-slots 16 --group"
    )
    # A routing engine: lr and the sizes compared with the routing rule's defaults, the table as the file the caller gave.
    routing = EngineConfig(rule="routing", routes=8, capacity=10_000, lane_slots=16, fleet_outbox=1024)
    assert space.command("r", routing) == (
        "sona-shm flusher --name r --capacity 10000 --lane-slots 16 --rule routing --fleet-outbox 1024 --routes FILE"
    )
    assert "--max-steps" not in space.command("r", routing)  # 1: the routing rule's own
    fits = r"fleet outbox 1024 x .*--fleet-outbox\), or give .*--rule routing .*--routes FILE` \(FILE: the route table"
    with pytest.raises(NoSpaceError, match=fits):
        space.check_room(Layout(routing), "r", room_bytes=48 * MiB, limit="")
    assert space.size_text(4096) == "4.0 KiB" and space.size_text(5 * 2**40) == "5.0 TiB" and space.size_text(12) == "12 B"


def test_a_new_segment_has_every_page_reserved(engine, name):
    flusher = engine(lane_slots=64, capacity=64)
    st = os.stat(f"/dev/shm/sona_shm.{name}")
    assert st.st_size == flusher.layout.total_bytes
    assert st.st_blocks * 512 >= flusher.layout.total_bytes  # allocated now, not on first write


def test_a_segment_an_older_version_left_sparse_is_reserved_when_adopted(name, monkeypatch):
    monkeypatch.setattr(segment.os, "posix_fallocate", lambda fd, offset, length: None)  # what sona_shm 0.1 did
    Flusher(name, config=EngineConfig(**SMALL)).close()
    assert os.stat(f"/dev/shm/sona_shm.{name}").st_blocks * 512 < Layout(EngineConfig(**SMALL)).total_bytes
    monkeypatch.undo()
    adopted = Flusher(name, config_overrides={})
    try:
        assert not adopted.created
        assert os.stat(f"/dev/shm/sona_shm.{name}").st_blocks * 512 >= adopted.layout.total_bytes
    finally:
        adopted.close()


def test_a_segment_that_cannot_be_reserved_is_refused_and_removed(name, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segment.os, "posix_fallocate", full)  # room was there when checked, gone when reserved
    with pytest.raises(NoSpaceError, match=f"segment {name!r}: cannot reserve its \\d+ bytes in /dev/shm \\(No space left on device\\)"):
        Flusher(name, config=EngineConfig(**SMALL))
    assert leftovers(name) == []


def test_a_segment_that_cannot_be_mapped_is_refused_once_and_removed(name, monkeypatch):
    """It once failed with ENOMEM, which a double close then hid behind an EBADF traceback, leaving the file."""

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(mmap, "mmap", no_memory)
    with pytest.raises(NoSpaceError, match=f"segment {name!r}: cannot map its \\d+ bytes \\(Cannot allocate memory\\)"):
        Flusher(name, config=EngineConfig(**SMALL))
    assert leftovers(name) == []


def test_an_oversized_engine_is_refused_without_a_traceback_or_a_leftover(name):
    command = [sys.executable, "-m", "sona_shm", "create", "--name", name, "--lanes", "4096", "--lane-slots", str(2**20)]
    done = run(command, timeout=120)
    assert done.returncode == EXIT_ERROR, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(rf"segment {name!r} needs 48\.0 TiB \(4096 lanes x 1048576 slots .* nothing was created", done.stderr)
    assert leftovers(name) == []
    fits = suggested(done.stderr)
    assert fits.lanes == 4096 and fits.lane_slots < 2**20
    smaller = [sys.executable, "-m", "sona_shm", "create", "--name", name, "--lanes", "2", "--lane-slots", "4", "--capacity", "4"]
    assert run(smaller, timeout=120).returncode == EXIT_OK


def mapped_kib(name: str) -> list[int]:
    """Resident KiB of each mapping of segment ``name`` in this process (/proc/self/smaps)."""
    sizes, inside = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith(f"/dev/shm/sona_shm.{name}")
            elif inside and line.startswith("Rss:"):
                sizes.append(int(line.split()[1]))
    return sizes


def test_the_flusher_faults_its_buffer_in_before_it_learns(name):
    """Each learned trajectory used to land on a page touched for the first time (877k/s learned
    with a full buffer, 116k/s with one that kept everything)."""
    flusher = Flusher(name, config=EngineConfig(**{**SMALL, "hidden_dim": 256, "capacity": 512}))
    try:
        layout = flusher.layout
        assert mapped_kib(name) and max(mapped_kib(name)) * 1024 >= layout.total_bytes - layout.buffer_offset
    finally:
        flusher.close()


def test_populate_falls_back_quietly_where_the_kernel_cannot(engine, monkeypatch):
    flusher = engine()
    monkeypatch.setattr(segment, "MADV_POPULATE_WRITE", 1_000_000)  # advice no kernel knows: EINVAL, as before Linux 5.14
    assert flusher.segment.populate(0, 4096) is False
    monkeypatch.undo()
    assert flusher.segment.populate(0, 4096) is True


def test_the_room_is_the_smaller_of_free_shm_and_available_memory(monkeypatch):
    """README: a segment must fit in /dev/shm's free space and in the memory available (MemAvailable + SwapFree)."""
    monkeypatch.setattr(space, "free_bytes", lambda path=space.SHM_DIR: 8 * 2**30)
    monkeypatch.setattr(space, "available_memory", lambda: 64 * MiB)
    assert space.room() == (64 * MiB, "64.0 MiB of memory available (MemAvailable + SwapFree; /dev/shm has 8.0 GiB free)")
    with pytest.raises(NoSpaceError, match="but 64.0 MiB of memory available"):
        space.check_room(Layout(EngineConfig()), "big")
    monkeypatch.setattr(space, "available_memory", lambda: None)  # /proc/meminfo unreadable: the file system decides
    assert space.room() == (8 * 2**30, "/dev/shm has 8.0 GiB free")
