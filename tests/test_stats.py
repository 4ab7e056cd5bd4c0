"""sona_shm.stats: the typed read model, its JSON form (a documented interface), and `sona-shm list`."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import posix_ipc
import pytest

from sona_shm import Trajectory, stats
from sona_shm.cli import EXIT_OK, main
from sona_shm.errors import SegmentNotFoundError
from sona_shm.shm import segment
from sona_shm.stats import ALIVE, FOREIGN, NOT_RUNNING, UNREADABLE, EngineStats

from support import ROOT

H = 16

#: The keys of client.stats() / `sona-shm stats --json` that docs/reference/stats.md documents.
TOP_KEYS = {
    "name",
    "observed_at",
    "created_at",
    "config",
    "trajectories_processed",
    "signals_accumulated",
    "flushes_performed",
    "updates_applied",
    "pending_signals",
    "weights_generation",
    "last_flush_at",
    "recorded",
    "lane_dropped",
    "backlog",
    "lanes_live",
    "buffer",
    "flusher",
    "lanes",
    "adapter",
    "corrupt",
    "routes",
    "rates",
    "fleet",
    "learning",
    "engine_id",
    "implementation",
}
#: stats()["learning"]: pause, moving reward, the reward guard, rollbacks.
LEARNING_KEYS = {
    "paused",
    "paused_by",
    "paused_at",
    "pauses",
    "paused_skipped",
    "rollbacks",
    "rolled_back_signals",
    "last_rollback_at",
    "rollback_checkpoint_at",
    "moving_reward",
    "moving_feedbacks",
    "moving_window",
    "guard_drop",
    "guard_rollback",
    "guard_level",
    "guard_level_at",
    "guard_trips",
    "checkpoint",
    "checkpoint_keep",
}
CONFIG_KEYS = {
    "hidden_dim",
    "rank",
    "lr",
    "flush_threshold",
    "capacity",
    "max_steps",
    "attention_dim",
    "lanes",
    "lane_slots",
    "segment_bytes",
    "rule",
    "routes",
    "temperature",
    "max_routes",
    "adapter_lr",
}
BUFFER_KEYS = {"len", "dropped", "success_rate", "capacity", "drained", "drained_at", "consumer_pid", "state"}
FLUSHER_KEYS = {"pid", "alive", "heartbeat_at", "heartbeat_age_s", "started_at", "idle", "scans"}
LANE_KEYS = {"lane", "pid", "alive", "records", "learned", "backlog", "drops", "claims", "last_record_at"}
RATE_KEYS = {
    "interval_s",
    "learned_per_s",
    "recorded_per_s",
    "flushes_per_s",
    "lane_dropped_per_s",
    "buffer_dropped_per_s",
    "drained_per_s",
    "up_change_norm",
    "down_change_norm",
    "routes",
}
ROUTE_KEYS = {"name", "chosen", "best", "reward_sum", "mean_reward", "retired", "drift", "bias"}
ROUTE_RATE_KEYS = {"name", "chosen_share", "mean_reward"}
#: stats()["fleet"] of an engine with a fleet outbox (None without one); tests/integration/test_fleet_redis.py checks them live.
FLEET_KEYS = {
    "connected",
    "host_id",
    "key",
    "outbox",
    "outstanding",
    "outbox_capacity",
    "applied_entries",
    "applied_signals",
    "last_applied_id",
    "hosts",
    "lag_s",
    "epoch",
    "paused",
    "pauses",
    "resyncs",
    "lost_entries",
    "lost_signals",
    "bad_entries",
    "sealed_signals",
    "contact_at",
    "error_at",
}


def test_the_json_keys_are_the_documented_ones(engine, name):
    flusher = engine()
    client = engine.attach()
    client.record(Trajectory(np.ones(H), [], 1.0))
    flusher.scan()
    first = client.stats()
    assert set(first) == TOP_KEYS and set(first["config"]) == CONFIG_KEYS and set(first["buffer"]) == BUFFER_KEYS
    assert set(first["flusher"]) == FLUSHER_KEYS and set(first["lanes"][0]) == LANE_KEYS
    assert set(first["adapter"]) == {"up_norm", "down_norm"} and first["rates"] is None and first["fleet"] is None
    assert set(first["learning"]) == LEARNING_KEYS and len(first["engine_id"]) == 16
    earlier = stats.read(name)
    rated = stats.read(name).since(earlier).as_dict()
    assert set(rated["rates"]) == RATE_KEYS
    json.dumps(rated, allow_nan=False)  # plain JSON: no numpy scalar, no NaN
    # Every key is in the docs' table of them.
    page = (ROOT / "docs" / "reference" / "stats.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", page))
    keys = (
        TOP_KEYS
        | CONFIG_KEYS
        | BUFFER_KEYS
        | FLUSHER_KEYS
        | LANE_KEYS
        | RATE_KEYS
        | ROUTE_KEYS
        | ROUTE_RATE_KEYS
        | FLEET_KEYS
        | LEARNING_KEYS
    )
    missing = (keys | {"up_norm", "down_norm"}) - documented
    assert not missing, f"keys missing from the stats table of docs/reference/stats.md: {sorted(missing)}"


def test_client_stats_is_the_model_as_a_dict(engine, name):
    flusher = engine()
    client = engine.attach()
    client.record(Trajectory(np.ones(H), [], 1.0))
    flusher.scan()
    model = client.statistics()
    assert isinstance(model, EngineStats) and model.trajectories_processed == 1 and model.lanes[0].records == 1
    as_dict = model.as_dict()
    assert EngineStats.from_dict(as_dict) == model  # weights are compared out (compare=False)
    assert EngineStats.from_dict(json.loads(json.dumps(as_dict))).as_dict() == as_dict
    with pytest.raises(AttributeError):
        model.recorded = 5  # frozen


def test_reading_a_missing_engine_raises(name):
    with pytest.raises(SegmentNotFoundError, match=f"segment {name!r} does not exist"):
        stats.read(name)


# ----------------------------------------------------------------- sona-shm list


def _foreign(name: str, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(segment.segment_path(name), posix_ipc.O_CREX, mode=0o600, size=len(data))
    try:
        os.pwrite(shm.fd, data, 0)
    finally:
        shm.close_fd()


def test_list_finds_every_kind_of_segment(engine, name, capsys):
    alive = engine(hidden_dim=H, lanes=3)
    client = engine.attach()
    idle, foreign, half = f"{name}-idle", f"{name}-foreign", f"{name}-half"
    try:
        stopped = type(alive)(idle, config=type(alive.segment.layout.config)(hidden_dim=8, rank=1, capacity=1, lanes=2, lane_slots=1))
        stopped.close()
        _foreign(foreign, b"NOT-OURS" + b"\0" * 4088)
        _foreign(half, b"\0" * 4096)  # a creator that died before writing the header
        found = {e.name: e for e in stats.list_engines() if e.name.startswith(name)}
        assert set(found) == {name, idle, foreign, half}  # the doorbell semaphores are not listed
        assert found[name].state == ALIVE and found[name].flusher_pid == os.getpid() and found[name].lanes_live == 1
        assert (found[name].hidden_dim, found[name].rank, found[name].lanes) == (H, 2, 3)
        assert found[idle].state == NOT_RUNNING and (found[idle].hidden_dim, found[idle].lanes, found[idle].lanes_live) == (8, 2, 0)
        assert found[foreign].state == FOREIGN and "not a sona_shm segment" in found[foreign].reason
        assert found[half].state == UNREADABLE and "never finished" in found[half].reason
        assert found[name].size_bytes == os.stat(f"/dev/shm/sona_shm.{name}").st_size

        assert main(["list", "--json"]) == EXIT_OK
        listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
        assert listed[name]["state"] == "alive" and listed[idle]["state"] == "not running" and listed[name]["lanes_live"] == 1
        assert main(["list"]) == EXIT_OK
        table = capsys.readouterr().out
        assert re.search(rf"^{re.escape(name)}\s+alive\s+{os.getpid()}\s+{H}\s+2\s+1 / 3\s+0\s", table, re.M), table
        assert re.search(rf"^{re.escape(idle)}\s+not running\s+{os.getpid()}\s+8\s+1\s+0 / 2\s", table, re.M), table  # the last flusher
        assert re.search(rf"^{re.escape(foreign)}\s+not a sona_shm segment\s", table, re.M), table
        assert f"  {foreign}: segment {foreign!r}: not a sona_shm segment" in table
    finally:
        client.close()
        for extra in (idle, foreign, half):
            segment.unlink(extra)


def test_list_with_no_engines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stats, "SHM_DIR", str(tmp_path))
    assert stats.list_engines() == []
    assert main(["list"]) == EXIT_OK and "no engines on this host" in capsys.readouterr().out
    assert main(["list", "--json"]) == EXIT_OK and json.loads(capsys.readouterr().out) == []


def test_an_engine_with_a_fleet_outbox_has_the_fleet_section(engine, name):
    """Without Redis (never joined): the section is there, with its documented keys, not connected, epoch 0."""
    flusher = engine(fleet_outbox=8)
    client = engine.attach()
    client.record(Trajectory(np.ones(H), [], 1.0))
    flusher.scan()
    fleet = client.stats()["fleet"]
    assert set(fleet) == FLEET_KEYS
    assert fleet["connected"] is False and fleet["epoch"] == 0 and fleet["outbox_capacity"] == 8 and fleet["applied_entries"] == 0
    assert stats.EngineStats.from_dict(client.stats()).fleet == stats.read(name).fleet.__class__(**fleet)
