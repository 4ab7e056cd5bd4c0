"""Fleets through a real redis-server: engines stand in for hosts, each with its own flusher.

Every test starts its own redis-server (AOF, appendfsync always) on a free loopback port
and kills it by pid afterwards (the ``redis_server`` fixture). Under CI=true these tests
never skip. What is asserted, in every scenario: the signals of the unique (host, seq)
entries in the stream = the trajectories committed fleet-wide = every replica's
``applied_signals``; every replica's adapter is byte-identical to the others and to an
in-process replay of the stream; and one host with the fleet is bit-identical to the
same engine without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest

import sona_shm
from sona_shm import stats
from sona_shm.cli import EXIT_FLEET, EXIT_USAGE
from sona_shm.engine import flusher as flusher_module
from sona_shm.engine.flusher import Flusher
from sona_shm.fleet.member import FleetOptions
from sona_shm.fleet.replica import Snapshot, parse_id
from sona_shm.fleet.window import apply_sealed, read_window, split_windows, write_window
from sona_shm.learn.learner import Window
from sona_shm.learn.routes import feedback_trajectory
from sona_shm.monitor import format_table
from sona_shm.prometheus import exposition
from sona_shm.shm import segment
from sona_shm.shm.layout import EngineConfig
from sona_shm.shm.ledger import Ledger
from sona_shm.store.checkpoint import Checkpoint

from children import RedisServer
from conftest import SMALL, need_redis
from support import make_trajectories, python_cmd, route_table, run, wait_for

H = SMALL["hidden_dim"]
#: The engine of every host (SMALL of conftest, with an outbox), as flusher options.
FLAGS = [
    "--hidden-dim", "16", "--rank", "2", "--lr", "0.01", "--flush-threshold", "10", "--capacity", "64", "--max-steps", "4",
    "--attention-dim", "8", "--lanes", "4", "--lane-slots", "64", "--fleet-outbox", "64",
]  # fmt: skip

pytestmark = pytest.mark.guarantee("many-hosts-learn-one-adapter")


def host(procs, server, engine: str, key: str, *extra: str, pause: str | None = None):
    """Start ``sona-shm flusher`` for ``engine`` as host ``engine`` of fleet ``key``; without a pause hook, wait until
    it holds the fleet's state (learning waits for that: a Redis killed before it would keep it waiting)."""
    env = {"SONA_SHM_TEST_PAUSE": pause} if pause else None
    proc = procs.flusher(engine, *FLAGS, "--fleet", server.url, "--fleet-key", key, "--host-id", engine, *extra, extra_env=env)
    if pause is None:
        wait_for(lambda: fleet_of(engine).epoch != 0, what=f"{engine} to join the fleet")
    return proc


def hosts(procs, server, names, count: int = 3) -> tuple[list[str], str, dict, dict]:
    """``count`` engines as hosts of one fleet (keyed by the first), each with its flusher and a client:
    ``(engines, key, flushers, clients)``."""
    engines = names(count)
    key = engines[0]
    flushers = {e: host(procs, server, e, key) for e in engines}
    return engines, key, flushers, {e: sona_shm.attach(e) for e in engines}


@pytest.fixture(autouse=True)
def _logs_on_failure(request, procs):
    """When a test here fails, show what its flushers said (they run with --quiet: warnings and errors)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in procs.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            print(f"--- flusher pid {proc.pid} ({' '.join(proc.args[3:6])}), exit {proc.returncode}:")
            print(proc.stderr.read()[-4000:] if proc.stderr else "")


def fleet_of(engine: str) -> stats.FleetStats:
    fleet = stats.read(engine).fleet
    assert fleet is not None
    return fleet


def record(client, seed: int, count: int) -> int:
    """Record ``count`` deterministic trajectories; the number accepted (a full lane drops and counts)."""
    return sum(bool(client.record(t)) for t in make_trajectories(seed, count, H, max_steps=4, attention_dim=8))


def settle(clients: dict, engines: list[str], committed: int, timeout: float = 60.0) -> None:
    """Seal and apply everything: each client's flush() waits until its windows came back; then every replica holds it all."""
    for engine in engines:
        if engine in clients:
            clients[engine].flush(timeout=timeout)
    wait_for(lambda: all(fleet_of(e).applied_signals == committed for e in engines), timeout, "every replica to apply everything")


def replay(server, key: str, lr: float = 0.01, routing: bool = False) -> tuple[np.ndarray, np.ndarray, int, set, np.ndarray, np.ndarray]:
    """The adapter of a replica that applies the stream in order, its signals and the (host, seq) seen.

    It starts from the oldest snapshot the fleet keeps (the one at the trim point once the
    stream was trimmed; else the fleet's first, its state when it was created) and applies
    every entry after it, as a joining replica may. Last, the learned route table it ends with (the routing rule's
    rows in use, biases).
    """
    r = server.client()
    try:
        # The snapshots and the stream in one transaction: a host may write a newer snapshot and trim the stream
        # past the older one's cursor between two separate reads.
        pipe = r.pipeline(transaction=True)
        pipe.hgetall(f"sona:{{{key}}}:snap:prev")
        pipe.hgetall(f"sona:{{{key}}}:snap")
        pipe.xrange(f"sona:{{{key}}}:log")
        prev, last, stream = pipe.execute()
    finally:
        r.close()
    snap = Snapshot.from_fields(prev or last)
    rows = [(sid, fields) for sid, fields in stream if parse_id(sid) > snap.cursor]
    checkpoint = Checkpoint.from_bytes(snap.checkpoint, "the oldest snapshot")
    up, down, signals = checkpoint.up.copy(), checkpoint.down.copy(), snap.signals
    vectors = checkpoint.arrays.get("route_vectors", np.zeros((0, H), np.float32)).copy()
    bias = checkpoint.arrays.get("route_bias", np.zeros(0, np.float32)).copy()
    seen: set = set()
    for _, fields in rows:
        if b"r" in fields or b"a" in fields or b"c" in fields:
            continue  # a host registered or removed, windows lost (counted by the replicas, not applied)
        first, last = int(fields[b"s"]), int(fields[b"e"])
        parts = split_windows(fields[b"w"], last - first + 1)
        assert parts is not None, f"entry {fields[b'h']!r} {first}..{last}: its windows do not tile it"
        for seq, raw in enumerate(parts, first):
            pair = (fields[b"h"], seq)
            assert pair not in seen, f"{pair} is in the stream twice"
            seen.add(pair)
            window = read_window(raw, hidden_dim=H, rank=2, routing=routing, max_routes=len(bias))
            assert window.seq == seq
            apply_sealed(up, down, vectors, bias, window, lr)
            signals += window.n
    return up, down, signals, seen, vectors, bias


def assert_replicas(server, key: str, engines: list[str], committed: int, routing: bool = False) -> None:
    """The guarantee: exactly once fleet-wide, identical replicas, equal to a replay of the stream."""
    up, down, signals, *_ = replay(server, key, routing=routing)
    assert signals == committed
    for engine in engines:
        s = stats.read(engine)
        assert s.fleet.applied_signals == committed and s.fleet.lost_entries == 0 and s.fleet.bad_entries == 0
        assert s.adapter.up.tobytes() == up.tobytes(), f"{engine}: up differs from the replay of the stream"
        assert s.adapter.down.tobytes() == down.tobytes(), f"{engine}: down differs from the replay of the stream"
    assert sum(fleet_of(e).sealed_signals for e in engines) == committed


def stopped(proc) -> bool:
    """Whether ``proc`` is stopped (SIGSTOP: state T in /proc)."""
    with open(f"/proc/{proc.pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()[0] == b"T"


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ----------------------------------------------------------------- one host: the fleet changes no bit


def _feedback(table, seed: int, count: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        q = rng.standard_normal(H).astype(np.float32)
        if rng.random() < 0.5:
            out.append(feedback_trajectory(table, q, route=None, reward=None, best=int(rng.integers(4)), unit_reward=True))
        else:
            route, reward = int(rng.integers(4)), float(rng.random())
            out.append(feedback_trajectory(table, q, route=route, reward=reward, best=None, unit_reward=True))
    return out


@pytest.mark.parametrize(
    "rule, path, lag",
    [("reference", "c", None), ("reference", "numpy", None), ("routing", "c", None), ("routing", "c", 0), ("routing", "numpy", 1)],
)
def test_one_host_with_the_fleet_is_bit_identical_to_the_engine_without(redis_server, names, monkeypatch, rule, path, lag):
    if path == "numpy":
        monkeypatch.setattr(flusher_module, "_speedups", None)
    elif flusher_module._speedups is None:
        pytest.skip("the C learners are not built")
    plain_name, fleet_name = names(2)
    table = route_table(H) if rule == "routing" else None
    # An outbox that never fills here: learning never pauses, so the numpy learner's batches are the
    # engine's too (it agrees only to float32 rounding across other batches; the C learners always agree).
    config = EngineConfig(**{**SMALL, "lane_slots": 64}, rule=rule, routes=0 if table is None else len(table), fleet_outbox=256)
    if rule == "routing":
        config = EngineConfig(**{**SMALL, "lane_slots": 64, "lr": 1.0}, rule=rule, routes=len(table), fleet_outbox=256)
    options = FleetOptions(url=redis_server.url, key=fleet_name, host_id="solo", lag=lag)
    plain = Flusher(plain_name, config=config, routes=table)
    fleet = Flusher(fleet_name, config=config, routes=table, fleet=options)
    clients = [sona_shm.attach(plain_name), sona_shm.attach(fleet_name)]
    try:
        wait_for(lambda: fleet.scan() >= 0 and fleet.mode.bound, what="the fleet host to join")
        trajectories = _feedback(table, 7, 700) if table is not None else make_trajectories(7, 700, H, max_steps=4, attention_dim=8)
        rng = np.random.default_rng(3)
        at = 0
        while at < len(trajectories):
            step = int(rng.integers(1, 60))  # uneven batches: windows straddle scans and the ring's end
            for client in clients:
                for t in trajectories[at : at + step]:
                    assert client.record(t)
            at += step
            plain.scan()
            wait_for(lambda: fleet.scan() >= 0 and fleet._tails.sum() == plain._tails.sum(), what="the fleet host to learn it")
        plain.flush_now()
        fleet._flush()
        fleet._commit()
        fleet.mode.answered()
        wait_for(lambda: fleet.scan() >= 0 and fleet.mode.replica.outstanding == 0, what="every window to come back")
        a, b = stats.read(plain_name), stats.read(fleet_name)
        assert (b.fleet.pauses == 0) == (lag is None)  # with --fleet-lag, learning waits for its windows: same bits
        assert a.trajectories_processed == b.trajectories_processed == len(trajectories)
        assert a.flushes_performed == b.flushes_performed and b.fleet.applied_entries == b.flushes_performed
        assert a.adapter.up.tobytes() == b.adapter.up.tobytes()
        assert a.adapter.down.tobytes() == b.adapter.down.tobytes()
        for name in ("route_vectors", "route_bias"):  # the learned route table (empty under the reference rule)
            assert plain.ledger.snapshot()[0][name].tobytes() == fleet.ledger.snapshot()[0][name].tobytes(), name
        assert b.fleet.applied_signals == a.updates_applied
    finally:
        for client in clients:
            client.close()
        plain.close()
        fleet.close()


# ----------------------------------------------------------------- several hosts


def test_three_hosts_learn_one_route_table_under_the_routing_rule(redis_server, names, procs, tmp_path):
    """The routing rule's windows (the deltas of the route rows and biases each window moved, and of the adapter
    with --adapter-lr): every replica ends with the same learned table, the replay of the stream, bit for bit."""
    table = route_table(H)
    routes = tmp_path / "routes.npz"
    table.save(routes)
    engines = names(3)
    key = engines[0]
    rule = ("--rule", "routing", "--routes", str(routes), "--adapter-lr", "0.01")
    for engine in engines:
        host(procs, redis_server, engine, key, *rule)
    clients = {e: sona_shm.attach(e) for e in engines}
    committed = 0
    for round_ in range(3):
        for i, engine in enumerate(engines):
            committed += sum(bool(clients[engine].record(t)) for t in _feedback(table, 10 * round_ + i, 70))
    settle(clients, engines, committed)
    up, down, signals, _, vectors, bias = replay(redis_server, key, lr=0.01, routing=True)
    assert signals == committed
    assert not np.array_equal(vectors, table.unit)  # the table learned
    for engine in engines:
        s = stats.read(engine)
        assert s.fleet.applied_signals == committed and s.fleet.lost_entries == 0 and s.fleet.bad_entries == 0
        assert s.adapter.up.tobytes() == up.tobytes() and s.adapter.down.tobytes() == down.tobytes(), engine
        seg = segment.Segment.open(engine)
        try:
            ledger = Ledger(seg)
            got_vectors, got_bias = ledger.read("route_vectors", "route_bias")
            ledger.close()
        finally:
            seg.close()
        assert got_vectors[: len(table)].tobytes() == vectors.tobytes(), engine
        assert got_bias[: len(table)].tobytes() == bias.tobytes(), engine
    for client in clients.values():
        client.close()


def test_three_hosts_and_a_fourth_that_joins_late(redis_server, names, procs):
    engines = names(4)
    key = engines[0]
    for engine in engines[:3]:
        host(procs, redis_server, engine, key, "--fleet-snapshot-interval", "0.2")
    clients = {e: sona_shm.attach(e) for e in engines[:3]}
    committed = 0
    for round_ in range(3):
        for i, engine in enumerate(engines[:3]):
            committed += record(clients[engine], 10 * round_ + i, 55)
    settle(clients, engines[:3], committed)
    assert_replicas(redis_server, key, engines[:3], committed)
    s = wait_for(lambda: (f := fleet_of(engines[0])).lag_s == 0 and f, what="the lag to be 0")  # the line is written every 20 ms
    assert s.connected and s.hosts == 3 and s.outbox == 0 and s.outstanding == 0 and s.last_applied_id
    assert stats.read(engines[0]).as_dict()["fleet"]["key"] == key
    # The monitor's table and the Prometheus text show the same.
    table = format_table(stats.read(engines[1]))
    assert "fleet link" in table and "fleet replica" in table and f"{committed:,}" in table and "connected" in table
    text = exposition(stats.read(engines[1])).decode()
    assert f'sona_shm_fleet_applied_signals_total{{engine="{engines[1]}"}} {float(committed)}' in text
    assert f'sona_shm_fleet_info{{engine="{engines[1]}",host_id="{engines[1]}",key="{key}"}} 1.0' in text
    assert f'sona_shm_fleet_connected{{engine="{engines[1]}"}} 1.0' in text

    # A fourth host joins late: it loads a snapshot, replays the rest and is the same replica.
    wait_for(lambda: redis_server.client().hget(f"sona:{{{key}}}:snap", "id") not in (None, b"0-0"), what="a snapshot")
    host(procs, redis_server, engines[3], key)
    wait_for(lambda: fleet_of(engines[3]).applied_signals == committed, what="the late host to catch up")
    clients[engines[3]] = sona_shm.attach(engines[3])
    for i, engine in enumerate(engines):
        committed += record(clients[engine], 100 + i, 40)
    settle(clients, engines, committed)
    assert_replicas(redis_server, key, engines, committed)
    assert fleet_of(engines[3]).hosts == 4
    for client in clients.values():
        client.close()


def test_flushers_killed_at_any_point_lose_and_repeat_nothing(redis_server, names, procs):
    engines, key, flushers, clients = hosts(procs, redis_server, names)
    committed = 0
    rng = np.random.default_rng(11)
    # Deterministic points first (test-only pause hooks: the process stops itself there), then random instants.
    points = ["xadd", "seal", "apply", "publish", None, None, None, None]
    for round_, point in enumerate(points):
        victim = engines[round_ % 3]
        if point is not None:
            kill(flushers[victim])
            flushers[victim] = host(procs, redis_server, victim, key, pause=point)
        for i, engine in enumerate(engines):
            committed += record(clients[engine], 1000 + 10 * round_ + i, 45)
        if point is not None:
            paused = flushers[victim]
            wait_for(lambda: stopped(paused), what=f"the flusher to stop itself at {point!r}")  # noqa: B023
        else:
            time.sleep(float(rng.uniform(0, 0.05)))  # a random instant of its work, not a synchronisation
        kill(flushers[victim])
        flushers[victim] = host(procs, redis_server, victim, key)
    settle(clients, engines, committed)
    assert_replicas(redis_server, key, engines, committed)
    for client in clients.values():
        client.close()


def test_redis_killed_and_restarted_then_partitioned(redis_server, names, procs):
    engines, key, _, clients = hosts(procs, redis_server, names)
    committed = sum(record(clients[e], i, 30) for i, e in enumerate(engines))

    # kill -9: learning goes on into the outboxes; the restarted server replays its AOF.
    redis_server.kill()
    committed += sum(record(clients[e], 10 + i, 30) for i, e in enumerate(engines))
    wait_for(lambda: not fleet_of(engines[0]).connected, what="the hosts to notice")
    wait_for(lambda: all(fleet_of(e).outbox > 0 for e in engines), what="windows to wait in the outboxes")
    redis_server.restart()
    settle(clients, engines, committed)
    assert_replicas(redis_server, key, engines, committed)

    # SIGSTOP: a partition (connections hang, nothing answers) for as long as it takes the hosts to see it.
    redis_server.pause()
    try:
        committed += sum(record(clients[e], 20 + i, 30) for i, e in enumerate(engines))
        wait_for(lambda: all(not fleet_of(e).connected and fleet_of(e).outbox > 0 for e in engines), what="the hosts to see it")
        workers_still_served = stats.read(engines[0]).adapter.up.tobytes()
        assert workers_still_served == stats.read(engines[1]).adapter.up.tobytes()  # the last fleet adapter, the same everywhere
    finally:
        redis_server.resume()
    settle(clients, engines, committed)
    assert_replicas(redis_server, key, engines, committed)
    wait_for(lambda: all(fleet_of(e).connected for e in engines), what="every host to be connected again")
    for client in clients.values():
        client.close()


def test_a_lagging_host_behind_the_trim_point_resyncs_from_the_snapshot(redis_server, names, procs):
    engines = names(3)
    key = engines[0]
    flushers = {e: host(procs, redis_server, e, key, "--fleet-snapshot-interval", "0.1") for e in engines}
    clients = {e: sona_shm.attach(e) for e in engines}
    committed = sum(record(clients[e], i, 40) for i, e in enumerate(engines))
    settle(clients, engines, committed)
    lagging = engines[2]
    kill(flushers[lagging])  # away (a host down for a while): it reads nothing
    behind = fleet_of(lagging).last_applied_id
    committed += record(clients[lagging], 50, 20)  # committed to its lanes; learned when it is back
    r = redis_server.client()

    def trimmed_past_it() -> bool:
        nonlocal committed
        for i, engine in enumerate(engines[:2]):
            committed += record(clients[engine], 60 + i, 10)
            clients[engine].flush(timeout=30)
        trimmed = r.get(f"sona:{{{key}}}:trimmed")
        return trimmed is not None and tuple(map(int, trimmed.split(b"-"))) > tuple(map(int, behind.split("-")))

    wait_for(trimmed_past_it, 60, "the stream to be trimmed past the lagging host")
    r.close()
    flushers[lagging] = host(procs, redis_server, lagging, key, "--fleet-snapshot-interval", "0.1")
    settle(clients, engines, committed)
    assert fleet_of(lagging).resyncs >= 1 and all(fleet_of(e).resyncs == 0 for e in engines[:2])
    assert_replicas(redis_server, key, engines, committed)
    for client in clients.values():
        client.close()


def test_the_fleet_refuses_what_does_not_fit(redis_server, names, procs):
    first, other, plain = names(3)
    key = first
    host(procs, redis_server, first, key)
    base = python_cmd("-m", "sona_shm", "flusher", "--name", other, "--quiet", "--fleet", redis_server.url, "--fleet-key", key)
    # Another configuration than the fleet's.
    done = run([*base, *FLAGS[:4], "--lr", "0.5", *FLAGS[6:], "--host-id", other], timeout=60)
    assert done.returncode == EXIT_FLEET and "refuses this engine (lr: the fleet's is 0.01, this engine's 0.5)" in done.stderr
    segment.unlink(other)
    # A host id a live flusher holds.
    done = run([*base, *FLAGS, "--host-id", first], timeout=60)
    assert (
        done.returncode == EXIT_FLEET
        and f"host id {first!r} is held by another flusher's lease" in done.stderr
        and "a live flusher holds it" in done.stderr
    )
    segment.unlink(other)
    # A segment made without an outbox.
    done = run(python_cmd("-m", "sona_shm", "create", "--name", plain, *FLAGS[:-2]), timeout=60)
    assert done.returncode == 0
    done = run(python_cmd("-m", "sona_shm", "flusher", "--name", plain, "--fleet", redis_server.url), timeout=60)
    assert done.returncode == EXIT_FLEET and "without a fleet outbox" in done.stderr
    # Fleet options without --fleet, and a URL that is not one.
    done = run(python_cmd("-m", "sona_shm", "flusher", "--name", plain, "--host-id", "x"), timeout=60)
    assert done.returncode == EXIT_USAGE and "--host-id: needs --fleet URL" in done.stderr
    done = run(python_cmd("-m", "sona_shm", "flusher", "--name", plain, "--fleet", "http://x"), timeout=60)
    assert done.returncode == EXIT_USAGE and "--fleet: expected a Redis URL" in done.stderr
    assert os.path.exists(f"/dev/shm/sona_shm.{plain}")


def test_writes_a_failover_lost_are_counted_the_same_everywhere_and_replicas_resync(redis_server, names, procs, tmp_path):
    """A failover that lost writes, played by restarting Redis from an older copy of its data."""
    engines, key, _, clients = hosts(procs, redis_server, names)
    committed = sum(record(clients[e], i, 30) for i, e in enumerate(engines))
    settle(clients, engines, committed)
    aof = os.path.join(redis_server.directory, "appendonlydir")
    redis_server.pause()  # a consistent copy: what the replica that will be promoted holds
    shutil.copytree(aof, tmp_path / "replica")
    redis_server.resume()
    lost = sum(record(clients[e], 10 + i, 30) for i, e in enumerate(engines))  # applied everywhere, then lost
    settle(clients, engines, committed + lost)
    redis_server.kill()
    shutil.rmtree(aof)
    shutil.copytree(tmp_path / "replica", aof)
    redis_server.start()  # the promoted replica: it never had those windows
    committed += sum(record(clients[e], 20 + i, 30) for i, e in enumerate(engines))  # each host's next window shows the gap
    for client in clients.values():
        client.flush(timeout=60)
    wait_for(
        lambda: all(fleet_of(e).applied_signals == committed and fleet_of(e).lost_signals == lost for e in engines),
        60,
        "every replica to count the loss",
    )
    up, down, signals, *_ = replay(redis_server, key)
    assert signals == committed
    lost_entries = {fleet_of(e).lost_entries for e in engines}
    assert len(lost_entries) == 1 and lost_entries.pop() > 0
    for engine in engines:
        s = stats.read(engine)
        assert s.fleet.resyncs >= 1  # each had applied windows the stream no longer has
        assert s.adapter.up.tobytes() == up.tobytes() and s.adapter.down.tobytes() == down.tobytes()
    assert sum(fleet_of(e).sealed_signals for e in engines) == committed + lost
    for client in clients.values():
        client.close()


def test_a_password_comes_in_the_url_and_a_wrong_one_is_refused(names, procs, tmp_path):
    need_redis()
    server = RedisServer(str(tmp_path), password="s3cret").start()
    try:
        engine, other = names(2)
        host(procs, server, engine, engine)  # redis://:s3cret@127.0.0.1:PORT/0
        assert fleet_of(engine).connected or wait_for(lambda: fleet_of(engine).connected, what="the host to connect")
        wrong = server.url.replace("s3cret", "wrong")
        done = run(python_cmd("-m", "sona_shm", "flusher", "--name", other, "--quiet", *FLAGS, "--fleet", wrong), timeout=60)
        assert done.returncode == EXIT_FLEET and "refused the credentials" in done.stderr and "wrong" not in done.stderr
    finally:
        server.close()


def test_a_redis_that_lost_everything_is_made_again_from_a_host(redis_server, names, procs):
    """FLUSHALL (or a restart without persistence): the first host to notice creates the fleet again from its
    state, with a new epoch; the others load it; nothing learned since is lost, and the replicas agree."""
    engines, key, _, clients = hosts(procs, redis_server, names)
    committed = sum(record(clients[e], i, 30) for i, e in enumerate(engines))
    settle(clients, engines, committed)
    epoch = fleet_of(engines[0]).epoch
    r = redis_server.client()
    r.flushall()
    r.close()
    wait_for(lambda: all(fleet_of(e).epoch not in (0, epoch) for e in engines), what="a new fleet, joined by every host")
    committed += sum(record(clients[e], 10 + i, 30) for i, e in enumerate(engines))
    settle(clients, engines, committed)
    assert_replicas(redis_server, key, engines, committed)
    assert len({fleet_of(e).epoch for e in engines}) == 1 and sum(fleet_of(e).resyncs for e in engines) >= 2
    for client in clients.values():
        client.close()


def test_the_lease_scripts_tell_taken_from_unknown(redis_server):
    """renew(): True for the holder, False when another engine holds or registered the host id, None when the
    fleet does not know the host id (made again after Redis lost it: join anew, not a conflict)."""
    from sona_shm.fleet.stream import FleetLog, connect

    fleet = FleetLog(connect(redis_server.url, timeout=5.0), "lease")
    try:
        assert fleet.renew("h", "a" * 32) is None
        r = redis_server.client()
        r.hset("sona:{lease}:hosts", "h", "a" * 32)
        assert fleet.renew("h", "a" * 32) is True and fleet.renew("h", "b" * 32) is False
        r.delete("sona:{lease}:lease:h")
        assert fleet.renew("h", "b" * 32) is False  # registered to another segment
        r.close()
    finally:
        fleet.close()


def test_the_publish_script_appends_each_window_once_in_entries_of_consecutive_windows(redis_server):
    """Windows past the host's last go in entries of at most entry_windows; a repeat (an answer lost) appends nothing;
    windows after a gap are stamped with the last seq before them; a caller without the lease appends nothing."""
    from sona_shm.fleet.replica import host_key
    from sona_shm.fleet.stream import FleetLog, NeedsHealing, connect

    def window(seq: int) -> bytes:
        out = np.zeros(64 + 8 * H, np.uint8)
        return out[: write_window(out, Window(np.full((1, H), seq, float), 1), rank=2, seq=seq, cum=seq, sealed_at=1.0)].tobytes()

    fleet = FleetLog(connect(redis_server.url, timeout=5.0), "pub")
    r = redis_server.client()
    try:
        r.set("sona:{pub}:lease:h", "t" * 32)
        r.hset("sona:{pub}:meta", "epoch", "1")
        r.hset("sona:{pub}:seqs", "-", "0")
        who = {"host_id": "h", "host_key": f"{host_key('h'):016x}", "token": "t" * 32}

        def publish(**kw) -> int | None:
            done = fleet.publish(**kw)
            return None if done is None else done.last_seq

        assert publish(first_seq=1, windows=[window(s) for s in range(1, 8)], entry_windows=3, **who) == 7
        assert publish(first_seq=1, windows=[window(s) for s in range(1, 8)], entry_windows=3, **who) == 7  # a repeat
        # Overlapping: grouped [6, 7, 8] [9], the script cuts 6 and 7 off the first.
        assert publish(first_seq=6, windows=[window(s) for s in range(6, 10)], entry_windows=3, **who) == 9
        assert publish(first_seq=12, windows=[window(12)], **who) == 12  # 10 and 11 lost: the gap shows in p
        assert publish(first_seq=13, windows=[window(13)], token="z" * 32, host_id="h", host_key=who["host_key"]) is None
        entries = [(int(f[b"s"]), int(f[b"e"]), int(f[b"p"]), len(f[b"w"])) for _, f in r.xrange("sona:{pub}:log")]
        size = len(window(1))
        assert entries == [(1, 3, 0, 3 * size), (4, 6, 3, 3 * size), (7, 7, 6, size), (8, 8, 7, size), (9, 9, 8, size), (12, 12, 9, size)]
        assert r.hget("sona:{pub}:seqs", who["host_key"]) == b"12"
        assert publish(first_seq=13, windows=[window(13), window(14)], entry_bytes=size, **who) == 14  # bytes bound too
        # A gap entry: windows up to 20 are gone (Redis lost them after the host retired them), the host's total then 70.
        assert publish(first_seq=0, windows=[], gap=(20, 70), **who) == 20
        gap = r.xrange("sona:{pub}:log")[-1][1]
        assert (gap[b"s"], gap[b"e"], gap[b"p"], gap[b"c"], gap[b"w"]) == (b"21", b"20", b"14", b"70", b"")
        assert publish(first_seq=0, windows=[], gap=(20, 70), **who) == 20 and r.xlen("sona:{pub}:log") == 9  # once
        # Redis lost the hosts' last seqs: the script asks for healing (joining rebuilds them) and appends nothing.
        r.delete("sona:{pub}:seqs")
        with pytest.raises(NeedsHealing):
            fleet.publish(first_seq=21, windows=[window(21)], **who)
        assert [int(f[b"s"]) for _, f in r.xrange("sona:{pub}:log")][-3:-1] == [13, 14]
    finally:
        r.close()
        fleet.close()


def test_a_fleet_of_another_stream_protocol_is_refused(redis_server):
    """Entries carry runs of windows (field e) since protocol 2: a fleet a build of protocol 1 made (one window an
    entry, no e) must be refused at join, not joined to count every entry of its stream bad (and to write entries its
    other hosts cannot read)."""
    from sona_shm.fleet.replica import host_key
    from sona_shm.fleet.stream import PROTOCOL, FleetError, FleetLog, connect

    fleet = FleetLog(connect(redis_server.url, timeout=5.0), "proto")
    r = redis_server.client()
    try:
        config = '{"hidden_dim": 16}'
        who = dict(
            config=config, new_epoch=5, host_id="h", host_key=f"{host_key('h'):016x}", max_hosts=4, takeover=False, snapshot={}, now=1.0
        )
        r.hset("sona:{proto}:meta", mapping={"config": config, "epoch": "3", "created_at": "1.0", "protocol": "1"})
        with pytest.raises(FleetError, match="protocol"):
            fleet.join(token="t" * 32, **who)
        assert r.get("sona:{proto}:lease:h") is None  # nothing taken
        r.hset("sona:{proto}:meta", "protocol", PROTOCOL)
        r.hset("sona:{proto}:seqs", "-", "0")
        assert fleet.join(token="t" * 32, **who).epoch == 3
    finally:
        r.close()
        fleet.close()
