"""The testbed's links: a process that moves IPv4 packets between the hosts' TUN devices after a one-way delay per pair.

Run by :class:`testbed.links.Links` as ``python forwarder.py [--realtime] CONTROL_FD`` (standard library only, so it
starts fast and imports nothing of the project). ``CONTROL_FD`` is one end of a ``SOCK_SEQPACKET``
socketpair: every message is one JSON request, answered by one JSON reply, so a change is in force
when its reply arrives. Requests (``op``):

- ``add`` ``{"host": NAME, "addr": "10.200.0.1"}`` with the host's TUN file descriptor passed along
  (``SCM_RIGHTS``): packets whose IPv4 destination is ``addr`` go to that TUN;
- ``delay`` ``{"src": A, "dst": B, "seconds": S}``: the one-way delay of packets from host A to host B
  (``src``/``dst`` null: the default for every pair without one of its own);
- ``block`` / ``unblock`` ``{"pairs": [[A, B], ...]}``: drop every packet from A to B (directed;
  a packet already delayed is dropped when it falls due), or stop dropping;
- ``stats``: counters (see :class:`testbed.links.LinkStats`); ``stop``: exit 0.

When the control socket closes (the test process died) the forwarder exits; its parent also made
the kernel kill it then (``PR_SET_PDEATHSIG``) and after its deadline. Its TUN devices vanish with it.

Timing: a packet read at ``t`` from A's TUN for B is written to B's TUN at the first moment after
``t + delay(A, B)`` this loop gets to, and never before: the configured delay is a lower bound of
the one-way delay (the packet had already waited in A's TUN queue before ``t``). Packets of a pair
keep their order also when its delay is lowered meanwhile (each falls due no earlier than the one
before it). The loop sleeps in ``select()`` with a microsecond timeout, and the timer slack of the
process is set to 1 ns (``PR_SET_TIMERSLACK``; the default 50 µs would be added to every 0.1 ms).
"""

from __future__ import annotations

import ctypes
import heapq
import json
import os
import select
import socket
import sys
import time

PR_SET_TIMERSLACK = 29
#: Packets read from one TUN before the loop looks at the others and the timers again.
READ_BURST = 64
#: The largest packet a TUN hands over (its MTU may be up to 65535).
MAX_PACKET = 65536
#: SCHED_FIFO priority with --realtime (1..99; low: kernel threads that must run first stay ahead).
REALTIME_PRIORITY = 10
EXIT_OK = 0
EXIT_USAGE = 2


class Forwarder:
    """The forwarder's state and loop (one instance per process)."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.tun: dict[str, int] = {}  # host -> TUN fd
        self.host_of_fd: dict[int, str] = {}
        self.host_of_addr: dict[bytes, str] = {}  # 4-byte IPv4 address -> host
        self.default_delay = 0.0
        self.delay: dict[tuple[str, str], float] = {}
        self.blocked: set[tuple[str, str]] = set()
        self.last_due: dict[tuple[str, str], float] = {}
        self.heap: list[tuple[float, int, str, str, bytes]] = []
        self.seq = 0
        self.forwarded: dict[tuple[str, str], int] = {}
        self.dropped: dict[tuple[str, str], int] = {}
        self.unroutable = 0
        self.write_errors = 0
        self.late_max = 0.0
        self.late_sum = 0.0
        self.late_count = 0
        self.running = True

    # ------------------------------------------------------------------ control

    def handle_control(self) -> None:
        msg, fds, _, _ = socket.recv_fds(self.control, 65536, 4)
        if not msg:  # the test process is gone
            for fd in fds:
                os.close(fd)
            self.running = False
            return
        try:
            reply = self.apply(json.loads(msg), fds)
        except Exception as exc:  # a bad request is answered, not fatal
            for fd in fds:
                os.close(fd)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.control.send(json.dumps(reply).encode())

    def apply(self, req: dict, fds: list[int]) -> dict:
        op = req["op"]
        if op == "add":
            if len(fds) != 1:
                raise ValueError(f"add: expected 1 file descriptor, got {len(fds)}")
            host, fd = req["host"], fds[0]
            if host in self.tun:
                raise ValueError(f"add: host {host!r} exists")
            os.set_blocking(fd, False)
            self.tun[host] = fd
            self.host_of_fd[fd] = host
            self.host_of_addr[socket.inet_aton(req["addr"])] = host
        elif op == "delay":
            seconds = float(req["seconds"])
            if not seconds >= 0:
                raise ValueError(f"delay: seconds must be >= 0, got {seconds}")
            if req.get("src") is None:
                self.default_delay = seconds
            else:
                self.delay[(req["src"], req["dst"])] = seconds
        elif op == "block":
            self.blocked.update((a, b) for a, b in req["pairs"])
        elif op == "unblock":
            self.blocked.difference_update((a, b) for a, b in req["pairs"])
        elif op == "stats":
            return {
                "ok": True,
                "pairs": [
                    [a, b, self.forwarded.get((a, b), 0), self.dropped.get((a, b), 0)]
                    for a, b in sorted(set(self.forwarded) | set(self.dropped))
                ],
                "unroutable": self.unroutable,
                "write_errors": self.write_errors,
                "queued": len(self.heap),
                "late_max": self.late_max,
                "late_mean": self.late_sum / self.late_count if self.late_count else 0.0,
                "blocked": sorted(self.blocked),
            }
        elif op == "stop":
            self.running = False
        else:
            raise ValueError(f"unknown op {op!r}")
        return {"ok": True}

    # ------------------------------------------------------------------ packets

    def read_from(self, fd: int) -> None:
        src = self.host_of_fd[fd]
        for _ in range(READ_BURST):
            try:
                packet = os.read(fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            now = time.monotonic()
            dst = self.host_of_addr.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
            if dst is None:
                self.unroutable += 1  # IPv6 chatter, broadcasts, addresses of no host
                continue
            pair = (src, dst)
            if pair in self.blocked:
                self.dropped[pair] = self.dropped.get(pair, 0) + 1
                continue
            due = max(now + self.delay.get(pair, self.default_delay), self.last_due.get(pair, 0.0))
            self.last_due[pair] = due
            if due <= now:
                self.write(pair, packet, due)
            else:
                self.seq += 1
                heapq.heappush(self.heap, (due, self.seq, src, dst, packet))

    def write(self, pair: tuple[str, str], packet: bytes, due: float) -> None:
        try:
            os.write(self.tun[pair[1]], packet)
        except OSError:
            self.write_errors += 1  # the device went down; like a lost packet
            return
        self.forwarded[pair] = self.forwarded.get(pair, 0) + 1
        late = time.monotonic() - due
        self.late_count += 1
        self.late_sum += late
        if late > self.late_max:
            self.late_max = late

    def release_due(self) -> float | None:
        """Write every packet that fell due; the seconds until the next one (None: none is waiting)."""
        heap = self.heap
        while heap:
            now = time.monotonic()
            if heap[0][0] > now:
                return heap[0][0] - now
            due, _, src, dst, packet = heapq.heappop(heap)
            pair = (src, dst)
            if pair in self.blocked:
                self.dropped[pair] = self.dropped.get(pair, 0) + 1
            else:
                self.write(pair, packet, due)
        return None

    def run(self) -> int:
        control_fd = self.control.fileno()
        while self.running:
            timeout = self.release_due()
            ready, _, _ = select.select([control_fd, *self.host_of_fd], [], [], timeout)
            for fd in ready:
                if fd == control_fd:
                    self.handle_control()
                elif fd in self.host_of_fd:
                    self.read_from(fd)
        return EXIT_OK


def main(argv: list[str]) -> int:
    realtime = "--realtime" in argv[1:]
    args = [a for a in argv[1:] if a != "--realtime"]
    if len(args) != 1 or not args[0].isdigit():
        print("usage: forwarder.py [--realtime] CONTROL_FD", file=sys.stderr)
        return EXIT_USAGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(1), 0, 0, 0)  # 1 ns: sub-millisecond delays need a precise wake-up
    if realtime:
        # Ahead of every ordinary process when a packet falls due: on a loaded machine the wake-up
        # otherwise waits for a time slice (ms). The kernel still leaves others 5 % of each core
        # (sched_rt_runtime_us), and the loop sleeps in select() whenever nothing is due.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    control = socket.socket(fileno=int(args[0]))
    control.setblocking(True)
    return Forwarder(control).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
