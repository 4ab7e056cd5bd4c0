"""A multi-host testbed on one machine: hosts with their own network stack and ``/dev/shm``, links with a
delay per pair and partitions, and Redis (primary, replica, Sentinels) in those hosts.

For the fleet tests and scripts (``scripts/bench_fleet.py``, ``scripts/soak.py``): every host runs
its own flusher on its own segment (POSIX shared memory is per host, as on real machines) and
reaches Redis only over the testbed's links, whose delay and partitions the test controls.

How it is built
---------------
- **A host** is a network namespace (``ip netns add PREFIX-PID-N-HOST``) and a mount namespace
  bound to ``/run/sona-testbed/PREFIX-PID-N/HOST.mnt`` (``unshare --mount=FILE --propagation
  private``) with a tmpfs of its own on ``/dev/shm``. The rest of the file system is the
  machine's. :meth:`Host.run` starts a process in both namespaces (``setns`` between fork and
  exec, the Python equivalent of ``nsenter --net --mount``); the process dies with the thread
  that started it (``PR_SET_PDEATHSIG``) and after the testbed's deadline (SIGALRM).
  :meth:`Host.socket` makes a socket of *this* process inside the host (a thread enters the
  network namespace, which is per thread): probes and redis-py clients need no process.
- **Links.** Each host has one TUN device ``tb0`` with address ``10.200.0.i/16`` (private, and
  only inside the host's namespace: nothing is added to the machine's own network). The device
  is opened inside the host's namespace and its file descriptor handed to one forwarder process
  (``forwarder.py``), which reads every IPv4 packet, looks up the host of its destination and
  writes it to that host's TUN after the pair's one-way delay (a timer heap; ``select()`` with
  a 1 ns timer slack), or drops it while the pair is partitioned. The test process changes
  delays and partitions at run time over a ``SOCK_SEQPACKET`` socketpair; each change is in
  force when the call returns. The forwarder dies with its parent, at its deadline and when the
  control socket closes; the TUN devices vanish with it.
- **Why TUN and a userspace delay:** this kernel has no ``sch_netem`` (``tc qdisc add dev lo
  root netem delay 1ms`` says "Specified qdisc kind is unknown", and there are no modules to
  load), and veth pairs without netem have no delay to configure. A userspace forwarder
  needs only ``/dev/net/tun``; it also makes partitions one lookup and counts every packet
  (:meth:`Testbed.statistics`). The configured delay is a *lower bound*: a packet is never
  written before ``read time + delay``; what it adds on top is the forwarder's own latency.
  Measured with ``python tests/testbed/measure.py`` on the 2-core VM, MTU 1500, while another
  test suite kept the load average at 4–4.5: ping RTT medians 0.36 / 2.21 / 40.61 ms for
  one-way delays of 0.1 / 1 / 20 ms (minimums 0.32 / 2.16 / 40.48), TCP request/response
  0.39 / 2.25 / 40.77 ms; p99 up to +10 ms under that load. ``realtime=True`` runs the
  forwarder under ``SCHED_FIFO``: p99 0.41 ms at 0.1 ms, 2.7 ms (TCP) at 1 ms, but a forwarder
  busy 100 % (bulk transfers) is then paused 50 ms a second by the kernel's real-time
  throttling. One TCP connection carries 25–35 MB/s at MTU 1500 (65–70 MB/s with
  ``realtime``): the forwarder's Python loop moves ~30 k packets/s; 130–150 MB/s at MTU 9000,
  ~650 MB/s at 65000 (``mtu=``).
- **Redis** (:mod:`testbed.redis_topology`): :class:`RedisTopology` starts a primary, replicas
  (``replicaof``) and Sentinels (quorum 2, ``down-after-milliseconds`` 1000,
  ``failover-timeout`` 4000: a failover takes 2–3 s) in chosen hosts, from config files in a
  temporary directory, with the AOF, ``maxmemory``/``maxmemory-policy`` and
  ``min-replicas-to-write`` as :class:`RedisOptions`. Faults act by pid
  (:meth:`RedisNode.kill`, :meth:`~RedisNode.pause`/:meth:`~RedisNode.resume`,
  :meth:`~RedisNode.restart` from the AOF) or on the links (:meth:`RedisTopology.split_brain`);
  waits poll conditions (:meth:`~RedisTopology.wait_failover`,
  :meth:`~RedisTopology.wait_replica_of`), never sleep a fixed time. An old primary started
  again after a failover is made a replica by the Sentinels ~10 s later (they ask a server
  for its role every 10 s). No replicas and no Sentinels: a lone server.
- **Teardown** (:meth:`Testbed.close`, also on an exception in the ``with`` block): every
  process in every host's network namespace is SIGKILLed by pid (also ones that no one waits
  for), the forwarder stopped, the namespaces deleted, the mounts detached and the files
  removed. Names carry the prefix, pid and a counter, so parallel runs never clash; a run that
  was SIGKILLed leaves namespaces behind, and the next testbed of the same prefix removes them
  when it starts (:func:`clean_stale`: the ``owner`` file's pid and start time no longer run).

Needs root, ``/dev/net/tun``, ``ip`` (iproute2), ``unshare`` (util-linux); Redis also
``redis-server``, ``redis-sentinel`` (Debian packages; ``./scripts/test`` installs them as
root) and redis-py. :func:`missing_requirements` and :func:`missing_redis` say what is missing.

From a test
-----------
::

    from testbed import Testbed, ping, missing_requirements

    @pytest.fixture
    def tb():
        if missing := missing_requirements():
            pytest.skip(f"the testbed needs {', '.join(missing)}")  # pytest.fail under CI=true
        with Testbed("sonatest") as testbed:
            yield testbed

    def test_something(tb):
        a, b = tb.add_host("a"), tb.add_host("b")
        tb.set_delay(a, b, 0.001)                       # one-way, both directions
        flusher = a.run([sys.executable, "-m", "sona_shm", "flusher", ...], env=support.env())
        tb.partition([a], [b]); ...; tb.heal()
        rtts = ping(a, b.addr, count=5)                 # seconds; None: no reply
        assert None not in rtts and min(rtts) >= 0.002  # a lower bound, never an upper one

``tests/integration/test_testbed.py`` has the fixtures used there (``tb``, ``topology``).

From a script
-------------
``scripts/`` put ``tests/`` on ``sys.path`` (``sys.path.append(str(ROOT / "tests"))``), then::

    with Testbed("sonabench", deadline=3600) as tb:
        hosts = [tb.add_host(f"h{i}") for i in range(3)]
        redis_host = tb.add_host("redis")
        with RedisTopology(tb, primary=redis_host, replicas=[], sentinels=[]) as topo:  # a lone server
            url = topo.servers[0].url               # redis://10.200.0.4:6379/0, reachable from the hosts
            procs = [h.run([...flusher..., "--fleet", url], env=env) for h in hosts]

A shell in a host, for debugging: ``nsenter --net=/run/netns/NETNS --mount=/run/sona-testbed/…/HOST.mnt
-- bash`` (``host.nsenter`` is that prefix). To remove what killed runs left:
``python -c "import testbed; print(testbed.clean_stale('sonatest'))"`` with ``tests/`` on the path.
"""

from .hosts import Host, Testbed, TestbedError, clean_stale, in_netns, missing_requirements
from .links import LinkError, LinkStats, PairStats
from .probes import EchoServer, ping, tcp_round_trips, tcp_throughput
from .redis_topology import RedisNode, RedisOptions, RedisTopology, missing_redis, wait_until

__all__ = [
    "EchoServer", "Host", "LinkError", "LinkStats", "PairStats", "RedisNode", "RedisOptions", "RedisTopology", "Testbed", "TestbedError",
    "clean_stale", "in_netns", "missing_redis", "missing_requirements", "ping", "tcp_round_trips", "tcp_throughput", "wait_until",
]  # fmt: skip
