"""A flusher in a fleet: many hosts learn one adapter through one Redis stream.

Each host's flusher learns its own lanes as always, but a flush point *seals* the
window (:mod:`sona_shm.fleet.window`) into the segment's outbox instead of applying it; a
publisher thread appends the outbox to the fleet's stream (:mod:`sona_shm.fleet.stream`),
a reader thread reads the stream back, and the flusher's main loop applies every
entry, its own included, in stream order (:mod:`sona_shm.fleet.replica`). So every replica
holds the same adapter, bit for bit, and every window is applied once.

Threads and who writes what:

- the **main thread** (the flusher's loop) alone writes the ledger and the outbox. It
  hands sealed windows to the publisher (after the commit that sealed them) and takes
  stream entries, snapshots and link events from one queue (:meth:`FleetMode.pump`);
- the **publisher thread** joins the fleet, renews the host's lease, publishes the
  outbox in batches and writes snapshots, read from the *committed* ledger through the
  latch (so it never reads what the main thread is writing);
- the **reader thread** reads the stream after the last entry it handed over (blocking
  at most ``READ_BLOCK_MS``), rings the doorbell so an idle main loop wakes, and fetches
  the fleet's snapshot when this replica must resync (joining, trimmed past, the fleet's
  epoch changed, its last entry vanished, or the main loop found an entry that does not
  follow).

Redis I/O never runs on the learning path: a Redis that is slow, stopped or gone only
makes the threads retry (every call has a timeout and no hidden retry); the main loop
goes on learning into the outbox. Learning pauses only when the outbox is full (or
``--fleet-lag`` own windows are outstanding): the lanes fill, producers drop and count
or wait, nothing committed is lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..engine.modes import ModeContext
from ..errors import InvalidInputError
from ..learn.learner import Window
from ..learn.routes import RouteTable
from ..shm.layout import (
    FLEET_HOST_BYTES,
    FLEET_KEY_BYTES,
    FLEET_TOKEN_BYTES,
    Layout,
    fleet_token,
    read_fleet_identity,
    write_fleet_identity,
)
from .replica import ZERO_ID, BadSnapshot, NeedResync, Replica, Snapshot, StreamId, host_key
from .stream import LEASE_TTL, FleetError, FleetLog, Joined, LinkDown, config_json, connect

log = logging.getLogger("sona_shm.fleet")

#: Longest a reader blocks on the stream (it also bounds how late it notices a resync request or a stop).
READ_BLOCK_MS = 250
#: Entries one read takes (each at most redis_log.ENTRY_BYTES, unless one window is larger), and windows one publish sends.
READ_COUNT = 128
PUBLISH_BATCH = 256
PUBLISH_BYTES = 1 << 20
#: How long the publisher lets windows gather before one publish while windows keep coming
#: (its last publish was less than this ago): one script call and one AOF write for many
#: windows, for at most this much latency. A window after a quiet spell goes at once, and
#: so does every one with --fleet-lag 0 (a host never has two to send then).
PUBLISH_LINGER = 0.005
#: Connect and command timeout of both connections (the reader's commands get READ_BLOCK_MS more).
DEFAULT_TIMEOUT = 1.0
#: Back-off between attempts while Redis does not answer: doubling from the first to the last.
RETRY_FIRST, RETRY_LAST = 0.05, 1.0
#: How long a stopping flusher waits for its outbox to reach the stream and come back.
FINISH_TIMEOUT = 5.0
#: Seconds between two writes of the fleet's control lines (monitors read them; a scan is much more frequent).
STATS_INTERVAL = 0.02
#: Seconds between snapshots when none is given.
DEFAULT_SNAPSHOT_INTERVAL = 60.0

#: Test-only fault hook, like ledger.py's: with ``SONA_SHM_TEST_PAUSE=xadd`` the flusher
#: process stops itself (SIGSTOP, all threads) right after its first publish appended
#: windows to the stream and before the main loop applied them back (the local commit), so
#: a test can SIGKILL it exactly there.
_PAUSE_AFTER_XADD = os.environ.get("SONA_SHM_TEST_PAUSE") == "xadd"


@dataclass(frozen=True)
class FleetOptions:
    """``--fleet URL``, ``--fleet-key``, ``--host-id``, ``--fleet-lag``, ``--fleet-snapshot-interval``.

    ``lag``: a new window starts learning only while at most this many own windows are
    outstanding (sealed, not yet applied back); None: as many as the outbox holds; 0:
    lock-step. ``timeout``: connect and command timeout of the Redis connections.
    """

    url: str
    key: str
    host_id: str
    lag: int | None = None
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT

    #: A fleet host's learner computes at private weights; the published adapter is the fleet's (:class:`FleetMode`).
    learner_publishes: ClassVar[bool] = False

    def start_mode(self, context: ModeContext) -> FleetMode:
        """The flusher's mode as a host of this fleet (a :class:`~sona_shm.engine.modes.ModeFactory`)."""
        return FleetMode(self, context)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("redis://", "rediss://", "unix://")):
            shown = _safe_url(self.url) if isinstance(self.url, str) else self.url
            raise InvalidInputError(f"--fleet: expected a Redis URL redis://HOST:PORT[/DB] (or rediss://, unix://), got {shown!r}")
        _check_text("--fleet-key", self.key, FLEET_KEY_BYTES, forbid="{}")
        _check_text("--host-id", self.host_id, FLEET_HOST_BYTES, forbid="")
        if self.lag is not None and (isinstance(self.lag, bool) or not isinstance(self.lag, int) or self.lag < 0):
            raise InvalidInputError(f"--fleet-lag: expected an integer >= 0, got {self.lag!r}")
        if not (isinstance(self.snapshot_interval, (int, float)) and 0 < self.snapshot_interval < float("inf")):
            raise InvalidInputError(f"--fleet-snapshot-interval: expected a finite number of seconds > 0, got {self.snapshot_interval!r}")
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < float("inf")):
            raise InvalidInputError(f"fleet timeout: expected a finite number of seconds > 0, got {self.timeout!r}")


def _check_text(option: str, value: Any, limit: int, forbid: str) -> None:
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > limit or any(c in value for c in forbid):
        extra = f" without {' or '.join(repr(c) for c in forbid)}" if forbid else ""
        raise InvalidInputError(f"{option}: expected 1 to {limit} bytes of UTF-8{extra}, got {value!r}")
    if any(ord(c) < 32 for c in value):
        raise InvalidInputError(f"{option}: expected printable text, got {value!r}")


def default_host_id(engine: str) -> str:
    """A host id unique and stable per host and engine: the hostname and a hash of /etc/machine-id and the engine name."""
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                machine = f.read().strip()
            break
        except OSError:
            continue
    digest = hashlib.sha256(f"{machine}\0{engine}".encode()).hexdigest()[:12]
    return f"{socket.gethostname()[:64]}-{digest}"


# ----------------------------------------------------------------- the threads


class _Link(threading.Thread):
    """What both Redis threads share: a connection that is re-made after a failure, with back-off."""

    def __init__(self, name: str, member: FleetMode, read_timeout: float | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.member = member
        self.options = member.options
        self.read_timeout = read_timeout
        self.stop = threading.Event()
        self.connected = False
        self.contact_at = 0.0
        self.error_at = 0.0
        self.log: FleetLog | None = None
        self._delay = RETRY_FIRST

    def _connect(self) -> FleetLog:
        if self.log is None:
            self.log = FleetLog(connect(self.options.url, timeout=self.options.timeout, read_timeout=self.read_timeout), self.options.key)
        return self.log

    def _down(self, why: str) -> None:
        """Forget the connection after a failure; wait the back-off (or until stopped)."""
        if self.connected:
            log.warning("%s: Redis did not answer (%s); retrying every %g s at most, learning goes on", self.name, why, RETRY_LAST)
        self.connected = False
        self.error_at = time.time()
        if self.log is not None:
            self.log.close()
            self.log = None
        self.stop.wait(self._delay)
        self._delay = min(self._delay * 2, RETRY_LAST)

    def _up(self) -> None:
        if not self.connected:
            log.info("%s: connected to %s (fleet %r)", self.name, _safe_url(self.options.url), self.options.key)
        self.connected = True
        self.contact_at = time.time()
        self._delay = RETRY_FIRST

    def run(self) -> None:
        try:
            self.loop()
        except FleetError as exc:
            self.member.inbox.put(("fatal", exc))
        except BaseException as exc:  # a bug must stop the flusher, not leave it learning without a fleet
            self.member.inbox.put(("fatal", FleetError(f"{self.name} failed: {type(exc).__name__}: {exc}")))
        finally:
            if self.log is not None:
                self.log.close()
            self.member.ring()

    def loop(self) -> None:
        raise NotImplementedError


class _Publisher(_Link):
    """Joins the fleet, renews the lease, appends the outbox, writes snapshots."""

    def __init__(self, member: FleetMode) -> None:
        super().__init__("sona-fleet-publisher", member)
        self._cond = threading.Condition()
        self._windows: dict[int, bytes] = {}  # seq -> window not yet confirmed in the stream
        self.joined: Joined | None = None
        self.rejoin = threading.Event()
        self.joined_event = threading.Event()
        self.snapshots_allowed = threading.Event()
        self.published = 0
        self._first_at = 0.0  # when the oldest window waiting was offered
        self._published_at = 0.0  # when the last publish returned
        self._linger = 0.0 if member.options.lag == 0 else PUBLISH_LINGER
        self._lingering = False  # the publisher waits out a linger: offers need not wake it

    def offer(self, seq: int, window: bytes) -> None:
        """Publish own window ``seq`` (committed in the outbox); called by the main thread in seq order."""
        with self._cond:
            if not self._windows:
                self._first_at = time.monotonic()
            self._windows[seq] = window
            if not self._lingering or len(self._windows) >= PUBLISH_BATCH:
                self._cond.notify()  # a lingering publisher wakes at the end of its linger anyway: no wake-up per window

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def loop(self) -> None:
        member = self.member
        renew_at = 0.0
        snapshot_at = time.monotonic() + self.options.snapshot_interval
        while not self.stop.is_set():
            try:
                fleet = self._connect()
                if self.joined is None or self.rejoin.is_set():
                    self.rejoin.clear()
                    self.joined = member.join(fleet)
                    self.published = self.joined.last_seq
                    renew_at = time.monotonic() + _LEASE_RENEW
                    member.inbox.put(("joined", self.joined))
                    self.joined_event.set()
                    member.ring()
                if time.monotonic() >= renew_at:
                    renewed = fleet.renew(self.options.host_id, member.token)
                    if renewed is None:  # the fleet was made again (Redis lost it): join the new one
                        self.rejoin.set()
                        continue
                    if not renewed:
                        raise FleetError(f"fleet {self.options.key!r}: another engine took host id {self.options.host_id!r}")
                    renew_at = time.monotonic() + _LEASE_RENEW
                self._up()
                self._publish(fleet)
                if time.monotonic() >= snapshot_at and self.snapshots_allowed.is_set():
                    member.write_snapshot(fleet, self.joined.epoch)
                    snapshot_at = time.monotonic() + self.options.snapshot_interval
                self._up()
            except LinkDown as exc:
                self._down(str(exc))
                self.joined = None  # join again: Redis may have restarted or failed over
                continue
            with self._cond:
                if not self._windows and not self.stop.is_set() and not self.rejoin.is_set():
                    wait = min(renew_at, snapshot_at) - time.monotonic()
                    self._cond.wait(max(0.001, min(wait, 0.5)))

    def _publish(self, fleet: FleetLog) -> None:
        global _PAUSE_AFTER_XADD
        while not self.stop.is_set():
            with self._cond:
                busy = time.monotonic() - self._published_at < self._linger
                self._lingering = True
                while busy and self._windows and len(self._windows) < PUBLISH_BATCH and not self.stop.is_set():
                    wait = self._first_at + self._linger - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)  # more windows may come: one call for them all
                self._lingering = False
                if not self._windows:
                    return
                batch: list[tuple[int, bytes]] = []
                size = 0
                for seq in sorted(self._windows):  # oldest first: Redis appends only past the host's last
                    window = self._windows[seq]
                    if (batch and seq != batch[-1][0] + 1) or len(batch) >= PUBLISH_BATCH or size + len(window) > PUBLISH_BYTES and batch:
                        break
                    batch.append((seq, window))
                    size += len(window)
            last = fleet.publish(
                host_id=self.options.host_id,
                host_key=self.member.host_key_hex,
                token=self.member.token,
                first_seq=batch[0][0],
                windows=[w for _, w in batch],
            )
            if last is None:  # the lease lapsed (a long pause): take it back, unless another engine has it
                renewed = fleet.renew(self.options.host_id, self.member.token)
                if renewed is None:  # the fleet was made again: the loop joins it before publishing more
                    self.rejoin.set()
                    return
                if not renewed:
                    raise FleetError(f"fleet {self.options.key!r}: another engine took host id {self.options.host_id!r}")
                continue
            if _PAUSE_AFTER_XADD:
                _PAUSE_AFTER_XADD = False
                os.kill(os.getpid(), signal.SIGSTOP)  # test hook: in the stream, not yet applied back
            with self._cond:
                for seq in [s for s in self._windows if s <= last]:
                    del self._windows[seq]
                self._first_at = time.monotonic()  # what is left waited for this call already
            self.published = max(self.published, last)
            self.contact_at = time.time()
            self._published_at = time.monotonic()


class _Reader(_Link):
    """Reads the stream after the last entry handed over; fetches the snapshot when the replica must resync."""

    def __init__(self, member: FleetMode, cursor: StreamId, epoch: int) -> None:
        super().__init__("sona-fleet-reader", member, read_timeout=member.options.timeout + READ_BLOCK_MS / 1000)
        self.cursor = cursor
        self.epoch = epoch
        self._resync: str | None = None
        self._resync_after = 0.0
        self._lock = threading.Lock()

    def request_resync(self, reason: str, delay: float = 0.0) -> None:
        """Fetch the fleet's snapshot for the main loop (after ``delay`` seconds: a refused one is not asked for in a loop)."""
        with self._lock:
            self._resync = reason
            self._resync_after = time.monotonic() + delay

    def loop(self) -> None:
        member = self.member
        publisher = member.publisher
        checked = False  # the cursor was checked against this connection's stream
        while not self.stop.is_set():
            if not publisher.joined_event.wait(0.1):
                continue
            joined = publisher.joined
            try:
                fleet = self._connect()
                with self._lock:
                    reason, self._resync = self._resync, None
                    if reason is not None and time.monotonic() < self._resync_after:
                        self._resync = reason  # not yet: read on meanwhile (the main loop drops what it cannot apply)
                        reason = None
                if reason is None and joined is not None and self.epoch != joined.epoch:
                    reason = (
                        "joining the fleet" if self.epoch == 0 else "the fleet's epoch changed (Redis lost it and it was created again)"
                    )
                if reason is None and not checked and self.cursor != ZERO_ID:
                    trimmed = fleet.trimmed()
                    if self.cursor < trimmed:
                        reason = "the stream was trimmed past this replica (it was away longer than the snapshots are kept)"
                    elif not fleet.has_entry(self.cursor):
                        reason = "the last entry this replica applied is not in the stream any more (Redis lost writes)"
                checked = True
                if reason is not None:
                    self._fetch_snapshot(fleet, reason)
                    continue
                result = fleet.read(self.cursor, block_ms=READ_BLOCK_MS, count=READ_COUNT)
                self._up()
                if result.epoch != self.epoch:
                    if joined is None or result.epoch != joined.epoch:
                        # The fleet is gone from Redis (epoch 0: joining makes it again) or was made again
                        # by another host: the publisher joins it; the next pass compares with that.
                        publisher.rejoin.set()
                        publisher.wake()
                        self.stop.wait(0.05)
                    continue
                if self.cursor < result.trimmed:
                    self.request_resync("the stream was trimmed past this replica while it read")
                    continue
                if result.entries:
                    self.cursor = result.entries[-1].id
                    member.inbox.put(("entries", result.entries))
                    member.ring()
            except LinkDown as exc:
                self._down(str(exc))
                checked = False

    def _fetch_snapshot(self, fleet: FleetLog, reason: str) -> None:
        fields = fleet.get_snapshot()
        self._up()
        if fields is None:
            self.request_resync(reason)  # the fleet is being created again: its snapshot comes with it
            self.member.publisher.rejoin.set()
            self.member.publisher.wake()
            self.stop.wait(0.1)
            return
        try:
            snap = Snapshot.from_fields(fields)
        except BadSnapshot as exc:
            log.error("%s; trying again in 5 s", exc)
            self.request_resync(reason)
            self.stop.wait(5.0)
            return
        self.cursor, self.epoch = snap.cursor, snap.epoch
        self.member.inbox.put(("snapshot", snap, reason))
        self.member.ring()


_LEASE_RENEW = LEASE_TTL / 3


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


# ----------------------------------------------------------------- the member (main thread)


class FleetMode:
    """A flusher's mode as one host of a fleet (:mod:`sona_shm.engine.modes`; the module docstring says how).

    Every window the learner closes is sealed into the outbox (:meth:`on_window`); the
    fleet's adapter — this record's ``up``/``down`` and ``generation`` — changes only by
    applying the stream (:meth:`pump`), and the learner computes at that adapter with this
    host's own windows in flight applied (the routing rule's gradients depend on it). A
    flush request is answered once its lane's windows came back from the stream.
    """

    takes_windows = True

    def __init__(self, options: FleetOptions, context: ModeContext) -> None:
        segment, state, learner, routes, ledger, tails = (
            context.segment,
            context.record,
            context.learner,
            context.routes,
            context.ledger,
            context.tails,
        )
        layout: Layout = segment.layout
        if layout.fleet_outbox == 0:
            raise FleetError(
                f"segment {segment.name!r} was created without a fleet outbox; it cannot join a fleet. Checkpoint it "
                f"(`sona-shm checkpoint`), destroy it and start the flusher with --fleet (and --checkpoint FILE) to create it with one"
            )
        self.options = options
        self.segment = segment
        self.layout = layout
        self.learner = learner
        self.routes = routes
        self.ledger = ledger
        self._tails = tails  # the flusher's lane tails (read only: whether a flush request's records are learned)
        buf = segment.numpy_buffer()
        self._outbox = np.ndarray((layout.fleet_outbox, layout.entry_bytes), np.uint8, buffer=buf, offset=layout.outbox_offset)
        assert layout.fleet_words is not None  # an outbox comes with the fleet region
        self._fleet_words = layout.fleet_words
        self.replica = Replica(layout, state, self._outbox, options.host_id, routes)
        self.config_json = config_json(layout.config, routes)
        self.host_key_hex = f"{host_key(options.host_id):016x}"
        self.token = self._identity()
        self.lag = layout.fleet_outbox if options.lag is None else min(options.lag, layout.fleet_outbox - 1)
        self.inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.awaiting_resync: str | None = None
        self.paused = False
        self.pauses = 0
        self._full_since: float | None = None
        self.lag_s = 0.0
        self._offered = self.replica.tail  # own windows handed to the publisher, up to this seq
        self._committed_head, self._committed_cursor = self.replica.head, self.replica.cursor
        self._acks: list[list[int]] = []  # [lane, request, head at request, seq needed (-1: not sealed yet)]
        self._sealed: dict[int, bytes] = {}  # windows sealed since the last commit: seq -> bytes
        self._stats_at = 0.0
        self._bell = segment.bell  # opened here, before the threads use it
        self.publisher = _Publisher(self)
        self.reader = _Reader(self, self.replica.cursor, self.replica.epoch)
        if self.replica.bound:
            self.publisher.snapshots_allowed.set()
        if layout.config.rule == "routing":
            self._speculate()
        self.start()

    # ----------------------------------------------------------------- identity

    def _identity(self) -> str:
        """The segment's token (made once), and its host id and key, checked against a bound segment's."""
        buf = self.segment.buf
        token = fleet_token(buf, self.layout, secrets.token_bytes(FLEET_TOKEN_BYTES))
        if self.replica.bound:
            bound_host, bound_key = read_fleet_identity(buf, self.layout)
            if (bound_host, bound_key) != (self.options.host_id, self.options.key):
                raise FleetError(
                    f"segment {self.segment.name!r} is a replica of fleet {bound_key!r} as host {bound_host!r}; start it with "
                    f"--fleet-key {bound_key} --host-id {bound_host}, or destroy it to join another fleet"
                )
        else:
            write_fleet_identity(buf, self.layout, self.options.host_id, self.options.key)
        return token.hex()

    # ----------------------------------------------------------------- starting and stopping

    def start(self) -> None:
        """Join the fleet once now (so a refusal stops the flusher before it learns), then start the threads.

        If Redis does not answer, the publisher thread keeps trying; learning waits until
        the segment is bound to the fleet (its snapshot loaded), since until then its
        configuration was never compared with the fleet's.
        """
        try:
            fleet = FleetLog(connect(self.options.url, timeout=self.options.timeout), self.options.key)
        except LinkDown as exc:
            log.warning("fleet %r: Redis did not answer (%s); joining in the background", self.options.key, exc)
        else:
            try:
                joined = self.join(fleet)
            except LinkDown as exc:
                log.warning("fleet %r: Redis did not answer (%s); joining in the background", self.options.key, exc)
            else:
                self.publisher.joined = joined
                self.inbox.put(("joined", joined))
                self.publisher.joined_event.set()
            finally:
                fleet.close()
        self.publisher.start()
        self.reader.start()

    def join(self, fleet: FleetLog) -> Joined:
        """Join (or create) the fleet through ``fleet``; a new fleet starts from this replica's committed state."""
        record = self.ledger.snapshot()[0]  # the committed state (the latch makes this safe from any thread)
        new_epoch = secrets.randbits(62) or 1
        seed = dataclasses.replace(snapshot_of(record, self.layout, self.routes, self.options.host_id), epoch=new_epoch, cursor=ZERO_ID)
        joined = fleet.join(
            config=self.config_json,
            new_epoch=new_epoch,
            host_id=self.options.host_id,
            host_key=self.host_key_hex,
            token=self.token,
            max_hosts=self.layout.fleet_hosts,
            takeover=int(record["fleet_epoch"]) == 0,
            snapshot=seed.to_fields(),
            now=time.time(),
        )
        log.info(
            "fleet %r: %s as host %r (epoch %d)",
            self.options.key,
            "created" if joined.created else "joined",
            self.options.host_id,
            joined.epoch,
        )
        return joined

    def stop(self) -> None:
        """Stop both threads (each within its timeouts) and wait for them a bounded time."""
        for thread in (self.publisher, self.reader):
            thread.stop.set()
        self.publisher.wake()
        deadline = time.monotonic() + 2 * self.options.timeout + READ_BLOCK_MS / 1000 + 1
        for thread in (self.publisher, self.reader):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def ring(self) -> None:
        """Wake the main loop (it sleeps on the doorbell)."""
        try:
            self._bell.release()
        except Exception:  # closed at shutdown: the main loop is not sleeping any more
            pass

    # ----------------------------------------------------------------- the main loop's calls

    @property
    def bound(self) -> bool:
        return self.replica.bound

    def has_news(self) -> bool:
        return not self.inbox.empty()

    def pump(self) -> bool:
        """Take what the threads handed over: apply entries, load snapshots. True if the record changed (commit it)."""
        if self.inbox.empty():
            return False
        replica = self.replica
        changed = weights = foreign = False
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            kind = message[0]
            if kind == "entries":
                if self.awaiting_resync is not None or not replica.bound:
                    continue  # a snapshot is on its way; these are read again after it
                before = replica.cursor
                try:
                    applied, other = replica.apply(message[1])
                except NeedResync as exc:
                    self.awaiting_resync = exc.reason
                    self.reader.request_resync(exc.reason)
                    log.error("fleet %r: %s; loading the fleet's snapshot", self.options.key, exc.reason)
                    changed = weights = True  # entries before it may have been applied
                    continue
                changed |= applied > 0 or replica.cursor != before
                weights |= applied > 0
                foreign |= other
            elif kind == "snapshot":
                snap, reason = message[1], message[2]
                try:
                    replica.load(snap)
                except BadSnapshot as exc:
                    log.error("fleet %r: %s; asking for it again", self.options.key, exc)
                    self.awaiting_resync = reason  # what comes after it must not be applied to this state
                    self.reader.request_resync(reason, delay=5.0)
                    continue
                log.log(
                    logging.WARNING if reason.startswith(("the", "entries", "host")) else logging.INFO,
                    "fleet %r: loaded the snapshot at %d-%d (%d entries, %d signals; %s)",
                    self.options.key,
                    snap.cursor[0],
                    snap.cursor[1],
                    snap.entries,
                    snap.signals,
                    reason,
                )
                self.awaiting_resync = None
                self.publisher.snapshots_allowed.set()
                self._offered = max(self._offered, replica.tail)
                changed = weights = foreign = True
            elif kind == "joined":
                joined: Joined = message[1]
                # Offer every outstanding window again: Redis may have lost some it had confirmed
                # (a failover, a restart without persistence); it appends only what it lacks.
                self._offered = replica.tail
                if not replica.bound:
                    replica.rebase(joined.last_seq)
                    changed = True
                if joined.epoch != replica.epoch:
                    self.publisher.snapshots_allowed.clear()  # not until this replica holds the fleet's state
            elif kind == "fatal":
                raise message[1]
        if weights:
            replica.bump_generation()
        if foreign and self.layout.config.rule == "routing":
            self._speculate()
        return changed

    def commit_points(self) -> tuple[str, ...]:
        """What the commit being made does since the last one (``seal``, ``apply``): for the test-only pause hook."""
        replica = self.replica
        points = ("seal",) * (replica.head > self._committed_head) + ("apply",) * (replica.cursor != self._committed_cursor)
        self._committed_head, self._committed_cursor = replica.head, replica.cursor
        return points

    def _speculate(self) -> None:
        """The learner computes at the fleet's adapter with this host's windows in flight applied (see Replica.speculate)."""
        up, down = np.empty_like(self.learner.up), np.empty_like(self.learner.down)
        self.replica.speculate(up, down)
        self.learner.set_weights(up, down)

    def may_learn(self, window_open: bool) -> bool:
        """Whether learning may go on: once bound, a window open may fill; a new one opens only while the outbox has
        room (and ``--fleet-lag`` allows)."""
        replica = self.replica
        if window_open:
            return replica.bound
        full = replica.outstanding >= self.layout.fleet_outbox
        ok = replica.bound and not full and replica.outstanding <= self.lag
        if ok == self.paused:
            self.paused = not ok
            if self.paused:
                self.pauses += 1
                if full:  # a lag bound pauses every window by design (--fleet-lag 0: each one): said only when the outbox is full
                    self._full_since = time.monotonic()
                    log.warning(
                        "fleet %r: the outbox is full (%d windows not yet back from the stream); learning waits for Redis "
                        "(lanes fill; producers drop and count, or wait)",
                        self.options.key,
                        replica.outstanding,
                    )
                elif not replica.bound:
                    log.info("fleet %r: not joined yet; learning waits until this replica holds the fleet's state", self.options.key)
            elif self._full_since is not None:
                waited = time.monotonic() - self._full_since
                log.warning("fleet %r: learning goes on after %.1f s with a full outbox", self.options.key, waited)
                self._full_since = None
        return ok

    def on_window(self, window: Window) -> None:
        """Seal a window the learner closed into the outbox; the flusher's next commit publishes it."""
        raw = self.replica.seal(window.grad_up, window.grad_down, window.n)
        self._sealed[self.replica.head] = raw  # handed to the publisher after the commit
        if window.grad_down is not None:  # routing: the next window's gradients see this one applied (replica.speculated)
            self.learner.apply(window)

    def take_requests(self, requests: list[tuple[int, int, int]]) -> None:
        """Producers' flush() calls: each answered once what its lane committed up to its head is applied from the stream."""
        self._acks.extend([lane, request, head, -1] for lane, request, head in requests)

    def flush_due(self) -> bool:
        """A flush request waits for its lane's records to be sealed: seal the partial window now."""
        return self.learner.pending > 0 and any(a[3] < 0 and int(self._tails[a[0]]) >= a[2] for a in self._acks)

    def answered(self) -> list[tuple[int, int]]:
        """After a scan (and its commit): hand new windows to the publisher, write the fleet's control lines; the flush
        requests now answered ``(lane, request)``."""
        self.write_stats()
        replica = self.replica
        for seq in range(max(self._offered, replica.tail) + 1, replica.head + 1):
            raw = self._sealed.pop(seq, None)
            self.publisher.offer(seq, raw if raw is not None else replica.window_bytes(seq))
        self._offered = max(self._offered, replica.head)
        self._sealed.clear()
        if not self._acks:
            return []
        done: list[list[int]] = []
        waiting: list[list[int]] = []
        for ack in self._acks:
            lane, request, head, needed = ack
            if needed < 0 and int(self._tails[lane]) >= head and self.learner.pending == 0:
                ack[3] = needed = replica.head  # its records are in windows up to this one
            (done if 0 <= needed <= replica.tail else waiting).append(ack)
        self._acks = waiting
        return [(a[0], a[1]) for a in done]

    def write_stats(self, force: bool = False) -> None:
        """The control lines of the fleet region, for monitors (one writer: this thread); at most every STATS_INTERVAL."""
        now = time.time()
        if not force and now - self._stats_at < STATS_INTERVAL:
            return
        self._stats_at = now
        replica = self.replica
        oldest = replica.oldest_outstanding_at()
        self.lag_s = max(0.0, now - oldest) if oldest is not None else 0.0
        words, u64, f64 = self._fleet_words, self.segment.u64, self.segment.f64
        f64[words.lag_s] = self.lag_s
        u64[words.paused] = int(self.paused)
        u64[words.pauses] = self.pauses
        u64[words.connected] = int(self.publisher.connected and self.reader.connected)
        f64[words.contact_at] = max(self.publisher.contact_at, self.reader.contact_at)
        u64[words.published] = max(self.publisher.published, replica.tail)
        f64[words.error_at] = max(self.publisher.error_at, self.reader.error_at)

    def finish(self, commit: Callable[[], None], timeout: float = FINISH_TIMEOUT) -> None:
        """At shutdown: wait (at most ``timeout``) until every own window is published and applied back.

        ``commit``: the flusher's commit (and what follows it), called whenever the record changed.
        """
        deadline = time.monotonic() + timeout
        while self.replica.outstanding and time.monotonic() < deadline and self.replica.bound:
            if self.pump():
                commit()
            self.write_stats(force=True)
            try:
                self._bell.acquire(0.05)
            except Exception:  # BusyError: the wait timed out
                pass
        if self.replica.outstanding:
            log.warning(
                "fleet %r: stopping with %d own windows not yet applied back from the stream; they stay in the outbox "
                "for the next flusher of this segment",
                self.options.key,
                self.replica.outstanding,
            )

    def write_snapshot(self, fleet: FleetLog, epoch: int) -> None:
        """(Publisher thread.) Store this replica's committed state as the fleet's snapshot if it is newer."""
        record = self.ledger.snapshot()[0]
        if int(record["fleet_epoch"]) != epoch or self.awaiting_resync is not None:
            return
        snap = snapshot_of(record, self.layout, self.routes, self.options.host_id)
        if snap.cursor == ZERO_ID:
            return  # nothing applied since the fleet began: its first snapshot says as much
        answer = fleet.put_snapshot(epoch, snap.cursor, snap.to_fields())
        if answer == "ok":
            log.info("fleet %r: snapshot at %d-%d written (%d entries)", self.options.key, *snap.cursor, snap.entries)


def snapshot_of(record: np.void, layout: Layout, routes: RouteTable | None, host_id: str) -> Snapshot:
    """The :class:`Snapshot` of a committed ledger record (a consistent copy)."""
    state = np.zeros(1, layout.ledger_dtype)
    state[0] = record
    dummy = np.zeros((max(1, layout.fleet_outbox), layout.entry_bytes), np.uint8)
    return Replica(layout, state, dummy, host_id, routes).snapshot()


__all__ = ["DEFAULT_SNAPSHOT_INTERVAL", "FleetError", "FleetMode", "FleetOptions", "default_host_id", "snapshot_of"]
