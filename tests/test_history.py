"""Checkpoint history: timestamped files kept beside the checkpoint, atomically and as private as the segment, pruned
to the newest K (never the guard's good one), listed by ``sona-shm checkpoints`` and named by ``rollback --back K``."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from sona_shm.cli import EXIT_CHECKPOINT, EXIT_OK, EXIT_USAGE, main
from sona_shm.learn.routes import RouteTable
from sona_shm.shm.segment import GROUP_MODE
from sona_shm.store import history
from sona_shm.store.checkpoint import read_checkpoint

H, K = 16, 4


def table() -> RouteTable:
    return RouteTable.build(np.random.default_rng(3).standard_normal((K, H)), ["code", "math", "chat", "search"])


def learn_some(client, flusher, seed: int, n: int = 10) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        assert client.feedback(rng.standard_normal(H).astype(np.float32), route=int(rng.integers(0, K)), reward=1.0)
    flusher.scan()


def test_the_last_k_are_kept_timestamped_and_path_is_the_newest(engine, tmp_path):
    path = str(tmp_path / "router.safetensors")
    flusher = engine(routes=table(), rule="routing", options={"checkpoint": path, "checkpoint_keep": 3})
    client = engine.attach()
    written = []
    for seed in range(5):
        learn_some(client, flusher, seed)
        assert flusher.write_checkpoint()
        written.append(history.kept(path)[-1])
    kept = history.kept(path)
    assert kept == written[-3:] and len(set(written)) == 5  # the two oldest were removed
    assert all(history.kept_path(path, read_checkpoint(f).written_at) == f for f in kept)  # the name is the time it was taken
    assert os.path.samefile(path, kept[-1])  # PATH: the newest, a second name of it
    assert read_checkpoint(path).counters["trajectories_processed"] == 50
    for f in [*kept, path]:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600  # as private as the segment
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n.endswith(".link")]  # nothing half-written left
    assert not flusher.write_checkpoint()  # nothing changed since: nothing written
    rows = history.entries(path)
    assert [e.path for e in rows] == kept[::-1] and [e.trajectories_processed for e in rows] == [50, 40, 30]


def test_a_group_engine_keeps_group_readable_checkpoints(engine, tmp_path, name):
    from sona_shm.config import EngineConfig
    from sona_shm.engine.flusher import Flusher

    from conftest import SMALL

    path = str(tmp_path / "g.safetensors")
    flusher = Flusher(name, config=EngineConfig(**SMALL), mode=GROUP_MODE, checkpoint=path, checkpoint_keep=2)
    try:
        flusher.write_checkpoint()
        assert stat.S_IMODE(os.stat(history.kept(path)[-1]).st_mode) == GROUP_MODE
    finally:
        flusher.close()


def test_pruning_spares_the_guards_good_checkpoint(tmp_path):
    path = str(tmp_path / "ck")
    names = []
    for i in range(5):
        f = history.kept_path(path, 1_800_000_000.0 + i)
        open(f, "wb").close()
        names.append(f)
    removed = history.prune(path, 2, protect=names[1])
    assert removed == [names[0], names[2]] and history.kept(path) == [names[1], names[3], names[4]]
    assert history.find(path, 1_800_000_000.0 + 1) == names[1] and history.find(path, 1.0) is None


def test_sona_shm_checkpoints_lists_them_and_rollback_back_k_takes_one(engine, name, tmp_path, capsys):
    path = str(tmp_path / "router.safetensors")
    flusher = engine(routes=table(), rule="routing", options={"checkpoint": path, "checkpoint_keep": 4, "moving_window": 5})
    client = engine.attach()
    for seed in range(3):
        learn_some(client, flusher, seed)
        flusher.write_checkpoint()
    flusher.close()  # rollback with no flusher running: applied by the command, under the flusher lock
    capsys.readouterr()
    assert main(["checkpoints", "--name", name, "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [r["back"] for r in rows] == [1, 2, 3] and [r["trajectories_processed"] for r in rows] == [30, 20, 10]
    assert all(r["moving_reward"] == 1.0 and r["engine_id"] == client.statistics().engine_id and r["paused"] == 0 for r in rows)
    assert main(["checkpoints", "--name", name]) == EXIT_OK
    table_text = capsys.readouterr().out
    assert "moving reward" in table_text and "1.0000" in table_text and rows[2]["path"] in table_text
    assert main(["rollback", "--name", name, "--back", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"rolled back to {rows[2]['path']}" in out and "the learning of 20 signals discarded" in out
    assert client.statistics().signals_accumulated == 10 and client.statistics().trajectories_processed == 30
    assert main(["rollback", "--name", name, "--back", "9"]) == EXIT_USAGE
    assert "--back: expected K in [1, 3]" in capsys.readouterr().err
    assert main(["rollback", "--name", name, "--to", str(tmp_path / "nope")]) == EXIT_CHECKPOINT
    assert "cannot read it" in capsys.readouterr().err
    assert main(["checkpoints", "--name", name, "--json"]) == EXIT_OK
    assert [r["note"] for r in json.loads(capsys.readouterr().out)] == ["", "", "rolled back to"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--checkpoint-keep", "3"], "--checkpoint-keep: needs --checkpoint PATH"),
        (["--checkpoint", "CK", "--checkpoint-keep", "0"], "--checkpoint-keep: expected an integer in [1, 10000], got 0"),
        (["--guard-reward", "0"], "--guard-reward: expected DROP in (0, 1]"),
        (["--guard-reward", "1.5"], "--guard-reward: expected DROP in (0, 1]"),
        (["--guard-reward", "nan"], "--guard-reward: expected DROP in (0, 1]"),
        (["--guard-reward", "0.2"], "--guard-reward: needs --checkpoint PATH and --checkpoint-keep K"),
        (["--guard-reward", "0.2", "--checkpoint", "CK"], "--guard-reward: needs --checkpoint PATH and --checkpoint-keep K"),
        (["--guard-rollback"], "--guard-rollback: needs --guard-reward DROP"),
        (["--guard-window", "0"], "--guard-window: expected an integer in [1, 10000000], got 0"),
        (["--guard-reward", "0.2", "--checkpoint", "CK", "--checkpoint-keep", "2", "--fleet", "redis://127.0.0.1:1"], "not with --fleet"),
        (["--guard-reward", "0.2", "--checkpoint", "CK", "--checkpoint-keep", "2"], "has no route table"),
    ],
)
def test_bad_safety_options_are_refused_before_anything_is_created(name, tmp_path, capsys, argv, fragment):
    argv = [str(tmp_path / "ck") if a == "CK" else a for a in argv]
    assert main(["flusher", "--name", name, "--quiet", *argv]) == EXIT_USAGE
    assert fragment in capsys.readouterr().err
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")
