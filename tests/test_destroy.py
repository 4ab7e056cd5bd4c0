"""``sona-shm destroy`` while processes use the engine: refused unless forced, then every user of it notices."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sona_shm import EngineDestroyedError, Step, Trajectory
from sona_shm.cli import EXIT_DESTROYED, EXIT_FLUSHER_RUNNING, EXIT_OK, main
from sona_shm.engine.client import DESTROYED_CHECK_EVERY

from children import fork_child
from conftest import SMALL

H = SMALL["hidden_dim"]
pytestmark = pytest.mark.guarantee("a-destroyed-engine-is-noticed")


def one() -> Trajectory:
    return Trajectory(np.ones(H, np.float32), [Step(np.ones(H, np.float32), None, 1.0)], 1.0)


def destroy(capsys, name: str, *options: str) -> tuple[int, str]:
    code = main(["destroy", "--name", name, *options])
    return code, capsys.readouterr().err


def test_destroy_refuses_while_producers_hold_lanes_and_names_them(capsys, engine, name):
    engine().close()  # no flusher
    client = engine.attach()
    code, err = destroy(capsys, name)
    assert code == EXIT_FLUSHER_RUNNING
    assert f"segment {name!r}: 1 producer(s) hold lanes (lane {client.lane}: pid {os.getpid()})" in err and "--force" in err
    assert os.path.exists(f"/dev/shm/sona_shm.{name}")
    assert client.record(one())  # refused means untouched
    client.close()
    assert destroy(capsys, name) == (EXIT_OK, "")


def test_after_a_forced_destroy_record_flush_and_sync_raise(capsys, engine, name):
    flusher = engine(lane_slots=4 * DESTROYED_CHECK_EVERY)  # room: only the periodic look can notice
    client = engine.attach()
    assert client.record(one())
    flusher.scan()
    assert destroy(capsys, name, "--force")[0] == EXIT_OK
    for call in (client.sync, client.flush):
        with pytest.raises(EngineDestroyedError, match=f"segment {name!r} was destroyed .* attach again"):
            call(timeout=5)
    accepted = 0
    with pytest.raises(EngineDestroyedError):
        while accepted <= DESTROYED_CHECK_EVERY:
            client.record(one())
            accepted += 1
    assert accepted < DESTROYED_CHECK_EVERY  # noticed within one period, well before the lane filled
    head = client._writer.head
    with pytest.raises(EngineDestroyedError):
        client.record(one())  # and again on the next call; nothing was written
    assert client._writer.head == head


def test_a_full_lane_notices_at_once(capsys, engine, name):
    engine(lane_slots=2).close()
    client = engine.attach()
    assert client.record(one()) and client.record(one())  # the lane is full now
    assert destroy(capsys, name, "--force")[0] == EXIT_OK
    with pytest.raises(EngineDestroyedError):
        client.record(one())  # not a silent False counted as a drop
    with pytest.raises(EngineDestroyedError):
        client.record(one(), timeout=5)  # nor a wait for room that never comes


def test_a_fork_child_of_a_destroyed_engine_does_not_claim_a_new_one(capsys, children, engine, name):
    engine().close()
    client = engine.attach()
    assert client.record(one())
    assert destroy(capsys, name, "--force")[0] == EXIT_OK
    engine()  # the same name, a new engine: the child must not mix its lanes with the old mapping

    def child() -> None:
        try:
            client.record(one())
        except EngineDestroyedError:
            os._exit(3)

    assert children.wait(children.add(fork_child(child, deadline=60))) == 3


def test_a_flusher_whose_engine_is_destroyed_stops_with_its_exit_code(capsys, procs, name):
    flusher = procs.flusher(name, "--hidden-dim", str(H), "--lanes", "2", "--lane-slots", "8", "--capacity", "8")
    code, err = destroy(capsys, name)
    assert code == EXIT_FLUSHER_RUNNING and f"pass --force (it then exits {EXIT_DESTROYED})" in err
    assert destroy(capsys, name, "--force")[0] == EXIT_OK
    _, stderr = flusher.communicate(timeout=60)
    assert flusher.returncode == EXIT_DESTROYED  # no split brain: it does not learn on out of sight
    assert f"segment {name!r} was destroyed" in stderr
