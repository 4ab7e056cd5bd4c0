"""Probes of the links between hosts, from sockets of this process in the hosts: ICMP ping, TCP round trips, TCP throughput."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

from .hosts import Host

_ECHO_REQUEST = 8
_ECHO_REPLY = 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(src: Host, addr: str, *, count: int = 5, timeout: float = 2.0, size: int = 56) -> list[float | None]:
    """ICMP echo from host ``src`` to ``addr``, one request at a time: each round trip in seconds, None when no
    reply came within ``timeout`` (a raw socket: needs root, which the testbed needs anyway)."""
    sock = src.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts: list[float | None] = []
    try:
        for seq in range(count):
            header = struct.pack("!BBHHH", _ECHO_REQUEST, 0, 0, ident, seq)
            payload = os.urandom(size)
            packet = struct.pack("!BBHHH", _ECHO_REQUEST, 0, _checksum(header + payload), ident, seq) + payload
            sent = time.perf_counter()
            sock.sendto(packet, (addr, 0))
            deadline = sent + timeout
            rtt = None
            while (left := deadline - time.perf_counter()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                data = sock.recv(65536)
                got = time.perf_counter()
                icmp = data[(data[0] & 0x0F) * 4 :]  # past the IP header
                if len(icmp) < 8:
                    continue
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                if (kind, rid, rseq) == (_ECHO_REPLY, ident, seq) and icmp[8:] == payload:
                    rtt = got - sent
                    break
            rtts.append(rtt)
    finally:
        sock.close()
    return rtts


class EchoServer:
    """A TCP server in host ``host`` (a thread of this process) that sends back whatever it receives; ``addr``, ``port``."""

    def __init__(self, host: Host) -> None:
        self.listener = host.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host.addr, 0))
        self.listener.listen(16)
        self.addr, self.port = self.listener.getsockname()
        self.received = 0
        self._thread = threading.Thread(target=self._serve, name="testbed-echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 16):
                self.received += len(data)
                conn.sendall(data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(10)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def tcp_round_trips(client: Host, server: Host, *, count: int = 50, size: int = 64, timeout: float = 10.0) -> list[float]:
    """``count`` request/response round trips of ``size`` bytes over one TCP connection (opened first, not timed)
    from host ``client`` to an echo server in host ``server``: each in seconds."""
    with EchoServer(server) as echo:
        sock = client.connect(echo.addr, echo.port, timeout)
        try:
            message = os.urandom(size)
            rtts = []
            for _ in range(count):
                start = time.perf_counter()
                sock.sendall(message)
                reply = _recv_exactly(sock, size)
                rtts.append(time.perf_counter() - start)
                if reply != message:
                    raise AssertionError("the echo server sent back other bytes than it got")
            return rtts
        finally:
            sock.close()


def tcp_throughput(src: Host, dst: Host, *, seconds: float = 3.0, chunk: int = 1 << 18, timeout: float = 10.0) -> float:
    """Bytes per second one TCP connection from host ``src`` carries to host ``dst`` while sending for ``seconds``
    (counted by the receiver, from its first byte to the end of the stream)."""
    listener = dst.socket()
    listener.bind((dst.addr, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    result: dict[str, float] = {}

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            buf = bytearray(1 << 20)
            total, first = 0, None
            while n := conn.recv_into(buf):
                if first is None:
                    first = time.perf_counter()
                total += n
            result["bytes"] = total
            result["seconds"] = time.perf_counter() - (first or time.perf_counter())

    listener.settimeout(timeout)
    receiver = threading.Thread(target=receive, name="testbed-sink", daemon=True)
    receiver.start()
    try:
        sock = src.connect(dst.addr, port, timeout)
        try:
            data = os.urandom(chunk)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                sock.sendall(data)
        finally:
            sock.close()
        receiver.join(timeout + seconds)
    finally:
        listener.close()
    if "bytes" not in result:
        raise TimeoutError(f"the receiver in {dst.name} did not finish")
    return result["bytes"] / result["seconds"] if result["seconds"] > 0 else 0.0
