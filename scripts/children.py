"""Child processes for the scripts and the tests: forked workers, a gunicorn, and stopping them.

The library keeps only what it starts itself (:mod:`sona_shm.supervise`: the flusher);
these helpers serve ``scripts/`` (demo, soak) and ``tests/`` (which put this directory
on their import path). Every child started here dies with its parent
(:func:`sona_shm.supervise.die_with_parent`) and has a deadline, after which the kernel
ends it: a test or script that is killed, or hangs, leaves nothing running.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from sona_shm.shm.segment import start_ticks
from sona_shm.supervise import child_setup, die_with_parent, set_deadline, stop_process

#: Seconds a forked worker or a gunicorn may live unless told otherwise.
DEFAULT_DEADLINE = 600.0


def fork_child(target: Callable[..., object], *args: object, deadline: float | None = DEFAULT_DEADLINE) -> int:
    """Run ``target(*args)`` in a forked child that exits 0 if it returns, 1 if it raises
    (traceback on stderr); return the child's pid. The way gunicorn starts its workers.

    The child is SIGKILLed when this process exits, and ended by SIGALRM after
    ``deadline`` seconds.
    """
    sys.stdout.flush()  # or the child would print the parent's buffered output again
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        die_with_parent(signal.SIGKILL, parent=parent)
        set_deadline(deadline)
        target(*args)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on a free port of ``host`` (``getsockname()[1]`` is the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def start_gunicorn(
    app: str, sock: socket.socket, *options: str, deadline: float | None = DEFAULT_DEADLINE, **popen_kwargs
) -> subprocess.Popen:
    """``python -m gunicorn --bind fd://N OPTIONS… APP`` serving the already listening ``sock``.

    The master gets SIGTERM (a graceful stop of its workers) when this process exits,
    and SIGALRM after ``deadline`` seconds; its workers exit when they see it gone.

    Handing gunicorn a bound socket instead of a port number leaves no moment in which
    another process could take the port. The caller should close its copy of ``sock``
    afterwards, so that connections are refused once gunicorn is gone.
    """
    fd = sock.fileno()
    os.set_inheritable(fd, True)
    popen_kwargs.setdefault("preexec_fn", child_setup(deadline=deadline, sig=signal.SIGTERM))
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"fd://{fd}", *options, app], pass_fds=(fd,), **popen_kwargs)


def child_pids(pid: int) -> list[int]:
    """Pids of the live children of process ``pid`` (gunicorn's workers, for its master)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # exited meanwhile
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:  # field 4, ppid
                children.append(int(entry))
    return children


def descendant_pids(pid: int) -> list[int]:
    """Pids of every live descendant of process ``pid`` (uvicorn's spawned workers, gunicorn's forked ones)."""
    found, todo = [], [pid]
    while todo:
        for child in child_pids(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def stop_gunicorn(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Stop a gunicorn master like :func:`stop_process` and make sure its workers are gone too.

    SIGTERM makes the master stop its workers gracefully; a master that had to be
    SIGKILLed leaves workers that exit on their own once they notice, or are SIGKILLed
    here after ``timeout``.
    """
    # (pid, start time): a worker pid the OS recycles meanwhile is not mistaken for it.
    workers = [(pid, start_ticks(pid)) for pid in child_pids(proc.pid)] if proc.poll() is None else []
    code = stop_process(proc, timeout)
    deadline = time.monotonic() + timeout
    for pid, ticks in workers:
        while process_running(pid, ticks) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_running(pid, ticks):
            os.kill(pid, signal.SIGKILL)
    return code


def process_running(pid: int, ticks: int) -> bool:
    """True while process ``pid`` started at ``ticks`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0] != b"Z" and int(fields[19]) == ticks


def wait_until_serving(port: int, proc: subprocess.Popen, path: str = "/healthz", timeout: float = 60.0) -> None:
    """Poll ``GET path`` on ``127.0.0.1:port`` until it answers 200; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with code {proc.returncode} before serving {path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        except OSError:
            pass  # not accepting yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"gunicorn did not answer GET {path} with 200 within {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# ----------------------------------------------------------------- a redis-server for fleets


class RedisServer:
    """A ``redis-server`` of this process on a free loopback port, with its data in ``directory``.

    ``appendfsync``: ``always`` (the default: every write on disk before it is answered; a
    ``kill -9`` loses nothing) or ``everysec``. RDB snapshots are off (``--save ''``).
    :meth:`kill` (``kill -9``), :meth:`pause`/:meth:`resume` (SIGSTOP/SIGCONT: a
    partition) and :meth:`restart` (same port and directory, so the AOF is replayed) act
    on the process by pid. The server dies with this process and after ``deadline``
    seconds (PR_SET_PDEATHSIG and an alarm, which survive exec). Needs the
    ``redis-server`` binary (Debian: ``apt-get install redis-server``) and redis-py.
    """

    def __init__(
        self,
        directory: str,
        *,
        appendfsync: str = "always",
        deadline: float | None = DEFAULT_DEADLINE,
        password: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.extra = list(extra)  # more redis-server options (e.g. --replicaof HOST PORT)
        self.appendfsync = appendfsync
        self.password = password
        self.deadline = deadline
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        """Start the server (on a new free port unless it had one) and wait until it answers PING."""
        for _ in range(20):
            if not self.port:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
            else:
                port = self.port
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "yes",
                    "--appendfsync", self.appendfsync,
                    "--dir", self.directory,
                    "--logfile", os.path.join(self.directory, "redis.log"),
                    "--daemonize", "no",
                    *(["--requirepass", self.password] if self.password else []),
                    *self.extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=child_setup(deadline=self.deadline),
            )  # fmt: skip
            if self._wait_ready(port, timeout):
                self.port = port
                return self
            if self.port:  # a restart must keep its port; someone took it
                raise RuntimeError(f"redis-server could not listen on its port {self.port} again (see {self.directory}/redis.log)")
        raise RuntimeError(f"redis-server did not start (see {self.directory}/redis.log)")

    def _wait_ready(self, port: int, timeout: float) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1, password=self.password)
        deadline = time.monotonic() + timeout
        delay = 0.005
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False  # the port was taken meanwhile (or another failure): try another
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass  # not listening yet, or still loading the AOF
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
            raise TimeoutError(f"redis-server on port {port} did not answer PING within {timeout} s")
        finally:
            client.close()

    def client(self):  # -> redis.Redis
        """A plain redis-py client of the server (for tests and scripts to look inside)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, socket_connect_timeout=10, password=self.password)

    def kill(self) -> None:
        """``kill -9`` the server and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections and answers nothing (a partition)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> RedisServer:
        """Kill and start again on the same port and directory (the AOF is replayed)."""
        self.kill()
        return self.start(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process also dies of SIGKILL; this keeps ps tidy
        self.kill()


class RedisSentinels:
    """A Redis primary, one replica and three ``redis-sentinel`` processes on loopback, with their data in ``directory``.

    The Sentinels (quorum 2, ``down-after-milliseconds`` 1000, ``failover-timeout`` 4000) promote the replica a few
    seconds after the primary dies; the old primary started again comes up from its AOF and is made a replica ~10 s
    later. Every process dies with this one and after ``deadline`` seconds. Needs ``redis-server``, ``redis-sentinel``
    (Debian packages) and redis-py.
    """

    SERVICE = "sona"

    def __init__(self, directory: str, *, deadline: float | None = DEFAULT_DEADLINE) -> None:
        self.directory = directory
        self.deadline = deadline
        self.servers: list[RedisServer] = []
        self.sentinels: list[tuple[int, subprocess.Popen]] = []

    def start(self, timeout: float = 60.0) -> RedisSentinels:
        import redis

        try:
            primary = RedisServer(self._dir("server-0"), deadline=self.deadline).start()
            self.servers.append(primary)
            replica = RedisServer(self._dir("server-1"), deadline=self.deadline, extra=["--replicaof", "127.0.0.1", str(primary.port)])
            self.servers.append(replica.start())
            for k in range(3):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                conf = os.path.join(self._dir(f"sentinel-{k}"), "sentinel.conf")
                with open(conf, "w") as f:
                    f.write(
                        f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {os.path.dirname(conf)}\n"
                        f"logfile {os.path.dirname(conf)}/sentinel.log\n"
                        f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary.port} 2\n"
                        f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                        f"sentinel failover-timeout {self.SERVICE} 4000\n"
                    )
                proc = subprocess.Popen(
                    ["redis-sentinel", conf],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=child_setup(deadline=self.deadline),
                )
                self.sentinels.append((port, proc))
            deadline = time.monotonic() + timeout

            def ready(port: int) -> bool:
                c = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                try:
                    state = c.execute_command("SENTINEL", "MASTER", self.SERVICE)
                    state = state if isinstance(state, dict) else dict(zip(state[0::2], state[1::2], strict=True))
                    return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2
                except (redis.RedisError, OSError):
                    return False
                finally:
                    c.close()

            while not all(ready(port) for port, _ in self.sentinels):
                if time.monotonic() > deadline:
                    raise TimeoutError("the Sentinels did not see the replica and each other")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def _dir(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def addresses(self) -> str:
        """``--fleet-sentinel``'s value."""
        return ",".join(f"127.0.0.1:{port}" for port, _ in self.sentinels)

    def primary(self) -> RedisServer | None:
        """The server two Sentinels or more name as primary, if it says it is one (None: a failover is under way)."""
        import redis

        named = []
        for port, _ in self.sentinels:
            c = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
            try:
                answer = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
                named.append(int(answer[1]) if answer else None)
            except (redis.RedisError, OSError):
                named.append(None)
            finally:
                c.close()
        for server in self.servers:
            if named.count(server.port) >= 2 and server.proc is not None and server.proc.poll() is None:
                c = server.client()
                try:
                    if c.execute_command("ROLE")[0] in (b"master", "master"):
                        return server
                except (redis.RedisError, OSError):
                    return None
                finally:
                    c.close()
        return None

    def settled(self) -> bool:
        """A primary is named and every other server replicates it with its link up (a failover may start)."""
        import redis

        primary = self.primary()
        if primary is None:
            return False
        for server in self.servers:
            if server is primary:
                continue
            c = server.client()
            try:
                role = c.execute_command("ROLE")
                if role[0] not in (b"slave", "slave") or int(role[2]) != primary.port or role[3] not in (b"connected", "connected"):
                    return False
            except (redis.RedisError, OSError):
                return False
            finally:
                c.close()
        return True

    def close(self) -> None:
        for _, proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for server in self.servers:
            server.close()
