"""A fleet on the multi-host testbed (tests/testbed): hosts with their own /dev/shm behind delayed links, a Redis
primary, its replica and three Sentinels. A Sentinel failover followed through the Sentinels and through a fixed
address; a split brain with and without ``--fleet-min-replicas`` (nothing lost with it).

Every scenario asserts: the trajectories committed = the signals the hosts sealed = what every replica applied + what it
counted lost (alike everywhere), every replica's adapter the same bytes, and no flusher exited. Needs root and the
testbed's tools, redis-server and redis-sentinel (./scripts/test installs them as root); under CI=true nothing skips.
"""

from __future__ import annotations

import pytest
from fleet_agent import FleetHost
from test_testbed import FLEET_FLAGS, _need

from conftest import PROCESS_DEADLINE
from support import wait_for
from testbed import RedisOptions, RedisTopology, Testbed, missing_redis, missing_requirements

pytestmark = pytest.mark.guarantee("many-hosts-learn-one-adapter")

PREFIX = "sonafleet"


@pytest.fixture
def bed(tmp_path):
    """A testbed with a Redis primary (ra), its replica (rb), three Sentinels (s1-s3) and the hosts the test adds."""
    _need(missing_requirements())
    _need(missing_redis())
    made: list[FleetHost] = []
    with Testbed(PREFIX, deadline=PROCESS_DEADLINE, delay=0.0002) as tb:

        def topology(**options) -> RedisTopology:
            nodes = {name: tb.add_host(name) for name in ("ra", "rb", "s1", "s2", "s3")}
            topo = RedisTopology(
                tb,
                primary=nodes["ra"],
                replicas=[nodes["rb"]],
                sentinels=[nodes[s] for s in ("s1", "s2", "s3")],
                options=RedisOptions(**options),
            )
            return topo.start()

        def host(name: str, *fleet_args: str) -> FleetHost:
            h = FleetHost(tb.add_host(name), tmp_path, *FLEET_FLAGS, *fleet_args)
            made.append(h)
            return h

        bed = type("Bed", (), {"tb": tb, "topology": staticmethod(topology), "host": staticmethod(host), "hosts": made, "logs": tmp_path})
        try:
            yield bed
        finally:
            for h in made:
                h.close()
            for h in made:
                print(f"--- {h.name}:", (tmp_path / f"{h.name}.log").read_text()[-3000:])


def sentinel_args(topo: RedisTopology, key: str = "tb") -> list[str]:
    listing = ",".join(f"{node.addr}:{node.port}" for node in topo.sentinels)
    return ["--fleet-sentinel", listing, "--fleet-service", topo.master_name, "--fleet-key", key]


def settle(hosts: list[FleetHost], committed: int, timeout: float = 120.0) -> list[dict]:
    for h in hosts:
        h.flush(timeout)

    def done() -> list[dict] | None:
        views = [h.fleet() for h in hosts]
        ok = all(v and v["fleet"]["applied_signals"] + v["fleet"]["lost_signals"] == committed for v in views)
        return views if ok else None

    return wait_for(done, timeout, "every replica to apply or count everything")


def assert_accounting(hosts: list[FleetHost], views: list[dict], committed: int) -> int:
    """committed = sealed = applied + counted lost on every replica, identical bytes, no flusher exited; the signals lost."""
    for h in hosts:
        assert h.flusher.poll() is None, f"the flusher of {h.name} exited with {h.flusher.returncode}"
    assert sum(v["fleet"]["sealed_signals"] for v in views) == committed
    counted = {(v["fleet"]["applied_signals"], v["fleet"]["lost_signals"], v["fleet"]["lost_entries"]) for v in views}
    assert len(counted) == 1, f"replicas disagree: {counted}"
    assert len({v["adapter"] for v in views}) == 1, "replicas hold different adapters"
    applied, lost, _ = counted.pop()
    assert applied + lost == committed
    return lost


def test_a_sentinel_failover_is_followed_through_the_sentinels_and_through_a_fixed_address(bed):
    """kill -9 of the primary: hosts given the Sentinels follow the promoted replica at once; a host given the old
    primary's address waits until that server is back (as a replica, after it came up from its AOF as a primary for a
    moment: what it took then is lost, counted), then follows the primary it names. Nobody exits; it all balances."""
    topo = bed.topology()
    old, replica = topo.servers
    followers = [bed.host(name, *sentinel_args(topo)) for name in ("h1", "h2")]
    fixed = bed.host("h3", "--fleet", old.url, "--fleet-key", "tb")
    hosts = [*followers, fixed]
    for h in hosts:
        wait_for(h.joined, 60, f"{h.name} to join")
    committed = sum(h.record(i, 30) for i, h in enumerate(hosts))
    settle(hosts, committed)

    old.kill()
    new = topo.wait_failover(old)
    assert new is replica
    committed += sum(h.record(10 + i, 30) for i, h in enumerate(hosts))
    for h in followers:
        h.flush(60)  # through the Sentinels: the new primary took them
    old.start()  # from its AOF: a primary until the Sentinels make it a replica of the new one
    topo.wait_replica_of(old, new)
    committed += sum(h.record(20 + i, 30) for i, h in enumerate(hosts))
    views = settle(hosts, committed)
    assert_accounting(hosts, views, committed)


def test_a_split_brain_loses_what_the_isolated_primary_took_counted_and_nothing_with_min_replicas(bed):
    """The primary is cut off from its replica and the Sentinels while the hosts still reach it; the replica is promoted.
    Two fleets live through it at once. Without --fleet-min-replicas, what its hosts wrote to the isolated primary
    until they followed the Sentinels is lost, counted alike everywhere; with --fleet-min-replicas 1 nothing was applied
    before a replica held it: nothing is lost."""
    topo = bed.topology()
    old, _ = topo.servers
    fleets = {
        0: [bed.host(name, *sentinel_args(topo, "plain")) for name in ("h1", "h2")],
        1: [bed.host(name, *sentinel_args(topo, "safe"), "--fleet-min-replicas", "1") for name in ("h3", "h4")],
    }
    hosts = [h for members in fleets.values() for h in members]
    for h in hosts:
        wait_for(h.joined, 60, f"{h.name} to join")
    committed = {m: sum(h.record(i, 30) for i, h in enumerate(members)) for m, members in fleets.items()}
    for m, members in fleets.items():
        settle(members, committed[m])

    def more(seed: int) -> None:
        for m, members in fleets.items():
            committed[m] += sum(h.record(seed + i, 30) for i, h in enumerate(members))

    topo.split_brain(old)
    more(10)  # to the isolated primary, for a while
    new = topo.wait_failover(old)
    more(20)
    topo.heal()
    topo.wait_replica_of(old, new)
    more(30)
    lost = {m: assert_accounting(members, settle(members, committed[m]), committed[m]) for m, members in fleets.items()}
    print(f"signals lost in the split brain: without --fleet-min-replicas {lost[0]}, with it {lost[1]}")
    assert lost[1] == 0
