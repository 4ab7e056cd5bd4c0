"""Redis in testbed hosts: a primary, replicas and Sentinels as processes of the hosts, their faults
(``kill -9``, SIGSTOP, restart from the AOF, split brain), and waiting for what the Sentinels decide.

Every server and Sentinel runs from a config file in its own directory under one temporary
directory (removed by :meth:`RedisTopology.close`), is started with :meth:`Host.run` (it dies with
the test process and after the testbed's deadline) and is signalled by pid. Servers listen on
``0.0.0.0`` of their host with ``protected-mode no``: only the testbed's hosts can reach them.
Needs ``redis-server``, ``redis-sentinel`` (Debian packages of those names) and redis-py.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .hosts import Host, Testbed

T = TypeVar("T")


def _unreachable() -> tuple[type[BaseException], ...]:
    """redis-py's errors for "no answer": the node is down, stopped, cut off or still loading."""
    import redis

    return (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)


def missing_redis() -> list[str]:
    """What this machine lacks for a :class:`RedisTopology` (empty: nothing), each with how to get it."""
    missing = [
        f"{tool} (Debian: apt-get install {tool}; ./scripts/test does it as root)"
        for tool in ("redis-server", "redis-sentinel")
        if shutil.which(tool) is None
    ]
    if importlib.util.find_spec("redis") is None:
        missing.append("redis-py (pip install 'sona-shm[fleet]')")
    return missing


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy (which is returned); TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass(frozen=True)
class RedisOptions:
    """The settings of every server of a topology (Redis's own names, ``_`` for ``-``).

    ``appendonly``/``appendfsync``: the AOF (``always``: a ``kill -9`` loses nothing that was
    answered). ``maxmemory`` (e.g. ``"64mb"``; None: no limit) and ``maxmemory_policy``
    (e.g. ``"noeviction"``). ``min_replicas_to_write``: a primary refuses writes while fewer
    replicas than this acknowledged within ``min_replicas_max_lag`` seconds (0: never refuses —
    a primary cut off from its replica keeps accepting writes that a failover then loses).
    ``password``: ``requirepass`` and ``masterauth`` of the servers, ``auth-pass`` of the Sentinels.
    """

    appendonly: bool = True
    appendfsync: str = "always"
    maxmemory: str | None = None
    maxmemory_policy: str | None = None
    min_replicas_to_write: int = 0
    min_replicas_max_lag: int = 10
    password: str | None = None

    def __post_init__(self) -> None:
        if self.appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync: expected 'always', 'everysec' or 'no', got {self.appendfsync!r}")
        if self.min_replicas_to_write < 0:
            raise ValueError(f"min_replicas_to_write: expected >= 0, got {self.min_replicas_to_write}")
        if self.min_replicas_max_lag < 1:
            raise ValueError(f"min_replicas_max_lag: expected >= 1 (seconds), got {self.min_replicas_max_lag}")

    def server_lines(self) -> list[str]:
        lines = [
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
            f"min-replicas-to-write {self.min_replicas_to_write}",
            f"min-replicas-max-lag {self.min_replicas_max_lag}",
        ]
        if self.maxmemory is not None:
            lines.append(f"maxmemory {self.maxmemory}")
        if self.maxmemory_policy is not None:
            lines.append(f"maxmemory-policy {self.maxmemory_policy}")
        if self.password is not None:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        return lines


def _host_connection_class():  # -> type[redis.Connection]
    import redis

    class HostConnection(redis.Connection):
        """A redis-py connection whose socket is made in a testbed host's network namespace."""

        def __init__(self, *, testbed_host: Host, **kwargs: Any) -> None:
            self.testbed_host = testbed_host
            super().__init__(**kwargs)

        def _connect(self) -> socket.socket:
            sock = self.testbed_host.socket()
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self.socket_connect_timeout)
                sock.connect((self.host, self.port))
                sock.settimeout(self.socket_timeout)
            except BaseException:
                sock.close()
                raise
            return sock

    return HostConnection


def client(host: Host, addr: str, port: int, *, via: Host | None = None, timeout: float = 2.0, password: str | None = None, **kwargs: Any):
    """A redis-py client of ``addr:port`` whose connections start in host ``via`` (``host`` if None: over its
    loopback when ``addr`` is its own, so partitions do not cut it off). Replies decoded to str; no retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = redis.ConnectionPool(
        connection_class=_host_connection_class(),
        testbed_host=via or host,
        host=addr,
        port=port,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        decode_responses=kwargs.pop("decode_responses", True),
        **kwargs,
    )
    return redis.Redis(connection_pool=pool)


class RedisNode:
    """One ``redis-server`` or ``redis-sentinel`` in a testbed host: its config file, directory and process.

    :meth:`kill` (``kill -9``), :meth:`pause`/:meth:`resume` (SIGSTOP/SIGCONT) and
    :meth:`restart` (same port, directory and config file — the AOF is replayed, and what a
    Sentinel rewrote in the file is kept) act on the process by pid.
    """

    def __init__(
        self, host: Host, port: int, directory: Path, lines: Sequence[str], *, sentinel: bool = False, password: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.directory = directory
        self.sentinel = sentinel
        self.password = None if sentinel else password
        self.config = directory / ("sentinel.conf" if sentinel else "redis.conf")
        self.log = directory / ("sentinel.log" if sentinel else "redis.log")
        self.proc: subprocess.Popen | None = None
        directory.mkdir(parents=True)
        common = [
            f"port {port}",
            "bind 0.0.0.0",
            "protected-mode no",
            "daemonize no",
            f"dir {directory}",
            f"logfile {self.log}",
        ]
        self.config.write_text("\n".join([*common, *lines]) + "\n")

    @property
    def addr(self) -> str:
        return self.host.addr

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.addr}:{self.port}/0"

    def __repr__(self) -> str:
        kind = "sentinel" if self.sentinel else "server"
        return f"RedisNode({kind} {self.addr}:{self.port} in {self.host.name}, pid {self.proc.pid if self.proc else None})"

    def start(self, timeout: float = 30.0) -> RedisNode:
        """Start the process and wait until it answers PING (a server loading its AOF answers once loaded)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self!r} runs already")
        argv = ["redis-sentinel", str(self.config)] if self.sentinel else ["redis-server", str(self.config)]
        self.proc = self.host.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        unreachable = _unreachable()

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} in {self.host.name} exited with {self.proc.returncode}: {self.log_tail()}")
            c = self.client()
            try:
                return bool(c.ping())
            except unreachable:
                return False
            finally:
                c.close()

        wait_until(answers, timeout, f"{argv[0]} on {self.addr}:{self.port} to answer PING")
        return self

    def client(self, via: Host | None = None, **kwargs: Any):
        """A redis-py client of this node (see :func:`client`): from its own host unless ``via``."""
        return client(self.host, self.addr, self.port, via=via, password=self.password, **kwargs)

    def call(self, *args: Any, via: Host | None = None, timeout: float = 2.0) -> Any:
        """One command on a fresh connection (decoded); raises redis-py's errors."""
        c = self.client(via, timeout=timeout)
        try:
            return c.execute_command(*args)
        finally:
            c.close()

    def role(self) -> list | None:
        """``ROLE``'s answer (``["master", offset, replicas]``, ``["slave", ip, port, state, offset]``,
        ``["sentinel", names]``); None when the node does not answer."""
        try:
            return self.call("ROLE")
        except _unreachable():
            return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9`` and reap."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its connections and answers nothing."""
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> RedisNode:
        """``kill -9`` and start again from the same config file and directory (a server replays its AOF)."""
        self.kill()
        return self.start(timeout)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """SIGCONT (a stopped process) and SIGKILL; safe to call twice."""
        self.resume()
        self.kill()


def _pairs(reply: Sequence[Any] | dict[str, Any]) -> dict[str, Any]:
    """A ``SENTINEL MASTER`` reply as a dict (redis-py parses it into one; a flat ``[key, value, …]`` list otherwise)."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[0::2], reply[1::2], strict=True))


class RedisTopology:
    """A Redis primary, its replicas and Sentinels monitoring it, in hosts of one testbed.

    ``primary``/``replicas``/``sentinels``: the hosts (a host may hold one server and one
    Sentinel: they listen on ``port`` and ``sentinel_port``; no replicas and no Sentinels: a
    lone server). ``quorum``: Sentinels that must
    agree the primary is down; ``down_after_ms`` and ``failover_timeout_ms`` are short, so a
    failover takes a few seconds. ``options``: the servers' settings (:class:`RedisOptions`).
    Data and configs live in a temporary directory that :meth:`close` removes.
    """

    def __init__(
        self,
        testbed: Testbed,
        *,
        primary: Host,
        replicas: Sequence[Host],
        sentinels: Sequence[Host],
        options: RedisOptions = RedisOptions(),
        master_name: str = "sona",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 4000,
        port: int = 6379,
        sentinel_port: int = 26379,
    ) -> None:
        if sentinels and not 1 <= quorum <= len(sentinels):
            raise ValueError(f"quorum: expected 1..{len(sentinels)} (the Sentinels), got {quorum}")
        self.testbed = testbed
        self.options = options
        self.master_name = master_name
        self.quorum = quorum
        self.directory = testbed.tmpdir("redis")
        self.servers: list[RedisNode] = []
        self.sentinels: list[RedisNode] = []
        try:
            base = options.server_lines() + ['save ""', "repl-diskless-sync-delay 0", "replica-serve-stale-data yes"]
            self.servers.append(RedisNode(primary, port, self.directory / f"server-{primary.name}", base, password=options.password))
            for host in replicas:
                lines = [*base, f"replicaof {primary.addr} {port}"]
                self.servers.append(RedisNode(host, port, self.directory / f"server-{host.name}", lines, password=options.password))
            watch = [
                f"sentinel monitor {master_name} {primary.addr} {port} {quorum}",
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {master_name} 1",
            ]
            if options.password is not None:
                watch.append(f"sentinel auth-pass {master_name} {options.password}")
            for host in sentinels:
                self.sentinels.append(RedisNode(host, sentinel_port, self.directory / f"sentinel-{host.name}", watch, sentinel=True))
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    @property
    def nodes(self) -> list[RedisNode]:
        return [*self.servers, *self.sentinels]

    def start(self, timeout: float = 60.0) -> RedisTopology:
        """Start the servers, wait until every replica is in sync, start the Sentinels and wait until
        each knows every replica and every other Sentinel (before that a failover cannot happen)."""
        try:
            for node in self.servers:
                node.start(timeout)
            primary = self.servers[0]
            for node in self.servers[1:]:
                self.wait_replica_of(node, primary, timeout)
            for node in self.sentinels:
                node.start(timeout)
            for node in self.sentinels:
                wait_until(lambda node=node: self._sentinel_ready(node), timeout, f"{node!r} to see every replica and Sentinel")
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> RedisTopology:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _sentinel_ready(self, node: RedisNode) -> bool:
        try:
            state = _pairs(node.call("SENTINEL", "MASTER", self.master_name))
        except _unreachable():
            return False
        return int(state["num-slaves"]) >= len(self.servers) - 1 and int(state["num-other-sentinels"]) >= len(self.sentinels) - 1

    def node_at(self, addr: str, port: int) -> RedisNode:
        """The server listening at ``addr:port``."""
        for node in self.servers:
            if (node.addr, node.port) == (addr, port):
                return node
        raise LookupError(f"no server of this topology listens at {addr}:{port}")

    def sentinel_views(self) -> dict[str, tuple[str, int] | None]:
        """What each Sentinel (by host name) says the primary is (``SENTINEL GET-MASTER-ADDR-BY-NAME``); None: no answer."""
        views: dict[str, tuple[str, int] | None] = {}
        for node in self.sentinels:
            try:
                addr = node.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                views[node.host.name] = (addr[0], int(addr[1])) if addr else None
            except _unreachable():
                views[node.host.name] = None
        return views

    def primary(self) -> RedisNode | None:
        """The server at least ``quorum`` Sentinels name as primary (None: no such agreement)."""
        views = [v for v in self.sentinel_views().values() if v is not None]
        for view in set(views):
            if views.count(view) >= self.quorum:
                return self.node_at(*view)
        return None

    def wait_failover(self, old: RedisNode, timeout: float = 60.0) -> RedisNode:
        """Wait until a failover away from ``old`` completed; the new primary.

        Completed: every Sentinel that answers (at least ``quorum``) names the same server,
        not ``old``, and that server says it is a primary (``ROLE``). A Sentinel switches its
        answer at the end of the failover, after it promoted the replica.
        """

        def done() -> RedisNode | None:
            views = [v for v in self.sentinel_views().values() if v is not None]
            if len(views) < self.quorum or len(set(views)) != 1 or views[0] == (old.addr, old.port):
                return None
            node = self.node_at(*views[0])
            role = node.role()
            return node if role is not None and role[0] == "master" else None

        return wait_until(done, timeout, f"the Sentinels to complete a failover away from {old!r} (now: {self.sentinel_views()})")

    def wait_replica_of(self, node: RedisNode, primary: RedisNode, timeout: float = 150.0) -> None:
        """Wait until server ``node`` replicates ``primary`` with its link up (``ROLE``: slave, connected).

        An old primary started again is converted by the Sentinels once they read its role (every 10 s) and it has
        said "master" for a while; a Sentinel whose timer ran late (a loaded machine) enters TILT mode and does
        nothing for 30 s, so this may take a minute and more (it once took over 60 s here).
        """

        def synced() -> bool:
            role = node.role()
            return (
                role is not None
                and role[0] == "slave"
                and (role[1], int(role[2])) == (primary.addr, primary.port)
                and role[3] == "connected"
            )

        wait_until(synced, timeout, f"{node!r} to replicate {primary!r} (ROLE now: {node.role()})")

    def split_brain(self, primary: RedisNode | None = None) -> list[Host]:
        """Cut ``primary`` (the first server if None) off from every other server and every Sentinel; hosts
        outside the topology still reach it. The hosts cut off from it; :meth:`heal` ends it."""
        old = primary or self.servers[0]
        others = [n.host for n in self.nodes if n.host is not old.host]
        self.testbed.partition([old.host], others)
        return others

    def heal(self) -> None:
        """End every partition of the testbed."""
        self.testbed.heal()

    def close(self) -> None:
        """Kill every Sentinel and server (by pid) and remove their directory; safe to call twice."""
        for node in [*self.sentinels, *self.servers]:
            node.close()
        shutil.rmtree(self.directory, ignore_errors=True)
