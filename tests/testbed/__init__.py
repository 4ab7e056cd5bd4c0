"""Multi-host testbed (draft docstring)."""

from .hosts import Host, Testbed, TestbedError, clean_stale, in_netns, missing_requirements
from .links import LinkError, LinkStats, PairStats
from .probes import EchoServer, ping, tcp_round_trips, tcp_throughput
from .redis_topology import RedisNode, RedisOptions, RedisTopology, missing_redis, wait_until

__all__ = [
    "EchoServer", "Host", "LinkError", "LinkStats", "PairStats", "RedisNode", "RedisOptions", "RedisTopology", "Testbed", "TestbedError",
    "clean_stale", "in_netns", "missing_redis", "missing_requirements", "ping", "tcp_round_trips", "tcp_throughput", "wait_until",
]  # fmt: skip
