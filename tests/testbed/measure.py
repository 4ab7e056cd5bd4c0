"""Measure what the testbed's links hold: ping and TCP round trips and TCP throughput between two hosts, per configured delay.

    sudo .venv/bin/python tests/testbed/measure.py [--delays-ms 0,0.1,1,20] [--count 200] [--seconds 3] [--mtu 1500] [--realtime]

Prints one row per delay: the configured round trip (twice the one-way delay), the measured
ping and TCP request/response round trips (min, median, p99, max, in ms) and the bytes per
second one TCP connection carried, and the forwarder's lateness (how long after its due time it
wrote a packet). The probes run as threads of this process with sockets in the hosts; the
forwarder is its own process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from testbed import Testbed, ping, tcp_round_trips, tcp_throughput  # noqa: E402


def _summary(seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{ms[0]:7.3f} {statistics.median(ms):7.3f} {p99:7.3f} {ms[-1]:7.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delays-ms", default="0,0.1,1,20", help="one-way delays to measure, in ms, comma-separated")
    parser.add_argument("--count", type=int, default=200, help="pings and TCP round trips per delay")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each throughput run sends")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--realtime", action="store_true", help="run the forwarder under SCHED_FIFO")
    args = parser.parse_args(argv)
    delays = [float(d) / 1e3 for d in args.delays_ms.split(",")]
    with Testbed("sonameas", mtu=args.mtu, realtime=args.realtime) as tb:
        a, b = tb.add_host("a"), tb.add_host("b")
        forwarder = ", forwarder SCHED_FIFO" if args.realtime else ""
        print(
            f"MTU {args.mtu}{forwarder}; {args.count} pings and TCP round trips (64 B) per delay; one TCP connection for {args.seconds} s"
        )
        head = "min     med     p99     max"
        print(f"{'one-way':>8} {'RTT set':>8} | {'ping RTT ms: ' + head:>39} | {'TCP RTT ms: ' + head:>38} | {'MB/s':>7}")
        for delay in delays:
            tb.set_delay(a, b, delay)
            pings = ping(a, b.addr, count=args.count, timeout=2.0)
            lost = pings.count(None)
            rtts = [r for r in pings if r is not None]
            tcp = tcp_round_trips(a, b, count=args.count)
            rate = tcp_throughput(a, b, seconds=args.seconds)
            lost_note = f" ({lost} pings lost)" if lost else ""
            columns = f"{'':11}{_summary(rtts)} | {'':10}{_summary(tcp)} | {rate / 1e6:7.1f}"
            print(f"{delay * 1e3:6.2f}ms {2 * delay * 1e3:6.2f}ms | {columns}{lost_note}")
        stats = tb.statistics()
        print(
            f"forwarder: {sum(p.forwarded for p in stats.pairs)} packets; written after their due time by "
            f"{stats.late_mean * 1e6:.0f} µs on average, {stats.late_max * 1e3:.2f} ms at most; write errors {stats.write_errors}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
