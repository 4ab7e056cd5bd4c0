"""Multi-host testbed (draft docstring)."""

from .hosts import Host, Testbed, TestbedError, clean_stale, in_netns
from .links import LinkError, LinkStats, PairStats
from .probes import EchoServer, ping, tcp_round_trips, tcp_throughput

__all__ = ["EchoServer", "Host", "LinkError", "LinkStats", "PairStats", "Testbed", "TestbedError", "clean_stale", "in_netns", "ping", "tcp_round_trips", "tcp_throughput"]
