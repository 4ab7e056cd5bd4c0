"""The multi-host testbed (tests/testbed): private /dev/shm per host, delayed links, partitions,
a Sentinel failover and a split brain, and teardown that leaves nothing behind — with real
namespaces, TUN devices, redis-server and redis-sentinel processes.

Every test builds its own testbed (prefix ``sonatest``) and removes it, also when it fails.
Without root (or the tools) they skip; under CI=true they never skip. Timing is asserted only
as a lower bound (a packet never arrives before its configured delay); everything else waits on
conditions with generous timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from sona_shm.shm.segment import start_ticks

from children import process_running
from conftest import PROCESS_DEADLINE
from support import ROOT, env, popen, wait_for
from testbed import (
    EchoServer,
    RedisOptions,
    RedisTopology,
    Testbed,
    clean_stale,
    missing_redis,
    missing_requirements,
    ping,
    tcp_round_trips,
)
from testbed.hosts import NETNS_DIR, STATE_DIR
from testbed.redis_topology import client as redis_client

PREFIX = "sonatest"


def _need(missing: list[str]) -> None:
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the testbed needs {', '.join(missing)} under CI=true (./scripts/test runs as root and installs the packages)")
        pytest.skip(f"the testbed needs {', '.join(missing)}")


@pytest.fixture
def tb():
    """A started testbed of this test; removed afterwards (processes killed by pid, namespaces and mounts gone)."""
    _need(missing_requirements())
    with Testbed(PREFIX, deadline=PROCESS_DEADLINE) as testbed:
        yield testbed


@pytest.fixture
def topology(tb):
    """``topology(**options)``: a primary (host ``ra``), a replica (``rb``) and three Sentinels (``s1``–``s3``),
    plus a client host ``app``; started, and killed afterwards."""
    _need(missing_redis())
    made: list[RedisTopology] = []

    def make(**options) -> RedisTopology:
        hosts = {name: tb.add_host(name) for name in ("ra", "rb", "s1", "s2", "s3", "app")}
        topo = RedisTopology(
            tb,
            primary=hosts["ra"],
            replicas=[hosts["rb"]],
            sentinels=[hosts["s1"], hosts["s2"], hosts["s3"]],
            options=RedisOptions(**options),
        )
        made.append(topo)
        return topo.start()

    yield make
    for topo in made:
        topo.close()


def netns_of(name: str) -> list[str]:
    return sorted(e for e in os.listdir(NETNS_DIR) if e.startswith(f"{name}-")) if NETNS_DIR.is_dir() else []


SHM_WRITE = (
    "import _posixshmem, os, sys; fd = _posixshmem.shm_open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600); os.write(fd, sys.argv[2].encode())"
)
SHM_READ = "import _posixshmem, os, sys; fd = _posixshmem.shm_open(sys.argv[1], os.O_RDONLY, 0); print(os.read(fd, 64).decode())"


def test_each_host_has_its_own_dev_shm(tb):
    a, b = tb.add_host("a"), tb.add_host("b")
    name = f"/{tb.name}-probe"
    a.exec([sys.executable, "-c", SHM_WRITE, name, "written in a"])
    assert a.exec([sys.executable, "-c", SHM_READ, name]).stdout.strip() == "written in a"  # another process of the host sees it
    other = b.exec([sys.executable, "-c", SHM_READ, name], check=False)
    assert other.returncode == 1 and "FileNotFoundError" in other.stderr
    assert not os.path.exists(f"/dev/shm{name}")  # nor does the machine outside the hosts
    b.exec([sys.executable, "-c", SHM_WRITE, name, "written in b"])  # the same name, another object
    assert a.exec([sys.executable, "-c", SHM_READ, name]).stdout.strip() == "written in a"
    assert b.exec([sys.executable, "-c", SHM_READ, name]).stdout.strip() == "written in b"


def test_hosts_have_their_own_network(tb):
    a, b = tb.add_host("a"), tb.add_host("b")
    assert (a.addr, b.addr) == ("10.200.0.1", "10.200.0.2")
    shown = a.exec(["ip", "-o", "-4", "addr", "show"]).stdout
    assert "10.200.0.1/16" in shown and "10.200.0.2" not in shown
    assert None not in ping(a, b.addr, count=3, timeout=10)
    assert None not in ping(b, a.addr, count=3, timeout=10)
    stats = tb.statistics()
    assert stats.pair("a", "b").forwarded >= 3 and stats.pair("b", "a").forwarded >= 3
    assert not os.path.exists("/sys/class/net/tb0")  # the TUN devices live in the hosts only


@pytest.mark.parametrize("delay", [0.0001, 0.001, 0.02])
def test_the_configured_delay_is_a_lower_bound_of_ping_and_tcp_round_trips(tb, delay):
    a, b, c = tb.add_host("a"), tb.add_host("b"), tb.add_host("c")
    tb.set_delay(a, b, delay)
    rtts = ping(a, b.addr, count=10, timeout=10)
    assert None not in rtts  # the links lose nothing
    assert min(rtts) >= 2 * delay
    tcp = tcp_round_trips(a, b, count=20)
    assert min(tcp) >= 2 * delay
    # One way only: b -> a has no delay now, a -> b still has.
    tb.set_delay(b, a, 0.0, both_ways=False)
    one_way = ping(a, b.addr, count=5, timeout=10)
    assert None not in one_way and min(one_way) >= delay
    # The default applies to every pair without a delay of its own.
    tb.set_default_delay(delay)
    other = ping(a, c.addr, count=5, timeout=10)
    assert None not in other and min(other) >= 2 * delay
    assert tb.statistics().write_errors == 0


def test_a_partition_drops_traffic_between_its_sides_and_heal_restores_it(tb):
    a, b, c = tb.add_host("a"), tb.add_host("b"), tb.add_host("c")
    with EchoServer(b) as echo:
        established = a.connect(echo.addr, echo.port, timeout=60)
        established.sendall(b"before")
        assert established.recv(16) == b"before"
        tb.partition([a], [b])
        assert ping(a, b.addr, count=3, timeout=0.3) == [None, None, None]
        assert ping(b, a.addr, count=2, timeout=0.3) == [None, None]
        assert None not in ping(a, c.addr, count=2, timeout=10) and None not in ping(c, b.addr, count=2, timeout=10)  # on neither side
        with pytest.raises(OSError):  # no new connection (timeout: the SYN is dropped, not refused)
            a.connect(echo.addr, echo.port, timeout=0.5).close()
        established.sendall(b"during")  # TCP retransmits it until the partition heals
        dropped = tb.statistics().pair("a", "b").dropped
        assert dropped >= 4
        assert tb.statistics().blocked == (("a", "b"), ("b", "a"))
        tb.heal()
        assert tb.statistics().blocked == ()
        assert wait_for(lambda: ping(a, b.addr, count=1, timeout=1.0) != [None], 30, "a ping across the healed partition")
        assert established.recv(16) == b"during"
        established.close()
        a.connect(echo.addr, echo.port, timeout=30).close()


def test_a_sentinel_failover_promotes_the_replica_and_the_old_primary_rejoins_from_its_aof(tb, topology):
    topo = topology()
    old, replica = topo.servers
    app = tb.host("app")
    assert topo.primary() is old
    assert set(topo.sentinel_views().values()) == {(old.addr, old.port)}
    primary = old.client(via=app)
    primary.set("fleet", "kept")
    assert primary.execute_command("WAIT", 1, 10000) == 1  # the replica has it
    primary.close()

    old.kill()
    new = topo.wait_failover(old)
    assert new is replica
    assert set(topo.sentinel_views().values()) == {(replica.addr, replica.port)}
    assert topo.primary() is replica
    assert replica.role()[0] == "master"
    assert replica.client(via=app).get("fleet") == "kept"

    old.start()  # from its AOF; the Sentinels turn it into a replica of the new primary
    topo.wait_replica_of(old, replica)
    assert old.client().get("fleet") == "kept"


@pytest.mark.parametrize("min_replicas", [0, 1])
def test_a_split_brain_promotes_the_replica_and_the_old_primary_loses_or_refuses_writes(tb, topology, min_replicas):
    import redis

    topo = topology(min_replicas_to_write=min_replicas, min_replicas_max_lag=1)
    old, replica = topo.servers
    app = tb.host("app")
    cut = topo.split_brain()
    assert {h.name for h in cut} == {"rb", "s1", "s2", "s3"}
    new = topo.wait_failover(old)
    assert new is replica
    writer = old.client(via=app)  # the app host still reaches the old primary
    if min_replicas == 0:
        writer.set("written", "to the old primary")  # accepted: a failover loses it
        assert writer.get("written") == "to the old primary"
    else:

        def refused() -> bool:
            try:
                writer.set("written", "to the old primary")
            except redis.ResponseError as exc:
                return str(exc).startswith("NOREPLICAS")
            return False

        assert wait_for(refused, 30, "the old primary to refuse writes without a replica")
    writer.close()
    topo.heal()
    topo.wait_replica_of(old, replica)  # the Sentinels demote it
    assert replica.client(via=app).get("written") is None
    assert old.client().get("written") is None  # its write was lost in the resync
    assert topo.primary() is replica


def test_the_options_reach_every_server_and_a_paused_server_answers_again_when_resumed(tb, topology):
    import redis

    topo = topology(appendfsync="everysec", maxmemory="64mb", maxmemory_policy="noeviction", min_replicas_to_write=1, password="tb-secret")
    for node in topo.servers:
        c = node.client()
        assert c.config_get("appendonly")["appendonly"] == "yes"
        assert c.config_get("appendfsync")["appendfsync"] == "everysec"
        assert c.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
        assert c.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert c.config_get("min-replicas-to-write")["min-replicas-to-write"] == "1"
        c.close()
    primary = topo.servers[0]
    anonymous = redis_client(primary.host, primary.addr, primary.port, via=tb.host("app"))
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("x")
    anonymous.close()
    replica = topo.servers[1]
    replica.pause()
    c = replica.client(via=tb.host("app"), timeout=0.5)
    with pytest.raises(redis.TimeoutError):
        c.ping()
    replica.resume()
    assert wait_for(lambda: replica.role() is not None, 30, "the resumed replica to answer")
    c.close()


def test_teardown_leaves_no_namespace_mount_file_or_process():
    _need(missing_requirements())
    with pytest.raises(RuntimeError, match="the test failed"):
        with Testbed(PREFIX, deadline=PROCESS_DEADLINE) as inner:
            a, b = inner.add_host("a"), inner.add_host("b")
            sleeper = a.run(["sleep", "600"])
            orphan = b.exec(["sh", "-c", "sleep 600 > /dev/null 2>&1 & echo $!"]).stdout.strip()  # a process no one waits for
            hosts_pids = [(pid, start_ticks(pid)) for pid in (sleeper.pid, int(orphan))]
            forwarder = (inner.links.proc.pid, start_ticks(inner.links.proc.pid))
            assert netns_of(inner.name) == [f"{inner.name}-a", f"{inner.name}-b"]
            assert (STATE_DIR / inner.name / "a.mnt").exists()
            data = inner.tmpdir("data")
            raise RuntimeError("the test failed")
    assert netns_of(inner.name) == []
    assert not (STATE_DIR / inner.name).exists()
    assert not data.exists()
    assert not any(process_running(pid, ticks) for pid, ticks in [*hosts_pids, forwarder])
    mounts = open("/proc/self/mountinfo").read()
    assert inner.name not in mounts
    assert not [e for e in os.listdir("/sys/class/net") if e.startswith("tb")]
    inner.close()  # twice is fine


KILLED_RUN = """
import sys, time
from testbed import Testbed
tb = Testbed(sys.argv[1]).start()
host = tb.add_host("a")
orphan = host.exec(["sh", "-c", "sleep 120 > /dev/null 2>&1 & echo $!"]).stdout.strip()
data = tb.tmpdir("redis")
print(tb.name, orphan, data, flush=True)
time.sleep(600)
"""


def test_a_testbed_left_by_a_killed_run_is_removed_by_the_next_run():
    _need(missing_requirements())
    prefix = "sonastale"
    proc = popen([sys.executable, "-c", KILLED_RUN, prefix], deadline=PROCESS_DEADLINE, stdout=subprocess.PIPE, text=True, env=env())
    try:
        name, orphan, data = proc.stdout.readline().split()
        orphan_ticks = start_ticks(int(orphan))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert netns_of(name) == [f"{name}-a"]  # left behind, with a process in it
        assert process_running(int(orphan), orphan_ticks)
        assert os.path.isdir(data)
        assert name in clean_stale(prefix)
        assert netns_of(name) == []
        assert not (STATE_DIR / name).exists()
        assert not os.path.exists(data)
        assert not process_running(int(orphan), orphan_ticks)
        assert clean_stale(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        clean_stale(prefix)


def test_misuse_fails_early_with_the_way_out():
    with pytest.raises(ValueError, match="prefix"):
        Testbed("Bad-Prefix")
    unstarted = Testbed(PREFIX)
    with pytest.raises(RuntimeError, match="start the testbed first"):
        unstarted.add_host("a")
    unstarted.close()


def test_a_host_name_is_checked(tb):
    with pytest.raises(ValueError, match="name"):
        tb.add_host("no/slash")
    tb.add_host("a")
    with pytest.raises(ValueError, match="exists"):
        tb.add_host("a")


#: The engine of both hosts below (the small engine of test_fleet_redis.py), as flusher options.
FLEET_FLAGS = [
    "--hidden-dim", "16", "--rank", "2", "--lr", "0.01", "--flush-threshold", "10", "--capacity", "64", "--max-steps", "4",
    "--attention-dim", "8", "--lanes", "4", "--lane-slots", "64", "--fleet-outbox", "64",
]  # fmt: skip


def host_stats(host, engine: str) -> dict | None:
    """``sona-shm stats --json`` of ``engine`` as host ``host`` sees it (None: no such segment there)."""
    done = host.exec([sys.executable, "-m", "sona_shm", "stats", "--name", engine, "--json"], check=False, env=env())
    return json.loads(done.stdout) if done.returncode in (0, 6) else None


def test_two_hosts_with_one_engine_name_learn_one_adapter_through_redis_across_the_links(tb):
    """What the fleet scripts will do: one segment name in each host (their /dev/shm are their own), one
    flusher per host, one Redis in a third host, every byte between them over 1 ms links."""
    _need(missing_redis())
    tb.set_default_delay(0.001)
    a, b, r = tb.add_host("a"), tb.add_host("b"), tb.add_host("r")
    redis_server = RedisTopology(tb, primary=r, replicas=[], sentinels=[]).start()
    engine = f"{tb.name}-router"
    try:
        for host in (a, b):
            host.run(
                [sys.executable, "-m", "sona_shm", "flusher", "--name", engine, "--quiet", *FLEET_FLAGS,
                 "--fleet", redis_server.servers[0].url, "--fleet-key", "testbed", "--host-id", host.name],
                env=env(), stdout=subprocess.DEVNULL,
            )  # fmt: skip
        for host in (a, b):
            wait_for(lambda host=host: (s := host_stats(host, engine)) and s["fleet"]["epoch"] != 0, 60, f"{host.name} to join the fleet")
        assert not os.path.exists(f"/dev/shm/sona_shm.{engine}")  # the segments are the hosts'
        for host, seed in ((a, 1), (b, 2)):
            host.exec([sys.executable, str(ROOT / "tests" / "producer.py"), engine, "--seed", str(seed), "--count", "40"], env=env())
            host.exec([sys.executable, "-c", f"import sona_shm; sona_shm.attach({engine!r}).flush(timeout=60)"], env=env())

        def settled() -> list[dict] | None:
            views = [host_stats(h, engine) for h in (a, b)]
            return views if all(v["fleet"]["applied_signals"] == 80 for v in views) else None

        views = wait_for(settled, 60, "both hosts to apply the 80 trajectories of both")
        assert [v["fleet"]["hosts"] for v in views] == [2, 2]
        assert views[0]["adapter"] == views[1]["adapter"] and views[0]["adapter"]["up_norm"] > 0
        assert tb.statistics().pair("a", "r").forwarded > 0 and tb.statistics().pair("b", "r").forwarded > 0
    finally:
        redis_server.close()
