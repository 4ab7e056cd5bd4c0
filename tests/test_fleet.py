"""The fleet member without a redis-server: options, host ids, and a Redis that never answers.

The fleet against a real redis-server is tests/integration/test_fleet_redis.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from sona_shm import Trajectory, stats
from sona_shm.config import DEFAULT_FLEET_OUTBOX
from sona_shm.engine.flusher import Flusher
from sona_shm.errors import InvalidInputError
from sona_shm.fleet.member import FleetOptions, default_host_id

from conftest import SMALL
from support import wait_for

pytest.importorskip("redis")

#: A port nothing listens on: connections are refused at once.
NOWHERE = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(url="http://x"), "--fleet: expected a Redis URL"),
        (dict(key=""), "--fleet-key: expected 1 to 320 bytes"),
        (dict(key="a{b}"), "without '{' or '}'"),
        (dict(host_id="x" * 129), "--host-id: expected 1 to 128 bytes"),
        (dict(host_id="a\\nb"), "--host-id: expected printable text"),
        (dict(lag=-1), "--fleet-lag: expected an integer >= 0"),
        (dict(lag=True), "--fleet-lag: expected an integer >= 0"),
        (dict(snapshot_interval=0), "--fleet-snapshot-interval: expected a finite number of seconds > 0"),
        (dict(snapshot_interval=float("nan")), "--fleet-snapshot-interval"),
    ],
)
def test_bad_fleet_options_are_refused_naming_the_option(change, message):
    base = dict(url="redis://h:1", key="k", host_id="h")
    if change.get("host_id") == "a\\nb":
        change = dict(host_id="a\nb")
    with pytest.raises(InvalidInputError, match=message):
        FleetOptions(**{**base, **change})


def test_the_default_host_id_is_stable_and_differs_by_engine():
    assert default_host_id("router") == default_host_id("router") != default_host_id("ranker")


def test_a_flusher_whose_redis_never_answers_starts_and_waits_to_learn(name, caplog):
    """Redis unreachable at the first start: the engine exists (workers attach and record), but it learns
    nothing until it holds the fleet's state, since its configuration was never compared with the fleet's."""
    from sona_shm.engine.client import attach

    config = {k: v for k, v in SMALL.items()}
    flusher = Flusher(name, config_overrides=config, fleet=FleetOptions(url=NOWHERE, key=name, host_id="h1"))
    try:
        assert flusher.layout.fleet_outbox == DEFAULT_FLEET_OUTBOX  # created for a fleet: an outbox by default
        assert "joining in the background" in caplog.text
        with attach(name) as client:
            for _ in range(3):
                assert client.record(Trajectory(np.ones(SMALL["hidden_dim"], np.float32), [], 1.0))
            s = wait_for(lambda: flusher.scan() == 0 and (s := stats.read(name)).fleet.paused and s, what="the flusher to say it waits")
            assert s.trajectories_processed == 0 and s.backlog == 3
            assert s.fleet.epoch == 0 and not s.fleet.connected and s.fleet.paused and s.fleet.host_id == "h1" and s.fleet.key == name
    finally:
        flusher.close()


def test_a_segment_bound_to_a_fleet_refuses_another_key_or_host_id(name):
    flusher = Flusher(name, config_overrides=dict(SMALL), fleet=FleetOptions(url=NOWHERE, key=name, host_id="h1"))
    try:
        state = flusher._state[0]
        state["fleet_epoch"] = 5  # as if it had joined
        flusher._commit()
    finally:
        flusher.close()
    from sona_shm.errors import FleetError

    for options in (FleetOptions(url=NOWHERE, key="other", host_id="h1"), FleetOptions(url=NOWHERE, key=name, host_id="h2")):
        with pytest.raises(FleetError, match=f"is a replica of fleet '{name}' as host 'h1'"):
            Flusher(name, fleet=options)
    # Nor does it learn alone (its adapter is the fleet's), though it may be adopted, e.g. by `sona-shm create`.
    alone = Flusher(name)
    try:
        with pytest.raises(FleetError, match="is a replica of a fleet"):
            alone.scan()
    finally:
        alone.close()


def test_single_host_users_never_import_redis():
    """redis-py is the fleet extra's: nothing else imports it (the flusher, the CLI and the monitor load it only for --fleet)."""
    from support import python_cmd, run

    modules = "sona_shm, sona_shm.engine.flusher, sona_shm.cli, sona_shm.stats, sona_shm.monitor, sona_shm.prometheus"
    code = f"import sys, {modules}; print('redis' in sys.modules)"
    done = run(python_cmd("-c", code), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
