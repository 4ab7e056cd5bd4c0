"""The shipped systemd unit, ``examples/sona-shm-flusher@.service``: ``systemd-analyze verify`` accepts it without a
warning, it does not restart on a configuration error, and its ExecStart — run as systemd would run it, with a
per-engine environment file — keeps checkpoints in its state directory, from which the engine comes back after a
reboot empties /dev/shm."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys

import numpy as np
import pytest

from sona_shm.engine.client import attach
from sona_shm.errors import (
    EXIT_CHECKPOINT,
    EXIT_FLEET,
    EXIT_FLUSHER_RUNNING,
    EXIT_LAYOUT_MISMATCH,
    EXIT_OK,
    EXIT_USAGE,
    SegmentNotFoundError,
)
from sona_shm.shm import segment
from sona_shm.stats import read
from sona_shm.store.history import kept

from support import ROOT, run, wait_for, write_routes

UNIT = ROOT / "examples" / "sona-shm-flusher@.service"
H = 16


def directives() -> dict[str, list[str]]:
    """Directive -> its values, in order (a unit file may repeat one; comments and sections left out)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        how = "Debian: apt-get install systemd (./scripts/test does it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"systemd-analyze missing under CI=true; {how}")
        pytest.skip(f"systemd-analyze not installed ({how})")
    sona_shm = shutil.which("sona-shm", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert sona_shm, "the sona-shm script of this environment"
    text = UNIT.read_text().replace("/srv/app/.venv/bin/sona-shm", sona_shm)  # verify checks that the command exists
    (tmp_path / UNIT.name).write_text(text)
    done = run([analyze, "verify", str(tmp_path / "sona-shm-flusher@router.service")], timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_the_unit_does_not_restart_on_a_configuration_error_and_keeps_checkpoints_in_its_state_directory():
    d = directives()
    codes = {int(c) for c in d["RestartPreventExitStatus"][0].split()}
    assert codes == {EXIT_USAGE, EXIT_FLUSHER_RUNNING, EXIT_LAYOUT_MISMATCH, EXIT_CHECKPOINT, EXIT_FLEET}
    assert d["Restart"] == ["on-failure"] and d["KillSignal"] == ["SIGTERM"]
    assert d["StateDirectory"] == ["sona-shm/%i"] and d["EnvironmentFile"] == ["-/etc/sona-shm/%i.env"]
    argv = shlex.split(d["ExecStart"][0])
    assert argv[argv.index("--checkpoint") + 1] == "%S/sona-shm/%i/%i.safetensors"  # %S: /var/lib for a system unit
    assert int(argv[argv.index("--checkpoint-keep") + 1]) > 1 and argv[-1] == "$SONA_SHM_OPTIONS"


def exec_start(name: str, state: str, env_file: str) -> list[str]:
    """The unit's ExecStart as systemd runs it: specifiers replaced, ``$SONA_SHM_OPTIONS`` from the environment file
    split at whitespace (the unit's default: empty), and this environment's Python for the venv's script."""
    d = directives()
    options = ""
    for line in open(env_file).read().splitlines():
        key, _, value = line.partition("=")
        if key == "SONA_SHM_OPTIONS":
            options = value
    argv = []
    for word in shlex.split(d["ExecStart"][0].replace("%i", name).replace("%S", state)):
        argv += options.split() if word == "$SONA_SHM_OPTIONS" else [word]
    assert argv[0] == "/srv/app/.venv/bin/sona-shm"
    return ["-m", "sona_shm", *argv[1:]]


def test_the_units_exec_start_with_an_environment_file_keeps_checkpoints_from_which_the_engine_comes_back(procs, name, tmp_path):
    state = str(tmp_path / "var-lib")
    os.makedirs(os.path.join(state, "sona-shm", name), mode=0o750)  # what StateDirectory= makes
    env_file = tmp_path / f"{name}.env"
    routes = write_routes(tmp_path / "routes.npz", H)
    env_file.write_text(f"SONA_SHM_OPTIONS=--rule routing --routes {routes} --guard-reward 0.3 --guard-window 100\n")
    argv = exec_start(name, state, str(env_file))
    checkpoint = os.path.join(state, "sona-shm", name, f"{name}.safetensors")

    def start():
        proc = procs.start(*argv)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the unit's flusher exited {proc.returncode}: {proc.communicate()}")
            try:
                return read(name).flusher.alive
            except SegmentNotFoundError:
                return False

        wait_for(up, what="the unit's flusher")
        return proc

    proc = start()
    rng = np.random.default_rng(3)
    with attach(name) as client:
        for _ in range(300):
            x = rng.standard_normal(H).astype(np.float32)
            assert client.feedback(x, route=int(rng.integers(0, 4)), reward=1.0, probability=0.25)
        client.sync(timeout=30)
        learned = client.forward(np.ones(H, np.float32))
    proc.send_signal(signal.SIGTERM)  # systemctl stop: learns what was committed, writes a last checkpoint, exits 0
    assert proc.wait(timeout=60) == EXIT_OK, proc.communicate()
    assert os.path.exists(checkpoint) and kept(checkpoint), os.listdir(os.path.dirname(checkpoint))
    segment.unlink(name)  # a reboot: /dev/shm is empty again

    proc = start()  # the engine is made from the newest checkpoint in the state directory
    stats = read(name)
    assert stats.trajectories_processed == 300 and stats.config.rule == "routing"
    with attach(name) as client:
        np.testing.assert_array_equal(client.forward(np.ones(H, np.float32)), learned)
    second = procs.start(*argv)  # a second flusher of the engine: a configuration error, exit 4, no restart loop
    assert second.wait(timeout=60) == EXIT_FLUSHER_RUNNING
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_OK
    bad = procs.start(*argv, "--guard-reward", "1.5")  # a bad option in the environment file: exit 2
    assert bad.wait(timeout=60) == EXIT_USAGE and "--guard-reward: expected DROP in (0, 1]" in bad.communicate()[1]
