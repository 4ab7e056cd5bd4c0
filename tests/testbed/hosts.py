"""The testbed and its hosts: each host a network namespace and a mount namespace with a private /dev/shm,
linked through the forwarder; the testbed removes all of it again, also what a killed run left."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sona_shm.shm.segment import start_ticks
from sona_shm.supervise import child_setup

from .links import Links, LinkStats

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(_SCRIPTS) not in sys.path:
    sys.path.append(str(_SCRIPTS))  # scripts/children.py: the deadline and process checks the tests and scripts share
from children import DEFAULT_DEADLINE, process_running  # noqa: E402

#: Per testbed a directory here, bind-mounted on itself with private propagation (the kernel binds a
#: mount namespace only to a file on a mount that does not propagate), holding ``owner`` (the pid and
#: start time of the process that made it) and one ``HOST.mnt`` per host: its mount namespace.
STATE_DIR = Path("/run/sona-testbed")
#: Where ``ip netns add NAME`` binds network namespaces; ours are named ``TESTBED-HOST``.
NETNS_DIR = Path("/run/netns")
#: Host ``i`` (1, 2, …) has address ``10.200.0.i`` on its TUN device, with a route to the whole /16 through it.
SUBNET = "10.200.0."
SUBNET_BITS = 16
MAX_HOSTS = 254
#: The TUN device's name inside every host (each is alone in its namespace, so they never clash).
TUN = "tb0"

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000

_PREFIX = re.compile(r"[a-z][a-z0-9]{0,11}\Z")  # no dash: "sonatb" and "sonatb2" must never match each other's names
_HOST = re.compile(r"[a-z0-9][a-z0-9_]{0,31}\Z")
_libc = ctypes.CDLL(None, use_errno=True)
_serial = itertools.count()
T = TypeVar("T")


class TestbedError(RuntimeError):
    """A testbed could not be built or removed; the message names what and why."""

    __test__ = False  # not a pytest test class


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def _mount_private(path: Path) -> None:
    """Make ``path`` a bind mount of itself that propagates nothing (where mount namespaces may be bound)."""
    p = os.fsencode(path)
    _check(_libc.mount(p, p, None, _MS_BIND, None), f"mount --bind {path}")
    _check(_libc.mount(None, p, None, _MS_PRIVATE, None), f"mount --make-private {path}")


def _umount(path: Path) -> None:
    """Detach the mount at ``path`` (lazily: nothing may use it any more); a path that is no mount is left alone."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point; gone
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def in_netns(path: str | os.PathLike, fn: Callable[[], T]) -> T:
    """``fn()`` called in a new thread that entered the network namespace at ``path``; its result.

    A socket or TUN device opened there belongs to that namespace for its whole life, while
    the rest of this process stays where it is (a network namespace is per thread; a mount
    namespace is not, which is why processes in a host are started with :meth:`Host.run`).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd, _CLONE_NEWNET)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="testbed-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _open_tun() -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", TUN.encode(), _IFF_TUN | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _run(argv: list[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    """A short set-up command of the root namespace; its stdout, or TestbedError with its stderr."""
    try:
        done = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, preexec_fn=child_setup(deadline=timeout + 10)
        )
    except FileNotFoundError as exc:
        raise TestbedError(f"{argv[0]} is not installed (Debian: iproute2, util-linux)") from exc
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _ns_pids(path: Path) -> list[int]:
    """Pids of the live processes in the network namespace bound at ``path`` (``ip netns pids``, without the process)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue  # exited, or a zombie (its namespaces are gone)
            if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                found.append(int(entry))
    return found


def _kill_ns_processes(path: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in the namespace at ``path`` (by pid; the namespace is the testbed's) until none is left."""
    deadline = time.monotonic() + timeout
    while pids := _ns_pids(path):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TestbedError(f"processes {pids} in {path} survived SIGKILL for {timeout} s")
        time.sleep(0.01)


def missing_requirements() -> list[str]:
    """What this machine lacks for a testbed (empty: nothing), each with how to get it."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (namespaces, mounts and TUN devices need CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (the kernel's tun module)")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("awk", "mawk")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian: apt-get install {package})")
    return missing


class Host:
    """One host of a :class:`Testbed`: its own network stack (``addr`` on TUN device ``tb0``) and its own ``/dev/shm``.

    The rest of the file system is the machine's. Made by :meth:`Testbed.add_host`.
    """

    def __init__(self, testbed: Testbed, name: str, index: int) -> None:
        self.testbed = testbed
        self.name = name
        self.index = index
        self.addr = f"{SUBNET}{index}"
        self.netns = f"{testbed.name}-{name}"
        self.netns_path = NETNS_DIR / self.netns
        self.mnt_path = testbed.directory / f"{name}.mnt"

    def __repr__(self) -> str:
        return f"Host({self.name!r}, addr={self.addr!r}, netns={self.netns!r})"

    @property
    def nsenter(self) -> list[str]:
        """The command prefix that enters this host from a shell (for debugging: ``nsenter … bash``)."""
        return ["nsenter", f"--net={self.netns_path}", f"--mount={self.mnt_path}", "--"]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        deadline: float | None = None,
        sig: int = signal.SIGKILL,
        cwd: str | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen:
        """Start ``argv`` in this host (its network and mount namespaces); the :class:`subprocess.Popen`.

        The process gets ``sig`` when the process that called this exits (``PR_SET_PDEATHSIG``; it
        fires when the calling *thread* ends, so call it from a thread that lives as long as the
        test) and SIGALRM after ``deadline`` seconds (the testbed's by default). ``cwd``: the
        working directory (this process's by default). The testbed kills it at teardown, with
        every other process of the host.
        """
        setup = child_setup(deadline=self.testbed.deadline if deadline is None else deadline, sig=sig)
        workdir = cwd or os.getcwd()
        net = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mnt = os.open(self.mnt_path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(net)
            raise

        def enter() -> None:  # in the child, between fork and exec
            _setns(net, _CLONE_NEWNET)
            _setns(mnt, _CLONE_NEWNS)  # this resets the working directory to the namespace's root
            os.chdir(workdir)
            setup()

        try:
            proc = subprocess.Popen(list(argv), env=env, preexec_fn=enter, **popen_kwargs)
        finally:
            os.close(net)
            os.close(mnt)
        self.testbed._procs.append(proc)
        return proc

    def exec(
        self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True, input: str | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        """Run a short command in this host to its end: its exit code and output (text).

        ``check``: raise :class:`TestbedError` (with its stderr) when it exits non-zero.
        The command is killed after ``timeout`` seconds (and TimeoutError raised).
        """
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        proc = self.run(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, deadline=timeout + 10, **kwargs)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"{' '.join(argv)} in host {self.name} did not finish within {timeout} s") from None
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and done.returncode != 0:
            raise TestbedError(f"{' '.join(argv)} in host {self.name} exited with {done.returncode}: {err.strip()}")
        return done

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket of this process in this host's network namespace (closed by the testbed at teardown at the latest)."""
        sock = in_netns(self.netns_path, lambda: socket.socket(family, type, proto))
        self.testbed._sockets.add(sock)
        return sock

    def connect(self, addr: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from this host to ``addr:port`` (``TCP_NODELAY``, ``timeout`` on every call)."""
        sock = self.socket()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            sock.connect((addr, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def pids(self) -> list[int]:
        """Pids of every live process in this host (also ones its processes started)."""
        return _ns_pids(self.netns_path)


def _owner_alive(directory: Path) -> bool:
    try:
        owner = json.loads((directory / "owner").read_text())
    except (OSError, ValueError):
        return False
    return process_running(owner["pid"], owner["ticks"])


def _pid_of(name: str) -> int:
    return int(name.split("-")[1])


def _remove(name: str) -> list[str]:
    """Remove testbed ``name``: kill its hosts' processes, delete its namespaces, mounts, files and
    temporary directories. What failed."""
    problems = []
    if NETNS_DIR.is_dir():
        for entry in sorted(NETNS_DIR.iterdir()):
            if entry.name.startswith(f"{name}-"):
                try:
                    _kill_ns_processes(entry)
                    _run(["ip", "netns", "delete", entry.name])
                except (OSError, TestbedError) as exc:
                    problems.append(f"netns {entry.name}: {exc}")
    directory = STATE_DIR / name
    if directory.is_dir():
        for entry in sorted(directory.glob("*.mnt")):
            try:
                _umount(entry)
                entry.unlink()
            except OSError as exc:
                problems.append(f"{entry}: {exc}")
        try:
            _umount(directory)
            shutil.rmtree(directory)
        except OSError as exc:
            problems.append(f"{directory}: {exc}")
    for data in Path(tempfile.gettempdir()).glob(f"{name}-*"):  # Testbed.tmpdir
        shutil.rmtree(data, ignore_errors=True)
    with contextlib.suppress(OSError):
        STATE_DIR.rmdir()  # only if no other testbed is there
    return problems


def clean_stale(prefix: str) -> list[str]:
    """Remove every testbed named ``prefix`` whose process is gone (killed before its teardown); their names.

    A testbed is stale when the process in its ``owner`` file (pid and start time) no longer
    runs, or, for namespaces or temporary directories without it, when the pid in its name does not.
    """
    if not _PREFIX.match(prefix):
        raise ValueError(f"prefix: expected 1-12 lowercase letters and digits, starting with a letter; got {prefix!r}")
    pattern = re.compile(rf"({re.escape(prefix)}-\d+-\d+)(?:-|\Z)")
    names: set[str] = set()
    for where in (STATE_DIR, NETNS_DIR, Path(tempfile.gettempdir())):
        if where.is_dir():
            names.update(m.group(1) for entry in where.iterdir() if (m := pattern.match(entry.name)))
    cleaned = []
    for name in sorted(names):
        directory = STATE_DIR / name
        alive = _owner_alive(directory) if (directory / "owner").exists() else start_ticks(_pid_of(name)) != 0
        if not alive:
            problems = _remove(name)
            if problems:
                raise TestbedError(f"could not remove the stale testbed {name}: {'; '.join(problems)}")
            cleaned.append(name)
    return cleaned


class Testbed:
    """Hosts (namespaces) linked by a forwarder with a delay per pair and partitions; a context manager.

    ``prefix``: names every namespace and file of the testbed (``PREFIX-PID-N-HOST``), so that
    parallel runs never clash and a run finds what a killed run of the same prefix left
    (removed when the testbed starts). ``deadline``: seconds the forwarder and every process
    started in a host may live. ``shm_size``: each host's ``/dev/shm`` (a tmpfs; a limit, not
    reserved). ``mtu``: of every TUN device. ``delay``: the one-way delay of every pair not
    given one of its own (seconds). ``realtime``: run the forwarder under ``SCHED_FIFO``, so that a
    loaded machine delays its packets less (the delay stays a lower bound either way). Needs
    root, ``/dev/net/tun``, ``ip`` and ``unshare``.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        prefix: str = "sonatb",
        *,
        deadline: float | None = DEFAULT_DEADLINE,
        shm_size: str = "1g",
        mtu: int = 1500,
        delay: float = 0.0,
        realtime: bool = False,
    ) -> None:
        if not _PREFIX.match(prefix):
            raise ValueError(f"prefix: expected 1-12 lowercase letters and digits, starting with a letter; got {prefix!r}")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu: expected 68..65535, got {mtu}")
        self.prefix = prefix
        self.name = f"{prefix}-{os.getpid()}-{next(_serial)}"
        self.directory = STATE_DIR / self.name
        self.deadline = deadline
        self.shm_size = shm_size
        self.mtu = mtu
        self.default_delay = delay
        self.realtime = realtime
        self.hosts: dict[str, Host] = {}
        self.links: Links | None = None
        self._procs: list[subprocess.Popen] = []
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._started = False

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> Testbed:
        """Remove stale testbeds of this prefix, make this one's directory and start its forwarder."""
        if os.geteuid() != 0:
            raise TestbedError("a testbed needs root (namespaces, mounts, TUN devices)")
        if self._started:
            raise TestbedError(f"testbed {self.name} was started already")
        self._started = True
        try:
            clean_stale(self.prefix)
            for attempt in range(3):
                try:
                    self.directory.mkdir(parents=True)
                    break
                except FileNotFoundError:  # another run removed the empty STATE_DIR between our two mkdirs
                    if attempt == 2:
                        raise
            (self.directory / "owner").write_text(json.dumps({"pid": os.getpid(), "ticks": start_ticks(os.getpid())}))
            _mount_private(self.directory)
            self.links = Links(deadline=self.deadline, realtime=self.realtime)
            if self.default_delay:
                self.links.set_delay(None, None, self.default_delay)
        except BaseException:
            self.close()
            raise
        return self

    def add_host(self, name: str) -> Host:
        """A new host ``name`` (lowercase letters, digits, ``_``), linked to every other; its address is ``host.addr``."""
        if self.links is None:
            raise TestbedError("start the testbed first (with Testbed(...) as tb, or tb.start())")
        if not _HOST.match(name):
            raise ValueError(f"name: expected 1-32 lowercase letters, digits and '_', got {name!r}")
        if name in self.hosts:
            raise ValueError(f"name: host {name!r} exists in testbed {self.name}")
        if len(self.hosts) >= MAX_HOSTS:
            raise ValueError(f"a testbed holds at most {MAX_HOSTS} hosts")
        host = Host(self, name, len(self.hosts) + 1)
        self.hosts[name] = host  # before anything is made: close() removes what a failure below left
        _run(["ip", "netns", "add", host.netns])
        host.mnt_path.touch()
        # A new mount namespace, bound to host.mnt_path: a tmpfs of its own on /dev/shm, and without the
        # copies of the bound namespaces (every testbed's), which would keep those alive as long as it lives.
        script = (
            f"mount -t tmpfs -o size={self.shm_size},mode=1777 tmpfs /dev/shm && "
            "awk '$5 ~ \"^/run/(netns|sona-testbed)(/|$)\" {print $5}' /proc/self/mountinfo | sort -r | "
            'while read -r m; do umount -l "$m" 2>/dev/null; done; true'
        )
        _run(["unshare", f"--mount={host.mnt_path}", "--propagation", "private", "sh", "-c", script])
        tun = in_netns(host.netns_path, _open_tun)
        try:
            self.links.add(name, host.addr, tun)
        finally:
            os.close(tun)  # the forwarder holds it now: the device lives as long as the forwarder
        _run(
            ["ip", "-n", host.netns, "-batch", "-"],
            input=f"link set lo up\naddr add {host.addr}/{SUBNET_BITS} dev {TUN}\nlink set {TUN} mtu {self.mtu} up\n",
        )
        return host

    def tmpdir(self, label: str) -> Path:
        """A new directory ``TMP/TESTBED-LABEL-XXXX`` (data of the hosts' servers); removed with the testbed,
        and by :func:`clean_stale` when a killed run left it."""
        return Path(tempfile.mkdtemp(prefix=f"{self.name}-{label}-"))

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def _name(self, host: Host | str) -> str:
        name = host.name if isinstance(host, Host) else host
        if name not in self.hosts:
            raise ValueError(f"host: expected one of {sorted(self.hosts)}, got {name!r}")
        return name

    def _links(self) -> Links:
        if self.links is None:
            raise TestbedError("start the testbed first (with Testbed(...) as tb, or tb.start())")
        return self.links

    def set_delay(self, a: Host | str, b: Host | str, seconds: float, *, both_ways: bool = True) -> None:
        """The one-way delay from ``a`` to ``b`` (and from ``b`` to ``a`` unless ``both_ways`` is False); a ping's RTT is twice it."""
        links = self._links()
        links.set_delay(self._name(a), self._name(b), seconds)
        if both_ways:
            links.set_delay(self._name(b), self._name(a), seconds)

    def set_default_delay(self, seconds: float) -> None:
        """The one-way delay of every pair that was not given one of its own."""
        self._links().set_delay(None, None, seconds)

    def _pairs(self, side_a: Iterable[Host | str], side_b: Iterable[Host | str]) -> list[tuple[str, str]]:
        a = [self._name(h) for h in side_a]
        b = [self._name(h) for h in side_b]
        return [(x, y) for x in a for y in b] + [(y, x) for x in a for y in b]

    def partition(self, side_a: Iterable[Host | str], side_b: Iterable[Host | str]) -> None:
        """Drop every packet between a host of ``side_a`` and one of ``side_b`` (both ways) until :meth:`heal`.

        Hosts on neither side still reach both: ``partition([primary], [replica, *sentinels])``
        is a split brain in which the other hosts still write to the old primary.
        """
        self._links().block(self._pairs(side_a, side_b))

    def heal(self, side_a: Iterable[Host | str] | None = None, side_b: Iterable[Host | str] | None = None) -> None:
        """End the partition between ``side_a`` and ``side_b`` (no sides: every partition)."""
        links = self._links()
        if side_a is None and side_b is None:
            links.unblock([tuple(p) for p in links.statistics().blocked])
        else:
            links.unblock(self._pairs(side_a or (), side_b or ()))

    def statistics(self) -> LinkStats:
        """The forwarder's counters: packets forwarded and dropped per pair, and how late it was."""
        return self._links().statistics()

    def close(self) -> None:
        """Kill every process of every host (by pid), stop the forwarder, remove the namespaces, mounts and files.

        Safe to call twice and after a failed :meth:`start`. Raises TestbedError after doing
        all it could if something could not be removed.
        """
        problems = []
        for sock in list(self._sockets):
            sock.close()
        for host in self.hosts.values():
            try:
                _kill_ns_processes(host.netns_path)
            except TestbedError as exc:
                problems.append(str(exc))
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()  # started in a host that was never made whole
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        self._procs.clear()
        if self.links is not None:
            self.links.close()
            self.links = None
        if self._started:
            problems += _remove(self.name)
        self.hosts.clear()
        if problems:
            raise TestbedError(f"testbed {self.name} left: {'; '.join(problems)}")
