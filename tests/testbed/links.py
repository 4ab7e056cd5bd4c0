"""The test process's end of the links: starts the forwarder process (``forwarder.py``) and changes its delays and partitions."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from sona_shm.supervise import child_setup

FORWARDER = Path(__file__).resolve().with_name("forwarder.py")


class LinkError(RuntimeError):
    """The forwarder refused a request or is gone."""


@dataclass(frozen=True)
class PairStats:
    """Packets of one direction between two hosts."""

    src: str
    dst: str
    forwarded: int
    dropped: int  # by a partition


@dataclass(frozen=True)
class LinkStats:
    """What the forwarder did so far (:meth:`Links.statistics`)."""

    pairs: tuple[PairStats, ...]
    unroutable: int  # packets to no host of the testbed (IPv6 chatter, broadcasts)
    write_errors: int
    queued: int  # packets waiting for their delay now
    late_max: float  # seconds: the most a packet was written after it fell due
    late_mean: float
    blocked: tuple[tuple[str, str], ...]

    def pair(self, src: str, dst: str) -> PairStats:
        """The counters of ``src`` → ``dst`` (zeros if no packet went that way)."""
        for p in self.pairs:
            if (p.src, p.dst) == (src, dst):
                return p
        return PairStats(src, dst, 0, 0)


class Links:
    """The forwarder process of one testbed and its control socket.

    The forwarder dies with this process (``PR_SET_PDEATHSIG``), after ``deadline`` seconds
    (SIGALRM), and when the control socket closes. Every method waits for the forwarder's
    answer: a delay or partition is in force when the call returns. Thread-safe. ``realtime``:
    the forwarder runs under ``SCHED_FIFO`` (see ``forwarder.py``).
    """

    def __init__(self, *, deadline: float | None, realtime: bool = False) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(FORWARDER), *(["--realtime"] if realtime else []), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                preexec_fn=child_setup(deadline=deadline),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours
        self._lock = threading.Lock()

    def _request(self, op: str, fds: tuple[int, ...] = (), **fields: object) -> dict:
        data = json.dumps({"op": op, **fields}).encode()
        with self._lock:
            if self.proc.poll() is not None:
                raise LinkError(f"the forwarder (pid {self.proc.pid}) exited with {self.proc.returncode}")
            try:
                if fds:
                    socket.send_fds(self.control, [data], list(fds))
                else:
                    self.control.send(data)
                reply = self.control.recv(1 << 20)
            except OSError as exc:
                raise LinkError(f"the forwarder (pid {self.proc.pid}) does not answer: {exc}") from exc
        if not reply:
            raise LinkError(f"the forwarder (pid {self.proc.pid}) closed its control socket")
        answer = json.loads(reply)
        if not answer.get("ok"):
            raise LinkError(f"the forwarder refused {op!r}: {answer.get('error')}")
        return answer

    def add(self, host: str, addr: str, tun_fd: int) -> None:
        """Hand the forwarder ``host``'s TUN device (a copy of ``tun_fd``; the caller closes its own)."""
        self._request("add", (tun_fd,), host=host, addr=addr)

    def set_delay(self, src: str | None, dst: str | None, seconds: float) -> None:
        """One-way delay from ``src`` to ``dst`` (both None: the default of every other pair)."""
        self._request("delay", src=src, dst=dst, seconds=seconds)

    def block(self, pairs: list[tuple[str, str]]) -> None:
        self._request("block", pairs=pairs)

    def unblock(self, pairs: list[tuple[str, str]]) -> None:
        self._request("unblock", pairs=pairs)

    def statistics(self) -> LinkStats:
        a = self._request("stats")
        return LinkStats(
            pairs=tuple(PairStats(*p) for p in a["pairs"]),
            unroutable=a["unroutable"],
            write_errors=a["write_errors"],
            queued=a["queued"],
            late_max=a["late_max"],
            late_mean=a["late_mean"],
            blocked=tuple(tuple(p) for p in a["blocked"]),
        )

    def close(self, timeout: float = 10.0) -> None:
        """Stop the forwarder (its TUN devices vanish with it); safe to call twice."""
        if self.proc.poll() is None:
            try:
                self._request("stop")
            except LinkError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.control.close()
