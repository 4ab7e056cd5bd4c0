"""Create, open, map and remove one segment; its doorbell; its advisory locks.

The layout itself is in :mod:`sona_shm.shm.layout`. This module is the only one that
talks to ``posix_ipc``, ``mmap`` and ``fcntl``.

Why ``posix_ipc`` and not ``multiprocessing.shared_memory``: before Python 3.13 the
latter registers every attached segment with the resource tracker, which unlinks it
when *any* attaching process exits — a gunicorn worker recycled by ``max_requests``
would delete the engine under everybody's feet.

Why every object is checked when it is opened: ``/dev/shm`` is writable by every user,
so anyone can create ``sona_shm.<name>`` (or its doorbell) before the engine's flusher
does — a squatter who would then read what producers record and write the weights
they apply. A segment is therefore created with ``O_EXCL`` (never taken over), and an
existing one, like the doorbell, is used only if it is a regular file owned by this
process's user (or, for a ``--group`` engine, a group it belongs to) with no permission
beyond the engine's mode (0600, or 0660 with ``--group``); see :func:`check_object`.

Why open-file-description locks (``F_OFD_SETLK``) for ownership: the kernel releases
them when the holder dies, however it dies, so a SIGKILLed worker never leaves a lane
or the flusher slot taken, and a recycled pid cannot impersonate a dead owner. Unlike
classic POSIX record locks they belong to one ``open()`` — closing some other
descriptor of the same file in the same process does not drop them — and a forked
child that closes its inherited copy does not release the parent's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

import posix_ipc

from ..checks import check_timeout
from ..errors import EngineDestroyedError, InvalidInputError, NoSpaceError, SegmentNotFoundError, UntrustedSegmentError
from ..native import speedups as _speedups
from .layout import HEADER_BYTES, Layout

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PREFIX = "/sona_shm."
DEFAULT_MODE = 0o600
GROUP_MODE = 0o660

_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64: type, whence, start, len, pid
#: madvise() advice: fault pages in writable now (linux/mman.h; Linux >= 5.14, not in Python's mmap module).
MADV_POPULATE_WRITE = 23


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid engine name, else raise naming the rule."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInputError(f"name: expected 1-64 characters from [A-Za-z0-9_.-] starting with a letter or digit, got {name!r}")
    return name


SHM_DIR = "/dev/shm"


def segment_path(name: str) -> str:
    return PREFIX + name


def bell_path(name: str) -> str:
    return PREFIX + name + ".bell"


def segment_file(name: str) -> str:
    """Where the kernel keeps segment ``name`` (glibc's ``shm_open`` directory)."""
    return SHM_DIR + segment_path(name)


def bell_file(name: str) -> str:
    """Where the kernel keeps the doorbell of ``name`` (glibc's ``sem_open``: ``sem.`` + the name)."""
    return f"{SHM_DIR}/sem.{bell_path(name)[1:]}"


def check_object(st: os.stat_result, path: str, name: str, *, engine_mode: int | None = None) -> None:
    """Refuse ``path`` (``st`` is its stat) unless it can be engine ``name``'s segment or doorbell.

    ``engine_mode``: the flusher's, which creates or adopts the engine: the object must be
    owned by this process's user and allow nothing beyond ``engine_mode``. Anyone else
    (``None``: producers, consumers, the monitor) accepts an object of its own user, or a
    group engine (0660) of a group it belongs to, and never one open to other users.
    Raises :class:`UntrustedSegmentError`; nothing has been read from or written to it.
    """
    euid = os.geteuid()
    perm = stat.S_IMODE(st.st_mode)
    remove = f"its owner (or root) can remove it with `sona-shm destroy --name {name}`"
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedSegmentError(
            f"{path}: expected a regular file, got {file_kind(st.st_mode)} ({stat.filemode(st.st_mode)}); "
            f"not a sona_shm engine, nothing was used; {remove}"
        )
    allowed = GROUP_MODE if engine_mode is None else engine_mode
    if perm & ~allowed:
        hint = ""
        if engine_mode == DEFAULT_MODE and perm == GROUP_MODE:
            hint = (
                "; start the flusher with --group to adopt a group engine"
                if st.st_uid == euid
                else f"; it is a group engine of uid {st.st_uid}: only a flusher running as that user may adopt it"
            )
        raise UntrustedSegmentError(
            f"{path}: mode {perm:04o} allows more than an engine's {allowed:04o} (0600, or 0660 with --group), so other "
            f"users may read or write it; nothing was used{hint or '; ' + remove}"
        )
    if st.st_uid == euid:
        return
    if engine_mode is None and perm & 0o060 == 0o060 and (st.st_gid == os.getegid() or st.st_gid in os.getgroups()):
        return  # a group engine of one of our groups: its members may write it anyway
    raise UntrustedSegmentError(
        f"{path}: owned by uid {st.st_uid} (gid {st.st_gid}), expected this process's uid {euid}"
        + ("" if engine_mode is not None else " or a group engine (0660) of one of its groups")
        + f": another user's object, not this engine; nothing was used; {remove}"
    )


def file_kind(mode: int) -> str:
    """What kind of file ``mode`` (``st_mode``) is, in words: "a FIFO (named pipe)", "a directory", ..."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "a file of unknown type"


def start_ticks(pid: int) -> int:
    """Start time of process ``pid`` in clock ticks since boot; 0 if it does not exist.

    Together with the pid this identifies a process across pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # Field 2 (comm) may contain spaces and parentheses; fields after the last ')' are fixed.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def process_alive(pid: int, ticks: int) -> bool:
    """True if ``pid`` runs and started at ``ticks`` (so it is the same process)."""
    return pid > 0 and ticks != 0 and start_ticks(pid) == ticks


#: A segment's descriptor after fork(), until the child opens its own (Segment.reopen_fd).
_FORKED: Any = object()


class PyDescriptor:
    """:class:`Descriptor` without the C module: ``os.open``'s number is stored one bytecode after the kernel
    returned it, so a signal handler raising exactly there (a KeyboardInterrupt) would lose it. Everything
    else is the same: closed exactly once, by :meth:`close` (any number of calls) or when collected."""

    __slots__ = ("_fd",)

    def __init__(self, path: str, flags: int, /) -> None:
        self._fd = -1
        self._fd = os.open(path, flags | os.O_CLOEXEC)

    @classmethod
    def dup(cls, fd: int, /) -> PyDescriptor:
        new = cls.__new__(cls)
        new._fd = -1
        new._fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        return new

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Descriptor is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1  # taken before it is closed: two stores, no call between, so no signal either
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __del__(self) -> None:
        self.close()


#: An open descriptor owned by an object from the moment it is opened, closed exactly once — by ``close()``
#: (callable any number of times) or when the object is collected — so an interruption can neither leak it
#: nor close its number twice (which could close another file that got the number). The C twin opens it in
#: C, where no Python signal handler can run between the kernel's answer and the object holding it.
Descriptor: Any = _speedups.Descriptor if _speedups is not None else PyDescriptor


class Segment:
    """A mapped segment: the layout, a ``memoryview`` of every byte, and its locks.

    ``buf`` is the whole mapping as bytes; ``u64`` and ``f64`` are the same memory cast
    to 8-byte words (index = byte offset // 8), the cheapest way Python reads and
    writes one aligned word (~15 ns, against ~30 ns through numpy).
    """

    def __init__(self, name: str, file: Any, layout: Layout, writable: bool) -> None:
        """Map segment ``name`` through ``file`` (a :data:`Descriptor`), which this object closes with itself
        once the constructor returned (if it raises, the caller closes it). A caller that also closes it on an
        error path closes nothing twice."""
        self.name = name
        self.layout = layout
        self.writable = writable
        self._file: Any = file  # None: closed; FORKED: a fork child's, until reopen_fd()
        self._mmap: mmap.mmap | None = None
        self._bell: posix_ipc.Semaphore | None = None
        try:
            fd = file.fileno()
            st = os.fstat(fd)
            self._inode = (st.st_dev, st.st_ino)  # the object mapped: reopen_fd() must find this one
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            # mmap.mmap keeps a dup() of the descriptor it maps, and a dup shares the open
            # file description and so its locks: mapping ``fd`` itself would keep a lane
            # locked after close_fd()/forget_inherited_fd() and in every fork child for as
            # long as the mapping lives. Map through a second description of the same
            # file (reopened via /proc, so an unlinked-and-recreated name cannot swap
            # it) that never holds a lock. (Python 3.13's trackfd=False would do too.)
            map_file = Descriptor(f"/proc/self/fd/{fd}", os.O_RDWR if writable else os.O_RDONLY)
            try:
                self._mmap = mmap.mmap(map_file.fileno(), layout.total_bytes, mmap.MAP_SHARED, prot)
            except OSError as exc:
                if exc.errno not in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG, errno.EOVERFLOW):
                    raise
                raise NoSpaceError(f"segment {name!r}: cannot map its {layout.total_bytes} bytes ({exc.strerror})") from None
            finally:
                map_file.close()
            self.buf = memoryview(self._mmap)
            self.u64 = self.buf.cast("Q")
            self.f64 = self.buf.cast("d")
        except BaseException:
            self._file = None  # still the caller's to close (it may unlink the name through it first)
            self.close()
            raise

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(cls, name: str, *, writable: bool = True, timeout: float = 0.0) -> Segment:
        """Map an existing, fully created segment.

        Waits up to ``timeout`` seconds for it to appear and for its creator to finish
        the header; raises :class:`SegmentNotFoundError` or :class:`LayoutMismatchError`.
        """
        check_name(name)
        deadline = time.monotonic() + check_timeout(timeout)
        delay = 0.001
        while True:
            try:
                return cls._open_once(name, writable)
            except (SegmentNotFoundError, _Incomplete) as exc:
                if time.monotonic() >= deadline:
                    if isinstance(exc, _Incomplete):
                        raise SegmentNotFoundError(
                            f"segment {name!r} exists but its creator never finished it; start "
                            f"`sona-shm flusher --name {name}` to re-initialise it or `sona-shm destroy --name {name}`"
                        ) from None
                    raise
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)

    @classmethod
    def _open_once(cls, name: str, writable: bool) -> Segment:
        file = open_fd(name, writable=writable)
        try:
            fd = file.fileno()
            size = os.fstat(fd).st_size
            raw = os.pread(fd, HEADER_BYTES, 0) if size >= HEADER_BYTES else b""
            if len(raw) < HEADER_BYTES or raw[:8] == b"\0" * 8:
                raise _Incomplete(name)
            layout = Layout.from_header(raw, name, size)
            return cls(name, file, layout, writable)
        except BaseException:
            file.close()
            raise

    def fileno(self) -> int:
        """The descriptor that holds this process's locks (-1 when closed, -2 after a fork until reopened)."""
        file = self._file
        return -1 if file is None else -2 if file is _FORKED else file.fileno()

    @property
    def _fd(self) -> int:
        return self.fileno()

    @property
    def mode(self) -> int:
        """The segment's permission bits (0600, or 0660 for a group engine)."""
        return stat.S_IMODE(os.fstat(self._fd).st_mode)

    # ----------------------------------------------------------------- locks

    def try_lock(self, byte: int) -> bool:
        """Take the exclusive lock on ``byte`` without waiting; False if someone holds it."""
        return try_lock_fd(self._fd, byte)

    def unlock(self, byte: int) -> None:
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0))

    def is_locked(self, byte: int) -> bool:
        """True if an open file description other than ours holds ``byte`` (changes nothing)."""
        return is_locked_fd(self._fd, byte)

    def held_locks(self, bytes_: list[int]) -> list[bool]:
        """Which of ``bytes_`` are locked by anyone, this process included.

        Probes through a fresh read-only descriptor (a lock query never reports the
        asker's own locks), takes no lock and changes nothing.
        """
        probe = open_fd(self.name, writable=False)
        try:
            return [is_locked_fd(probe.fileno(), b) for b in bytes_]
        finally:
            probe.close()

    def forget_inherited_fd(self) -> None:
        """Close a descriptor inherited through ``fork()``; call :meth:`reopen_fd` before locking.

        The inherited descriptor shares the parent's open file description and so the
        parent's locks; the child must not hold it, or a dead parent's lane would stay
        locked for as long as the child lives. The mapping stays valid.
        """
        file, self._file = self._file, _FORKED  # "needs reopening", distinct from closed; taken first: see close()
        if file is not None and file is not _FORKED:
            file.close()

    def reopen_fd(self) -> None:
        """Open this process's own descriptor after :meth:`forget_inherited_fd`.

        Raises :class:`EngineDestroyedError` if the name no longer leads to the object
        this process maps (removed, and maybe created anew).
        """
        if self._file is _FORKED:
            try:
                file = open_fd(self.name, writable=self.writable)
            except SegmentNotFoundError:
                raise self.destroyed_error() from None
            st = os.fstat(file.fileno())
            if (st.st_dev, st.st_ino) != self._inode:
                file.close()
                raise self.destroyed_error()
            self._file = file

    def destroyed(self) -> bool:
        """True once the segment was removed (``sona-shm destroy``): its file has no name left.

        One ``fstat`` (~0.5 µs); False while there is no descriptor to ask (closed, or a
        fork child before :meth:`reopen_fd`, which checks on its own).
        """
        return self._fd >= 0 and os.fstat(self._fd).st_nlink == 0

    def destroyed_error(self) -> EngineDestroyedError:
        return EngineDestroyedError(
            f"segment {self.name!r} was destroyed (`sona-shm destroy`) while this process had it mapped; "
            f"nothing more is learned from it: attach again once `sona-shm flusher --name {self.name}` created it anew"
        )

    # ----------------------------------------------------------------- doorbell

    @property
    def bell(self) -> posix_ipc.Semaphore:
        """The flusher's doorbell semaphore (opened on first use)."""
        if self._bell is None:
            self._bell = open_bell(self.name)
        return self._bell

    def ring(self) -> None:
        """Wake the flusher if it sleeps (a doorbell, not a message: losing one costs a timeout)."""
        self.bell.release()

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Unmap and close. Safe to call twice, after a failed constructor, and after a close() an exception
        (a KeyboardInterrupt, say) interrupted: each resource is taken out of the object before it is
        released, so none is released twice (a second ``os.close`` could close another file that got the number)."""
        for attr in ("f64", "u64", "buf"):
            view = self.__dict__.pop(attr, None)
            if view is not None:
                view.release()
        mapping, self._mmap = self.__dict__.get("_mmap"), None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a numpy view still refers to it; the mapping goes with the last view
        bell, self._bell = self.__dict__.get("_bell"), None
        if bell is not None:
            bell.close()
        file, self._file = self.__dict__.get("_file"), None
        if file is not None and file is not _FORKED:
            file.close()  # drops this process's locks (a lane's); a lost Segment's file closes itself when collected

    @property
    def closed(self) -> bool:
        return self._file is None

    def populate(self, offset: int, length: int) -> bool:
        """Fault in bytes ``[offset, offset + length)`` of the mapping for writing, now; False if the kernel cannot.

        The segment's pages are reserved at creation but still zero-filled and mapped on
        first touch, one fault per page (~1 µs each with the clearing): a flusher copying
        every learned trajectory into a fresh buffer page paid that on each one. One
        ``madvise(MADV_POPULATE_WRITE)`` (Linux >= 5.14) pays it up front. Where it is
        unsupported nothing happens and the pages fault in as they are used.
        """
        assert self._mmap is not None, "segment is closed"
        start = offset - offset % mmap.PAGESIZE
        length += offset - start
        if length <= 0 or not self.writable:
            return False
        try:
            self._mmap.madvise(MADV_POPULATE_WRITE, start, length)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # an older kernel
                return False
            raise
        return True

    def numpy_buffer(self) -> mmap.mmap:
        """The mapping, for building numpy views (``np.ndarray(buffer=...)``)."""
        assert self._mmap is not None, "segment is closed"
        return self._mmap


class _Incomplete(Exception):
    """The segment exists but its header is not (yet) complete."""


def try_lock_fd(fd: int, byte: int) -> bool:
    """Take the exclusive OFD lock on ``byte`` of ``fd`` without waiting; False if held."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def is_locked_fd(fd: int, byte: int) -> bool:
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK


def open_fd(name: str, *, writable: bool, engine_mode: int | None = None) -> Any:
    """A private, close-on-exec :data:`Descriptor` of segment ``name``, after :func:`check_object` accepted it.

    Opened the way ``shm_open`` opens it (``O_NOFOLLOW | O_CLOEXEC`` in /dev/shm), plus
    ``O_NONBLOCK``: anyone may put a FIFO at an engine's name, and a plain read-only
    ``open()`` of a FIFO waits for a writer forever (``sona-shm list``, ``stats``, a
    Prometheus scrape would hang). With ``O_NONBLOCK`` the open returns at once, the
    file type is checked on the descriptor (no race with a replacement of the name),
    and blocking mode is restored only once it is known to be a regular file.
    """
    path = segment_file(name)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        file = Descriptor(path, flags)
    except FileNotFoundError:
        raise SegmentNotFoundError(
            f"segment {name!r} does not exist; start `sona-shm flusher --name {name}` (or `sona-shm create`) first"
        ) from None
    except PermissionError:
        if engine_mode is not None:  # the flusher: say whose it is
            with contextlib.suppress(OSError):
                check_object(os.stat(path), path, name, engine_mode=engine_mode)
        raise SegmentNotFoundError(f"segment {name!r}: permission denied (it belongs to another user or group)") from None
    except OSError as exc:  # a symlink (O_NOFOLLOW: ELOOP), a directory opened for writing (EISDIR), ...
        raise UntrustedSegmentError(f"{path}: cannot be opened as a segment ({exc.strerror or exc}); nothing was used") from None
    try:
        check_object(os.fstat(file.fileno()), path, name, engine_mode=engine_mode)
        os.set_blocking(file.fileno(), True)  # a regular file: O_NONBLOCK changed nothing, but leave no surprise behind
    except BaseException:
        file.close()
        raise
    return file


def open_bell(name: str, *, engine_mode: int | None = None) -> posix_ipc.Semaphore:
    """The doorbell of ``name``, after :func:`check_object` accepted its file."""
    try:
        bell = posix_ipc.Semaphore(bell_path(name))
    except posix_ipc.ExistentialError:
        raise SegmentNotFoundError(f"segment {name!r} has no doorbell semaphore; was it destroyed?") from None
    except posix_ipc.PermissionsError:
        raise UntrustedSegmentError(f"{bell_file(name)}: permission denied: another user's object, not this engine's doorbell") from None
    try:
        # sem_open gives no descriptor to fstat; the file at the name now is the one opened
        # (sem_open does not follow symlinks, and only the owner may replace it in /dev/shm).
        check_object(os.stat(bell_file(name)), bell_file(name), name, engine_mode=engine_mode)
    except FileNotFoundError:
        bell.close()
        raise SegmentNotFoundError(f"segment {name!r} has no doorbell semaphore; was it destroyed?") from None
    except BaseException:
        bell.close()
        raise
    return bell


def create_fd(name: str, size: int, mode: int) -> Any:
    """Create segment ``name`` of ``size`` zero bytes with exactly ``mode``, its backing reserved.

    FileExistsError if it exists (``O_EXCL``: an object someone else put there is never
    taken over); :class:`NoSpaceError` if the backing cannot be reserved, and then
    nothing is left behind.
    """
    try:
        shm = posix_ipc.SharedMemory(segment_path(name), posix_ipc.O_CREX, mode=mode, size=0)
    except posix_ipc.ExistentialError:
        raise FileExistsError(segment_path(name)) from None
    try:
        file = Descriptor.dup(shm.fd)
    finally:
        shm.close_fd()
    try:
        os.fchmod(file.fileno(), mode)  # shm_open applied the umask
        reserve(file.fileno(), size, name)
    except BaseException:
        unlink_created(name, file.fileno())
        file.close()
        raise
    return file


def reserve(fd: int, size: int, name: str) -> None:
    """Make segment ``name`` (open as ``fd``) ``size`` bytes long with every page allocated.

    tmpfs otherwise allocates a page on its first write, and a write it cannot allocate
    (a full /dev/shm) kills the writer with SIGBUS. Pages already allocated cost nothing,
    so this also completes a segment an older sona_shm created without reserving it.
    Raises :class:`NoSpaceError` when the room is not there (what was allocated by this
    call is given back by the kernel).
    """
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise NoSpaceError(
            f"segment {name!r}: cannot reserve its {size} bytes in /dev/shm ({exc.strerror}); free some room there "
            f"or make the engine smaller (--lane-slots, --capacity)"
        ) from None


def unlink_created(name: str, fd: int) -> None:
    """Remove segment ``name`` if it is still the object open as ``fd`` (after a failed creation)."""
    try:
        here = os.stat(segment_file(name))
    except OSError:
        return
    mine = os.fstat(fd)
    if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
        try:
            posix_ipc.unlink_shared_memory(segment_path(name))
        except posix_ipc.ExistentialError:
            pass


def create_bell(name: str, mode: int) -> None:
    """Create the doorbell semaphore with exactly ``mode``, or keep an existing one that
    :func:`check_object` accepts for an engine of ``mode`` (a leftover of ours)."""
    old = os.umask(0)  # sem_open applies the umask and has no fchmod; the flusher is single-threaded here
    try:
        posix_ipc.Semaphore(bell_path(name), posix_ipc.O_CREX, mode=mode, initial_value=0).close()
        return
    except posix_ipc.ExistentialError:
        pass
    finally:
        os.umask(old)
    open_bell(name, engine_mode=mode).close()


def unlink(name: str) -> list[str]:
    """Remove segment ``name`` and its doorbell; return what existed and was removed.

    Like ``shm_unlink``: processes that have it mapped keep using their mapping until
    they close it; the name is free at once for a new segment.
    """
    check_name(name)
    removed = []
    for path, remove in ((segment_path(name), posix_ipc.unlink_shared_memory), (bell_path(name), posix_ipc.unlink_semaphore)):
        try:
            remove(path)
            removed.append(path)
        except posix_ipc.ExistentialError:
            pass
        except posix_ipc.PermissionsError:
            raise UntrustedSegmentError(f"{path}: permission denied: only its owner (or root) may remove it") from None
    return removed


def wait_until(predicate: Callable[[], bool], timeout: float, *, first_delay: float = 0.0001, max_delay: float = 0.005) -> bool:
    """Poll ``predicate`` with exponential back-off until true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)
