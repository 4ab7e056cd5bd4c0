"""Adapter checkpoints: contents, compatibility, restore as a transaction, the flusher's and the CLI's use."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sona_shm import InstantLoop
from sona_shm.cli import EXIT_CHECKPOINT, EXIT_FLUSHER_RUNNING, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from sona_shm.engine.flusher import Flusher
from sona_shm.errors import CheckpointError, FlusherRunningError, InvalidInputError
from sona_shm.learn.learner import initial_down
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig
from sona_shm.store.checkpoint import DOWN, GRAD_DOWN, GRAD_UP, UP_T, Checkpoint, checkpoint_segment, read_checkpoint, restore

from conftest import SMALL
from support import make_trajectories
from support import run as run_process

H, R = SMALL["hidden_dim"], SMALL["rank"]
FLT_MAX = np.finfo(np.float32).max


def learned_engine(engine, count: int = 15, seed: int = 1):
    """A flusher that learned ``count`` trajectories (threshold 10: one flush, 5 pending)."""
    flusher = engine()
    client = engine.attach()
    for t in make_trajectories(seed, count, H):
        assert client.record(t)
    assert flusher.scan() == count
    return flusher, client


def reference(*batches) -> InstantLoop:
    loop = InstantLoop(H, R, SMALL["lr"], SMALL["flush_threshold"])
    for batch in batches:
        for t in batch:
            loop.on_trajectory(t)
    return loop


def snapshot_bytes(name: str) -> bytes:
    seg = segment.Segment.open(name, writable=False)
    try:
        layout = seg.layout
        return bytes(seg.buf[layout.ledger_offset : layout.lanes_offset]) + bytes(seg.buf[1088:1096])
    finally:
        seg.close()


def test_checkpoint_holds_the_committed_state_under_peft_names(engine, name, tmp_path):
    flusher, client = learned_engine(engine)
    path = str(tmp_path / "adapter.safetensors")
    saved = checkpoint_segment(name, path)
    tensors = load_file(path)  # the real safetensors package
    down, up, grad = client._ledger.read("down", "up", "grad_up")
    assert tensors[DOWN].dtype == np.float32 and np.array_equal(tensors[DOWN], down)
    assert tensors[UP_T].shape == (H, R) and np.array_equal(tensors[UP_T], up.T)
    assert tensors[GRAD_UP].dtype == np.float64 and np.array_equal(tensors[GRAD_UP], grad) and grad.any()
    assert saved.counters == {
        "pending": 5,
        "trajectories_processed": 15,
        "signals_accumulated": 15,
        "flushes_performed": 1,
        "updates_applied": 10,
        "corrupt": 0,
    }
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "sona_shm.adapter" and meta["format_version"] == "3" and meta["rule"] == "reference"
    assert (meta["hidden_dim"], meta["rank"], meta["lr"], meta["flush_threshold"]) == ("16", "2", "0.01", "10")
    assert meta["generation"] == "1" and meta["pending"] == "5" and float(meta["scaling"]) == pytest.approx(2**-0.5)
    # The adapter a PEFT user rebuilds from the file is the one the engine applies.
    x = np.linspace(-1, 1, H, dtype=np.float32)
    peft = x + (tensors[UP_T] @ (tensors[DOWN] @ x)) * float(meta["scaling"])
    np.testing.assert_allclose(peft, client.forward(x), atol=1e-7)


def test_restored_engine_continues_exactly_pending_gradients_included(engine, name, tmp_path):
    flusher, client = learned_engine(engine)
    path = str(tmp_path / "a.safetensors")
    flusher.checkpoint_path = path
    assert flusher.write_checkpoint() and not flusher.write_checkpoint()  # unchanged: not written again
    client.close()
    flusher.close()
    segment.unlink(name)

    second = Flusher(name, config=EngineConfig(hidden_dim=H), config_overrides={}, checkpoint=path)
    try:
        assert second.created and second.restored
        cfg = second.layout.config
        assert (cfg.lanes, cfg.capacity, cfg.lr) == (SMALL["lanes"], SMALL["capacity"], SMALL["lr"])  # the file's engine
        client = engine.attach()
        batch2 = make_trajectories(2, 10, H)
        for t in batch2:
            client.record(t)
        second.scan()
        second.flush_now()
        stats = client.stats()
        loop = reference(make_trajectories(1, 15, H), batch2)
        loop.flush()
        assert stats["trajectories_processed"] == 25 and stats["updates_applied"] == 25 and stats["flushes_performed"] == 3
        np.testing.assert_allclose(client._ledger.read("up")[0], loop.up, atol=1e-7)
    finally:
        second.close()


def test_files_written_by_the_safetensors_package_restore(engine, name, tmp_path):
    loop = reference(make_trajectories(3, 12, H))
    path = str(tmp_path / "theirs.safetensors")
    grad = np.full((R, H), 0.25)
    meta = {k: repr(v) for k, v in vars(EngineConfig(**SMALL)).items()}
    meta.update(format="sona_shm.adapter", format_version="1", generation="4", last_flush_at="0.0", pending="2")
    meta.update(trajectories_processed="12", signals_accumulated="12", flushes_performed="1", updates_applied="10")
    save_file({DOWN: loop.down, UP_T: np.ascontiguousarray(loop.up.T), GRAD_UP: grad}, path, metadata=meta)
    engine().close()
    assert restore(name, path) == 5  # max(engine's 0, file's 4) + 1: every worker reloads
    client = engine.attach()
    up, g, pending = client._ledger.read("up", "grad_up", "pending")
    assert np.array_equal(up, loop.up) and np.array_equal(g, grad) and pending == 2


def good_checkpoint(tmp_path, **changes) -> str:
    down = initial_down(H, R)
    ckpt = Checkpoint(
        EngineConfig(**SMALL),
        None,
        {"down": down, "up": np.full((R, H), 0.5, np.float32), "grad_up": np.zeros((R, H))},
        3,
        {"pending": 0, "trajectories_processed": 7, "signals_accumulated": 7, "flushes_performed": 1, "updates_applied": 7, "corrupt": 0},
        0.0,
    )
    tensors = {DOWN: ckpt.down, UP_T: ckpt.up.T, GRAD_UP: ckpt.arrays["grad_up"]}
    from sona_shm.store.tensorfile import decode, encode

    _, meta = decode(ckpt.to_bytes(), "x")
    for key, value in changes.items():
        target = tensors if key in tensors or isinstance(value, np.ndarray) else meta
        if value is None:
            del target[key]
        else:
            target[key] = value
    path = str(tmp_path / "c.safetensors")
    with open(path, "wb") as f:
        f.write(encode(tensors, meta))
    return path


@pytest.mark.guarantee("a-checkpoint-is-whole-or-absent")
@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"format": "peft"}, "not a sona_shm adapter checkpoint"),
        ({"format_version": "4"}, "checkpoint format version '4'"),
        ({"hidden_dim": None}, "metadata 'hidden_dim' is missing"),
        ({"hidden_dim": "x"}, "metadata 'hidden_dim': expected an integer"),
        ({"rank": "3"}, "invalid engine configuration in its metadata (rank: expected 1 or 2"),
        ({"lr": "nan"}, "metadata 'lr': expected a finite number"),
        ({"generation": "-1"}, "metadata 'generation': expected an integer in [0, 2**62)"),
        ({"generation": str(2**64 - 1)}, "metadata 'generation': expected an integer in [0, 2**62)"),
        ({"corrupt": str(2**62)}, "metadata 'corrupt': expected an integer in [0, 2**62)"),
        ({"rule": "sgd"}, "invalid engine configuration in its metadata (rule: expected one of"),
        ({"routes": "3"}, "metadata 'route_names': expected at least 3 names (its 'routes'), got 0"),
        (
            {"routes": "2", "route_names": '["a", "b"]'},
            "missing ['sona.route_best', 'sona.route_bias', 'sona.route_chosen', 'sona.route_reward'",
        ),
        ({GRAD_DOWN: np.zeros((R, H))}, "unexpected ['sona.grad_down']"),
        ({"generation": "-1"}, "metadata 'generation': expected an integer in [0, 2**62)"),
        ({"generation": str(2**64 - 1)}, "metadata 'generation': expected an integer in [0, 2**62), got '18446744073709551615'"),
        ({"generation": str(2**62)}, "metadata 'generation': expected an integer in [0, 2**62)"),
        ({"flushes_performed": str(2**64 - 1)}, "metadata 'flushes_performed': expected an integer in [0, 2**62)"),
        ({"trajectories_processed": str(2**70)}, "metadata 'trajectories_processed': expected an integer in [0, 2**62)"),
        ({"pending": "3"}, "inconsistent counters: pending 3"),
        ({GRAD_UP: None}, "missing ['sona.grad_up']"),
        ({"extra": np.zeros(1, np.float32)}, "unexpected ['extra']"),
        ({UP_T: np.zeros((R, H), np.float32)}, f"expected F32 [{H}, {R}] (rank {R}, hidden_dim {H}), got float32 [{R}, {H}]"),
        ({GRAD_UP: np.zeros((R, H), np.float32)}, "'sona.grad_up': expected F64"),
        ({DOWN: np.full((R, H), np.inf, np.float32)}, "non-finite value inf at [0, 0]"),
        ({GRAD_UP: np.full((R, H), np.nan)}, "non-finite value nan"),
        # Finite, but forward() of an ordinary query would overflow (it gave [inf, -inf, nan] after such a restore).
        ({DOWN: np.full((R, H), FLT_MAX, np.float32)}, f"tensor {DOWN!r}: row 0 has norm 1.361e+39, beyond the float32 limit"),
        (
            {DOWN: np.full((R, H), 1e37, np.float32), UP_T: np.full((H, R), 10.0, np.float32)},
            f"tensors {DOWN!r} and {UP_T!r}: the adapter moves a unit-norm query by up to 2.263e+39",
        ),
    ],
)
def test_bad_checkpoints_are_refused_naming_the_problem(tmp_path, changes, fragment):
    path = good_checkpoint(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=f"^checkpoint {path}: ") as info:
        read_checkpoint(path)
    assert fragment in str(info.value) and "nothing restored" in str(info.value)


def test_good_checkpoint_helper_is_good(tmp_path):
    assert read_checkpoint(good_checkpoint(tmp_path)).generation == 3


@pytest.mark.guarantee("a-checkpoint-is-whole-or-absent")
@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) - 3],  # truncated
        lambda data: data + b"\0",  # trailing bytes
        lambda data: data[:8] + b"[" + data[9:],  # corrupt header
    ],
    ids=["truncated", "trailing", "corrupt-header"],
)
def test_restore_of_a_damaged_file_changes_nothing(engine, name, tmp_path, damage):
    flusher, client = learned_engine(engine)
    flusher.close()
    path = good_checkpoint(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    before = snapshot_bytes(name)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        restore(name, path)
    assert snapshot_bytes(name) == before


def test_restore_refuses_while_a_flusher_runs_and_changes_nothing(engine, name, tmp_path):
    learned_engine(engine)
    before = snapshot_bytes(name)
    with pytest.raises(FlusherRunningError, match="stop it \\(SIGTERM\\) before restoring"):
        restore(name, good_checkpoint(tmp_path))
    assert snapshot_bytes(name) == before


def test_restore_refuses_files_that_do_not_fit_the_engine(name, tmp_path):
    Flusher(name, config=EngineConfig(**{**SMALL, "hidden_dim": 8})).close()
    before = snapshot_bytes(name)
    with pytest.raises(CheckpointError, match="hidden_dim is 16, the engine's is 8; nothing restored"):
        restore(name, good_checkpoint(tmp_path))
    assert snapshot_bytes(name) == before
    segment.unlink(name)
    Flusher(name, config=EngineConfig(**{**SMALL, "flush_threshold": 5})).close()
    before = snapshot_bytes(name)
    path = good_checkpoint(tmp_path, pending="5", trajectories_processed="12", signals_accumulated="12", updates_applied="7")
    with pytest.raises(CheckpointError, match="5 pending signals, the engine flushes at 5"):
        restore(name, path)
    assert snapshot_bytes(name) == before


def test_restore_keeps_unlearned_trajectories_and_lane_positions(engine, name, tmp_path):
    flusher, client = learned_engine(engine)
    waiting = make_trajectories(5, 4, H)
    for t in waiting:
        client.record(t)  # committed, not learned yet
    flusher.close()
    path = good_checkpoint(tmp_path)
    restore(name, path)
    stats = client.stats()
    assert stats["trajectories_processed"] == 7 and stats["lanes"][0]["learned"] == 15 and stats["recorded"] == 19
    second = Flusher(name, config_overrides={})
    try:
        assert second.scan() == 4  # the waiting ones, learned on top of the restored state
        assert client.stats()["trajectories_processed"] == 11
    finally:
        second.close()


@pytest.mark.guarantee("a-checkpoint-is-whole-or-absent")
def test_new_segment_with_a_bad_checkpoint_is_refused_and_removed(name, tmp_path):
    path = good_checkpoint(tmp_path, **{DOWN: np.full((R, H), np.nan, np.float32)})
    with pytest.raises(CheckpointError, match="non-finite"):
        Flusher(name, config=EngineConfig(**SMALL), checkpoint=path)
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")
    path = good_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="hidden_dim is 16, the engine's is 8"):
        Flusher(name, config=EngineConfig(**{**SMALL, "hidden_dim": 8}), config_overrides={"hidden_dim": 8}, checkpoint=path)
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")


def test_adopted_segment_ignores_the_checkpoint(engine, name, tmp_path, caplog):
    flusher, client = learned_engine(engine)
    flusher.close()
    path = good_checkpoint(tmp_path, **{DOWN: np.full((R, H), np.nan, np.float32)})  # unreadable, and not read
    with caplog.at_level(logging.INFO, logger="sona_shm.flusher"):
        second = Flusher(name, config_overrides={}, checkpoint=path)
    try:
        assert not second.created and not second.restored and second.learner.trajectories_processed == 15
        assert "keeps its own state" in caplog.text
    finally:
        second.close()


def test_periodic_checkpoint_failure_is_logged_and_learning_goes_on(engine, tmp_path, caplog, monkeypatch):
    flusher, client = learned_engine(engine)
    flusher.checkpoint_path = str(tmp_path / "x.safetensors")
    flusher.checkpoint_interval = 1.0

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with caplog.at_level(logging.ERROR, logger="sona_shm.flusher"):
        flusher._periodic_checkpoint()
    assert "No space left on device" in caplog.text and "learning goes on" in caplog.text
    monkeypatch.undo()
    client.record(make_trajectories(9, 1, H)[0])
    assert flusher.scan() == 1
    flusher._periodic_checkpoint()
    assert read_checkpoint(flusher.checkpoint_path).counters["trajectories_processed"] == 16


def test_checkpoint_path_and_interval_are_validated(name, tmp_path):
    with pytest.raises(InvalidInputError, match="checkpoint: directory .*nope does not exist"):
        Flusher(name, config=EngineConfig(**SMALL), checkpoint=str(tmp_path / "nope" / "x"))
    with pytest.raises(InvalidInputError, match="is a directory"):
        Flusher(name, config=EngineConfig(**SMALL), checkpoint=str(tmp_path))
    with pytest.raises(InvalidInputError, match="checkpoint_interval: expected a finite number"):
        Flusher(name, config=EngineConfig(**SMALL), checkpoint=str(tmp_path / "x"), checkpoint_interval=float("nan"))
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_checkpoint_and_restore(capsys, engine, name, tmp_path):
    flusher, client = learned_engine(engine)
    path = str(tmp_path / "cli.safetensors")
    code, out, _ = run(capsys, "checkpoint", "--name", name, "--out", path)
    assert code == EXIT_OK and "generation 1, 15 trajectories processed, 5 pending" in out
    code, _, err = run(capsys, "restore", "--name", name, "--from", path)
    assert code == EXIT_FLUSHER_RUNNING and "before restoring" in err
    flusher.close()
    code, out, _ = run(capsys, "restore", "--name", name, "--from", path)
    assert code == EXIT_OK and "weights generation is now 2" in out
    with open(path, "r+b") as f:
        f.truncate(100)
    code, _, err = run(capsys, "restore", "--name", name, "--from", path)
    assert code == EXIT_CHECKPOINT and "not a valid safetensors file" in err
    code, _, err = run(capsys, "checkpoint", "--name", name + "x", "--out", path)
    assert code == EXIT_NOT_FOUND
    code, _, err = run(capsys, "flusher", "--name", name, "--checkpoint-interval", "5")
    assert code == EXIT_USAGE and "needs --checkpoint PATH" in err


@pytest.mark.parametrize(
    "counter", ["generation", "pending", "trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied", "corrupt"]
)
@pytest.mark.guarantee("a-checkpoint-is-whole-or-absent")
def test_a_counter_out_of_range_exits_7_from_restore_and_from_the_flusher(capsys, name, tmp_path, counter):
    """With generation 2**64 - 1 the flusher crash-looped on OverflowError; restore printed a traceback and exited 1."""
    path = good_checkpoint(tmp_path, **{counter: str(2**64 - 1)})
    Flusher(name, config=EngineConfig(**SMALL)).close()
    before = snapshot_bytes(name)
    assert main(["restore", "--name", name, "--from", path]) == EXIT_CHECKPOINT
    err = capsys.readouterr().err
    assert f"metadata {counter!r}: expected an integer in [0, 2**62), got '18446744073709551615'; nothing restored" in err
    assert snapshot_bytes(name) == before
    segment.unlink(name)
    flusher = run_process([sys.executable, "-m", "sona_shm", "flusher", "--name", name, "--quiet", "--checkpoint", path], timeout=60)
    assert flusher.returncode == EXIT_CHECKPOINT and "Traceback" not in flusher.stderr
    assert f"metadata {counter!r}: expected an integer in [0, 2**62)" in flusher.stderr
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")


@pytest.mark.guarantee("a-checkpoint-is-whole-or-absent")
@pytest.mark.guarantee("finite-in-finite-out-the-same-on-both-paths")
def test_weights_that_overflow_forward_exit_7_from_restore_and_change_nothing(capsys, engine, name, tmp_path):
    flusher, client = learned_engine(engine)
    flusher.close()
    before = snapshot_bytes(name)
    path = good_checkpoint(tmp_path, **{DOWN: np.full((R, H), FLT_MAX, np.float32)})
    assert main(["restore", "--name", name, "--from", path]) == EXIT_CHECKPOINT
    err = capsys.readouterr().err
    assert f"tensor {DOWN!r}: row 0 has norm" in err and "forward() of a unit-norm query would overflow; nothing restored" in err
    assert snapshot_bytes(name) == before
    assert np.isfinite(client.forward(np.ones(H, np.float32))).all()
    client.close()


def test_the_largest_counters_accepted_still_learn_and_restore(engine, name, tmp_path):
    big = str(2**62 - 1)
    path = good_checkpoint(tmp_path, generation=big, trajectories_processed=big, signals_accumulated=big, updates_applied=big)
    flusher = Flusher(name, config=EngineConfig(**SMALL), checkpoint=path)
    try:
        client = engine.attach()
        for t in make_trajectories(2, SMALL["flush_threshold"], H):
            client.record(t)
        assert flusher.scan() == SMALL["flush_threshold"]  # a flush: generation and counters go up without overflow
        stats = client.stats()
        assert stats["weights_generation"] == 2**62 and stats["trajectories_processed"] == 2**62 - 1 + SMALL["flush_threshold"]
    finally:
        flusher.close()
    assert restore(name, path) == 2**62 + 1  # max(engine's, file's) + 1 fits the ledger's u64
