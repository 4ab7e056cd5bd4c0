"""Drain learned trajectories out of an engine's buffer, from any process.

The flusher copies every trajectory it learns into the buffer ring (``capacity``
slots) while there is room, and counts the rest as dropped — learning never waits for
a consumer. A consumer (Loop B: pattern extraction, base-LoRA training, an export job)
takes them out, oldest first, either as :class:`~sona_shm.Trajectory` objects or as one
:class:`TrajectoryBatch` of numpy arrays.

The protocol (layout in :mod:`sona_shm.shm.layout`, "CONSUMER_LINE"):

1. Take the drain lock, an OFD lock on byte ``LOCK_DRAIN`` of the segment file. It
   makes consumers take turns, so no trajectory is handed out twice; the kernel drops
   it when its holder dies, so a SIGKILLed consumer never wedges the others.
2. Read ``buffer_head`` from the ledger (one consistent read) and ``buffer_tail`` from
   the consumer line (only the lock holder writes it). The flusher never writes the
   slots in ``[tail, head)``, so they can be copied out at leisure.
3. Copy slots ``[tail, min(head, tail + n))`` out of the ring, then store the new tail —
   the one store that hands them over (and frees them for the flusher; x86-64 never
   makes a store visible before the loads that precede it, so the flusher cannot reuse
   a slot we are still reading). A consumer killed before that store consumed nothing:
   the next one gets the same trajectories.
4. Release the lock.

:meth:`Consumer.draining` exposes the gap between 3's copy and 3's store, so a durable
sink (``sona-shm drain --out FILE``) writes its file first and only then lets the
trajectories go: at least once, never lost.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO

import numpy as np

from ..checks import check_int, check_timeout
from ..errors import ClosedError, DrainTimeoutError, InvalidInputError, SonaShmError
from ..shm import slots
from ..shm.layout import CONSUMER_WORDS, LOCK_DRAIN
from ..shm.ledger import Ledger, TornRead, read_route_table
from ..shm.segment import Segment, wait_until
from ..store.rows import writer_for
from ..trajectory import Trajectory, TrajectoryBatch

log = logging.getLogger("sona_shm.consumer")

#: Default seconds a drain waits for another consumer to release the drain lock.
DRAIN_TIMEOUT = 5.0
#: The largest ``n`` a drain accepts (the buffer never holds more than ``capacity``).
MAX_N = 2**62

_consumers: weakref.WeakSet[Consumer] = weakref.WeakSet()


def open_consumer(name: str, *, timeout: float = 0.0) -> Consumer:
    """Map engine ``name`` to drain its buffer (``timeout``: seconds to wait for it to appear)."""
    return Consumer(name, timeout=timeout)


class Consumer:
    """Takes learned trajectories out of one engine's buffer; see the module docstring.

    Any number of processes (and threads) may hold one; they take turns on the drain
    lock. A consumer attached before ``fork()`` works in the child, which uses its own
    descriptor (an inherited one would share the parent's lock).
    """

    def __init__(self, name: str, *, timeout: float = 0.0) -> None:
        self._segment: Segment | None = None
        self._segment = seg = Segment.open(name, writable=True, timeout=timeout)
        try:
            layout = self.layout = seg.layout
            self.name = name
            self._ledger = Ledger(seg)
            self._slots = np.ndarray((layout.capacity,), dtype=layout.slot_dtype, buffer=seg.numpy_buffer(), offset=layout.buffer_offset)
            self._u64, self._f64 = seg.u64, seg.f64
            self._w_tail, self._w_pid, self._w_at = CONSUMER_WORDS.tail, CONSUMER_WORDS.pid, CONSUMER_WORDS.drained_at
            self._lock = threading.Lock()  # an OFD lock does not exclude threads sharing its descriptor
            self._holder: int | None = None
        except BaseException:
            self.close()
            raise
        _consumers.add(self)

    # ----------------------------------------------------------------- draining

    def drain(self, *, timeout: float = DRAIN_TIMEOUT) -> list[Trajectory]:
        """Remove and return every buffered trajectory, oldest first."""
        return self.drain_arrays(timeout=timeout).trajectories()

    def drain_n(self, n: int, *, timeout: float = DRAIN_TIMEOUT) -> list[Trajectory]:
        """Remove and return up to ``n`` buffered trajectories, oldest first."""
        check_int("n", n, 0, MAX_N)
        return self.drain_arrays(n, timeout=timeout).trajectories()

    def drain_arrays(self, n: int | None = None, *, timeout: float = DRAIN_TIMEOUT) -> TrajectoryBatch:
        """Remove up to ``n`` buffered trajectories (all when ``None``) and return them as arrays."""
        with self.draining(n, timeout=timeout) as batch:
            return batch

    @contextmanager
    def draining(self, n: int | None = None, *, timeout: float = DRAIN_TIMEOUT) -> Iterator[TrajectoryBatch]:
        """Hold the drain lock and yield up to ``n`` buffered trajectories (all when ``None``).

        They leave the buffer only when the ``with`` block ends without an exception;
        if it raises, or the process dies inside it, they stay for the next drain.
        Other consumers wait for the lock meanwhile, so keep the block short.
        ``timeout``: seconds to wait for another consumer's lock
        (:class:`DrainTimeoutError` after that).
        """
        limit = check_int("n", MAX_N if n is None else n, 0, MAX_N)  # an int: a numpy integer must not leak into the tail word
        with self._drain_lock(check_timeout(timeout)):
            u64 = self._u64
            tail = u64[self._w_tail]  # only the lock holder writes it: stable while we hold it
            end = min(self._committed_head(tail), tail + limit)
            batch = self._copy(tail, end)
            yield batch
            u64[self._w_tail] = end  # hands [tail, end) over: the flusher may now reuse those slots
            if end > tail:
                self._f64[self._w_at] = time.time()

    def peek(self, n: int | None = None, *, timeout: float = DRAIN_TIMEOUT) -> TrajectoryBatch:
        """Copies of up to ``n`` buffered trajectories (all when ``None``), oldest first; they stay in the buffer.

        Takes the drain lock for the copy (``timeout`` as :meth:`draining`): what a consumer drains meanwhile is
        either all in the copy or not in it.
        """
        limit = check_int("n", MAX_N if n is None else n, 0, MAX_N)
        with self._drain_lock(check_timeout(timeout)):
            tail = self._u64[self._w_tail]  # stable while we hold the lock; we publish nothing
            return self._copy(tail, min(self._committed_head(tail), tail + limit))

    def buffer_stats(self) -> tuple[int, int, float]:
        """``(len, dropped, success_rate)`` of the buffer, as ``InstantLoop.buffer_stats``."""
        seg = self._open_segment()
        return buffer_stats(seg, self._ledger)

    # ----------------------------------------------------------------- internals

    def _open_segment(self) -> Segment:
        seg = self._segment
        if seg is None or seg.closed:
            raise ClosedError(f"consumer of segment {getattr(self, 'name', '?')!r} is closed; open it again")
        return seg

    @contextmanager
    def _drain_lock(self, timeout: float) -> Iterator[None]:
        seg = self._open_segment()
        if self._holder == threading.get_ident():
            raise SonaShmError(f"segment {self.name!r}: this thread is already draining (inside draining()); finish that block first")
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=min(timeout, threading.TIMEOUT_MAX)):
            raise DrainTimeoutError(self._busy_message(timeout, "another thread of this process"))
        try:
            seg.reopen_fd()  # a fork child's own descriptor, opened after _forked()
            if not wait_until(lambda: seg.try_lock(LOCK_DRAIN), max(0.0, deadline - time.monotonic()), max_delay=0.01):
                raise DrainTimeoutError(self._busy_message(timeout, f"pid {self._u64[self._w_pid]}, the last consumer to take it"))
            self._holder = threading.get_ident()
            try:
                self._u64[self._w_pid] = os.getpid()
                yield
            finally:
                self._holder = None
                seg.unlock(LOCK_DRAIN)
        finally:
            self._lock.release()

    def _busy_message(self, timeout: float, holder: str) -> str:
        return f"segment {self.name!r}: the drain lock stayed held ({holder}) for {timeout} s; another consumer is draining, retry later"

    def _committed_head(self, tail: int) -> int:
        """``buffer_head`` of the current ledger copy, or ``tail`` (drain nothing) if unreadable."""
        try:
            (head,) = self._ledger.read("buffer_head")
        except TornRead:
            return tail  # the flusher committed faster than we read; an empty drain is always safe
        if head < tail:
            log.error("segment %r: buffer_head %d is behind buffer_tail %d; draining nothing", self.name, head, tail)
            return tail
        return head

    def _copy(self, start: int, end: int) -> TrajectoryBatch:
        """Private copies of buffer slots ``[start, end)``, padding zeroed (:func:`sona_shm.shm.slots.decode`).

        A slot that fails its checks is logged and skipped rather than raised: it would
        otherwise sit at the tail and fail every drain after this one.
        """
        index = np.arange(start, end, dtype=np.uint64)
        pos = (index % np.uint64(max(self.layout.capacity, 1))).astype(np.intp)
        batch, ok = slots.decode(self._slots, pos, start + 1, self.layout)
        if not ok.all():
            bad = index[~ok]
            log.error("segment %r: %d buffer slots fail their checks (first index %d); skipped", self.name, len(bad), int(bad[0]))
        return batch

    # ----------------------------------------------------------------- lifecycle

    def _forked(self) -> None:
        """In a fork child: drop the inherited descriptor (it shares the parent's drain lock)."""
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._holder = None
        if self._segment is not None and not self._segment.closed:
            self._segment.forget_inherited_fd()

    def close(self) -> None:
        """Unmap and close. Safe to call twice. Undrained trajectories stay in the buffer."""
        seg = self._segment
        if seg is None:
            return
        self.__dict__.pop("_slots", None)
        self.__dict__.pop("_u64", None)
        self.__dict__.pop("_f64", None)
        ledger = self.__dict__.pop("_ledger", None)
        if ledger is not None:
            ledger.close()
        seg.close()
        self._segment = None
        _consumers.discard(self)

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sona_shm.Consumer {getattr(self, 'name', '?')!r}>"


def buffer_stats(segment: Segment, ledger: Ledger) -> tuple[int, int, float]:
    """``(len, dropped, success_rate)`` of a segment's buffer, read without a lock."""
    tail = segment.u64[CONSUMER_WORDS.tail]  # before the head: len is never negative
    head, dropped, seen = ledger.read("buffer_head", "buffer_dropped", "trajectories_processed")
    return head - tail, dropped, 1.0 if seen == 0 else (seen - dropped) / seen


def drain_to_file(name: str, path: str | os.PathLike[str], *, n: int | None = None, timeout: float = DRAIN_TIMEOUT) -> int:
    """Move up to ``n`` buffered trajectories (all when ``None``) of engine ``name`` into a file at ``path``.

    Its suffix says the format: ``.npz`` (:meth:`TrajectoryBatch.save`, padded arrays), ``.jsonl`` or
    ``.parquet`` (one unpadded row per trajectory, :mod:`sona_shm.store.rows`). The file is
    written under a hidden temporary name next to ``path``, synced, and linked to ``path``
    (never replacing an existing file); only then do the trajectories leave the buffer.
    Killed at any point, nothing is lost; killed between the link and that last store, the
    next drain hands the same trajectories out again (their ``traj_id`` tells). Returns how
    many were written.
    """
    out = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(out)
    if os.path.lexists(out):
        raise InvalidInputError(f"out: expected a new file, {out!r} exists (drained trajectories leave the buffer; pick another name)")
    if not os.path.isdir(directory):
        raise InvalidInputError(f"out: expected a file in an existing directory, {directory!r} is not a directory")
    if n is not None:
        check_int("n", n, 0, MAX_N)
    writer = writer_for(out)
    with open_consumer(name) as consumer:
        table = read_route_table(consumer._open_segment())
        names = table.names if table is not None else ()
        with consumer.draining(n, timeout=timeout) as batch:
            try:
                _write_durably(lambda f: writer(batch, f, names), out, directory)
            except FileExistsError:
                raise InvalidInputError(f"out: expected a new file, {out!r} appeared while draining; nothing was drained") from None
            return len(batch)


def _write_durably(write: Callable[[IO[bytes]], None], out: str, directory: str) -> None:
    """Write a file to ``out`` atomically and durably: a hidden temporary file, fsync, link, fsync of the directory."""
    # Hidden, so a job that globs *.npz never picks up a half-written file.
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.link(temp, out)  # atomic, and unlike rename it refuses to replace a file
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the new name is durable before the trajectories leave the buffer
    finally:
        os.close(dir_fd)


def _after_fork_in_child() -> None:
    for consumer in list(_consumers):
        consumer._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
