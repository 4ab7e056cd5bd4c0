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

Both threads talk to the primary: the one the URL names (or, if that node is a replica now,
the primary it names), or the one ``--fleet-sentinel`` names; the publisher checks at
every lease renewal and the reader every ``CHECK_INTERVAL`` that it still is, and both
follow a failover. With ``--fleet-min-replicas`` the publisher confirms with ``WAIT`` what
the replicas hold and the reader hands over only that (the replicated watermark).

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
from ..learn.learner import DeltaWindow, Window
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
from .replica import ZERO_ID, BadSnapshot, NeedResync, Replica, Snapshot, StreamEntry, StreamId, host_key, parse_id
from .stream import (
    EVICTING,
    LEASE_TTL,
    VOLATILE,
    FleetError,
    FleetLog,
    Joined,
    LeaseHeld,
    LinkDown,
    NeedsHealing,
    Published,
    Target,
    _entries,
    _text,
    config_json,
    connect,
    format_id,
    safe_url,
)

log = logging.getLogger("sona_shm.fleet")

#: Longest a reader blocks on the stream (it also bounds how late it notices a resync request or a stop).
READ_BLOCK_MS = 250
#: Entries one catch-up read takes (each at most stream.ENTRY_BYTES, unless one window is larger), and windows one publish sends.
READ_COUNT = 128
#: Seconds between the reader's checks that its state is still a prefix of the stream (an entry evicted or lost to a
#: failover) and that it reads the primary.
CHECK_INTERVAL = 1.0
#: How long a starting flusher waits for a lease on its host id that no live flusher renews (a host that rebooted,
#: whose old flusher died with it): the lease's time to live and a renewal period more.
LEASE_WAIT: float
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
    """``--fleet URL``, ``--fleet-key``, ``--host-id``, ``--fleet-lag``, ``--fleet-snapshot-interval``,
    ``--fleet-sentinel``, ``--fleet-service``, ``--fleet-min-replicas``.

    ``lag``: a new window starts learning only while at most this many own windows are
    outstanding (sealed, not yet applied back); None: as many as the outbox holds; 0:
    lock-step. ``timeout``: connect and command timeout of the Redis connections.
    ``sentinels``/``service``: follow the primary the Sentinels name for ``service`` (the URL
    then gives only credentials, database and TLS). ``min_replicas``: a window counts as in
    the stream (it is applied, and so retired) only once ``WAIT`` confirmed that many
    replicas hold it, so a failover loses none.
    """

    url: str
    key: str
    host_id: str
    lag: int | None = None
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    min_replicas: int = 0

    #: A fleet host's learner computes at private weights; the published adapter is the fleet's (:class:`FleetMode`).
    learner_publishes: ClassVar[bool] = False

    def start_mode(self, context: ModeContext) -> FleetMode:
        """The flusher's mode as a host of this fleet (a :class:`~sona_shm.engine.modes.ModeFactory`)."""
        return FleetMode(self, context)

    @property
    def target(self) -> Target:
        return Target(self.url, self.sentinels, self.service)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidInputError(
                f"--fleet: expected a Redis URL redis://HOST:PORT[/DB] (or rediss://, unix://), got {safe_url(self.url)}"
            )
        if bool(self.sentinels) != bool(self.service):
            raise InvalidInputError(
                "--fleet-sentinel and --fleet-service: give both (the Sentinels, and the name they monitor the primary by)"
            )
        if self.sentinels and self.url.startswith("unix://"):
            raise InvalidInputError("--fleet-sentinel: the URL must be redis:// or rediss:// (its credentials and database are used)")
        if isinstance(self.min_replicas, bool) or not isinstance(self.min_replicas, int) or not 0 <= self.min_replicas <= 16:
            raise InvalidInputError(f"--fleet-min-replicas: expected an integer 0..16, got {self.min_replicas!r}")
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
    """What both Redis threads share: a connection to the primary that is re-made after a failure, with back-off."""

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
        self._moves = 0  # member.moves when this connection was made

    def _connect(self) -> FleetLog:
        if self.log is not None and self._moves != self.member.moves:
            raise LinkDown("the fleet's primary moved (a failover)")  # the other thread found out: follow it too
        if self.log is None:
            self._moves = self.member.moves
            self.log = FleetLog(
                connect(self.options.target, timeout=self.options.timeout, read_timeout=self.read_timeout), self.options.key
            )
        return self.log

    def _down(self, why: str) -> None:
        """Forget the connection after a failure; wait the back-off (or until stopped)."""
        if self.connected or why != self._why:
            log.warning("%s: %s; retrying every %g s at most, learning goes on", self.name, why, RETRY_LAST)
        self._why = why
        if "primary" in why or "replica" in why:
            self.member.moves += 1  # the other thread's connection is to the old primary too
        self.connected = False
        self.error_at = time.time()
        if self.log is not None:
            self.log.close()
            self.log = None
        self.stop.wait(self._delay)
        self._delay = min(self._delay * 2, RETRY_LAST)

    _why = ""

    def _up(self) -> None:
        if not self.connected:
            log.info("%s: connected to %s (fleet %r)", self.name, self.options.target.describe(), self.options.key)
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
    """Joins the fleet, renews the lease (and checks it writes to the primary), appends the outbox, writes snapshots."""

    def __init__(self, member: FleetMode) -> None:
        # WAIT blocks up to the timeout: the socket waits that long more.
        super().__init__("sona-fleet-publisher", member, read_timeout=2 * member.options.timeout if member.options.min_replicas else None)
        self._cond = threading.Condition()
        self._windows: dict[int, bytes] = {}  # seq -> window not yet confirmed in the stream
        self.joined: Joined | None = None
        self.rejoin = threading.Event()
        self.joined_event = threading.Event()
        self.snapshots_allowed = threading.Event()
        self.published = 0
        self.gap: tuple[int, int] | None = None  # (seq, cum): own windows up to seq Redis lost after they were retired
        self.fenced = False  # another segment took the host id: this one publishes nothing more
        self.reset = False  # the fleet has had no snapshot for long: the next join makes it again from this host
        self._first_at = 0.0  # when the oldest window waiting was offered
        self._published_at = 0.0  # when the last publish returned
        self._linger = 0.0 if member.options.lag == 0 else PUBLISH_LINGER
        self._lingering = False  # the publisher waits out a linger: offers need not wake it
        self.confirmed: tuple[int, int] = ZERO_ID  # the newest log id this host's WAIT confirmed

    def offer(self, seq: int, window: bytes) -> None:
        """Publish own window ``seq`` (committed in the outbox); called by the main thread in seq order."""
        with self._cond:
            if not self._windows:
                self._first_at = time.monotonic()
            self._windows[seq] = window
            if not self._lingering or len(self._windows) >= PUBLISH_BATCH:
                self._cond.notify()  # a lingering publisher wakes at the end of its linger anyway: no wake-up per window

    def forget(self) -> list[int]:
        """Drop every window offered (given up); their seqs."""
        with self._cond:
            seqs = sorted(self._windows)
            self._windows.clear()
            return seqs

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def loop(self) -> None:
        member = self.member
        renew_at = 0.0
        snapshot_at = time.monotonic() + self.options.snapshot_interval
        while not self.stop.is_set():
            if self.fenced:
                self.stop.wait(0.5)  # this segment seals and publishes nothing more; the reader still follows the fleet
                continue
            try:
                fleet = self._connect()
                if self.joined is None or self.rejoin.is_set():
                    self.rejoin.clear()
                    self.confirmed = ZERO_ID  # a new primary may hold an older watermark: confirm again there
                    try:
                        self.joined = member.join(fleet)
                    except LeaseHeld as exc:  # another flusher's lease: wait it out (a dead one), or give up to it (live)
                        self._lease_held(fleet, exc)
                        continue
                    except FleetError as exc:
                        if "taken over" not in str(exc):
                            raise
                        self._give_up(fleet, str(exc))
                        continue
                    self.published = self.joined.last_seq
                    renew_at = time.monotonic() + _LEASE_RENEW
                    member.inbox.put(("joined", self.joined))
                    self.joined_event.set()
                    member.ring()
                if time.monotonic() >= renew_at:
                    fleet.check_primary(self.options.target, self.options.timeout)  # a failover: LinkDown, and follow
                    renewed = fleet.renew(self.options.host_id, member.token)
                    if renewed is None:  # the fleet was made again (Redis lost it): join the new one
                        self.rejoin.set()
                        continue
                    if not renewed:
                        self._give_up(fleet, f"another engine took host id {self.options.host_id!r}")
                        continue
                    renew_at = time.monotonic() + _LEASE_RENEW
                    if fleet.host_seq(member.host_key_hex) < self.published:
                        # Redis lost windows it had confirmed (a failover, an eviction): join again, which offers the
                        # outbox again and writes a gap entry for the retired ones it lost.
                        log.warning("%s: Redis lost windows of this host it had confirmed; joining again", self.name)
                        self.rejoin.set()
                        continue
                    if self.snapshots_allowed.is_set() and not fleet.has_snapshot():
                        snapshot_at = 0.0  # Redis lost the snapshot (evicted): a replica that holds the fleet's state offers one now
                    if self.options.min_replicas:
                        self._confirm(fleet, fleet.publish(**self._who(), first_seq=self.published + 1, windows=[]))
                self._up()
                self._publish(fleet)
                if time.monotonic() >= snapshot_at and self.snapshots_allowed.is_set():
                    member.write_snapshot(fleet, self.joined.epoch)
                    snapshot_at = time.monotonic() + self.options.snapshot_interval
                self._up()
            except NeedsHealing as exc:
                log.warning("%s: %s", self.name, exc)
                self.rejoin.set()
                continue
            except LinkDown as exc:
                self._down(str(exc))
                self.joined = None  # join again: Redis may have restarted or failed over
                continue
            with self._cond:
                if not self._windows and self.gap is None and not self.stop.is_set() and not self.rejoin.is_set():
                    wait = min(renew_at, snapshot_at) - time.monotonic()
                    self._cond.wait(max(0.001, min(wait, 0.5)))
        self._release()

    def _release(self) -> None:
        """A clean stop gives the lease back (only while this segment holds it), so the next flusher of this host id
        joins at once instead of waiting out the TTL. Best effort: a Redis out of reach lets the lease expire."""
        if self.joined is None or self.fenced:
            return
        try:
            self._connect().release(self.options.host_id, self.member.token)
        except (LinkDown, FleetError) as exc:
            log.info("%s: the lease was not given back (%s); it expires in %g s", self.name, exc, LEASE_TTL)

    def _who(self) -> dict[str, Any]:
        return {"host_id": self.options.host_id, "host_key": self.member.host_key_hex, "token": self.member.token}

    def _lease_held(self, fleet: FleetLog, exc: LeaseHeld) -> None:
        """(Re)joining while a lease holds the host id: a dead flusher's lease runs out; a live one's is renewed."""
        if not self.member.lease_waited(exc.seconds):
            self._give_up(fleet, str(exc))
            return
        self.stop.wait(min(max(exc.seconds, 0.05), 0.5))
        self.rejoin.set()

    def _give_up(self, fleet: FleetLog, why: str) -> None:
        """Another segment took this host id: count the windows the stream never had as lost, seal nothing more."""
        member = self.member
        if not member.fence(self.stop):  # the main loop seals its open window and stops learning first
            return
        outstanding = member.committed_outstanding()
        status, count, signals = fleet.give_up(**self._who(), windows=outstanding)
        if status in ("owner", "unregistered"):  # not taken after all, or Redis lost its host list: join again
            member.inbox.put(("unfence",))
            member.ring()
            self.rejoin.set()
            return
        self.forget()
        self.fenced = True
        log.error(
            "fleet %r: %s; this segment seals nothing more (its flusher keeps applying the fleet's stream for the workers). "
            "%d of its %d windows not yet in the stream (%d signals) are counted lost on every replica; give this engine "
            "its own --host-id (or destroy the segment) and start it again",
            self.options.key,
            why,
            count,
            len(outstanding),
            signals,
        )
        member.inbox.put(("fenced", why))
        member.ring()

    def _confirm(self, fleet: FleetLog, published: Published | None) -> None:
        """--fleet-min-replicas: WAIT until that many replicas hold every write so far, then raise the watermark."""
        if published is None or published.tip == ZERO_ID or published.tip <= self.confirmed:
            return
        acked = fleet.wait_replicas(self.options.min_replicas, int(self.options.timeout * 1000))
        if acked < self.options.min_replicas:
            raise LinkDown(
                f"only {acked} replica(s) acknowledged the stream, --fleet-min-replicas asks {self.options.min_replicas}: "
                "its windows are not applied anywhere yet"
            )
        fleet.confirm(published.tip)
        self.confirmed = published.tip

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
                gap = self.gap
                if not self._windows and gap is None:
                    return
                batch: list[tuple[int, bytes]] = []
                size = 0
                for seq in sorted(self._windows):  # oldest first: Redis appends only past the host's last
                    window = self._windows[seq]
                    if (batch and seq != batch[-1][0] + 1) or len(batch) >= PUBLISH_BATCH or size + len(window) > PUBLISH_BYTES and batch:
                        break
                    batch.append((seq, window))
                    size += len(window)
            done = fleet.publish(**self._who(), first_seq=batch[0][0] if batch else 0, windows=[w for _, w in batch], gap=gap)
            if done is None:  # the lease lapsed (a long pause): take it back, unless another engine has it
                renewed = fleet.renew(self.options.host_id, self.member.token)
                if renewed is None:  # the fleet was made again: the loop joins it before publishing more
                    self.rejoin.set()
                    return
                if not renewed:
                    self._give_up(fleet, f"another engine took host id {self.options.host_id!r}")
                    return
                continue
            if self.options.min_replicas:
                self._confirm(fleet, done)
            last = done.last_seq
            if _PAUSE_AFTER_XADD and batch:
                _PAUSE_AFTER_XADD = False
                os.kill(os.getpid(), signal.SIGSTOP)  # test hook: in the stream, not yet applied back
            with self._cond:
                for seq in [s for s in self._windows if s <= last]:
                    del self._windows[seq]
                if gap is not None and last >= gap[0]:
                    self.gap = None
                self._first_at = time.monotonic()  # what is left waited for this call already
            self.published = max(self.published, last)
            self.contact_at = time.time()
            self._published_at = time.monotonic()


class _Reader(_Link):
    """Reads the stream after the last entry handed over; fetches the snapshot when the replica must resync.

    Reads are pipelined: the next ``XREAD BLOCK`` is sent the moment a reply is in, before
    the reply is parsed and handed over, so Redis holds the next read while this thread
    works (a second read queued behind the first with ``$`` would miss what another client
    appends between the two). With ``--fleet-min-replicas`` the reader also follows the watermark stream and hands
    over only entries up to the newest confirmed id.
    """

    def __init__(self, member: FleetMode, cursor: StreamId, epoch: int) -> None:
        super().__init__("sona-fleet-reader", member, read_timeout=member.options.timeout + READ_BLOCK_MS / 1000)
        self.cursor = cursor  # the last entry handed over (or held back, waiting for the watermark)
        self.epoch = epoch
        self._resync: str | None = None
        self._resync_after = 0.0
        self._lock = threading.Lock()
        self._held: list[StreamEntry] = []  # read, not yet confirmed by the watermark (--fleet-min-replicas)
        self._watermark: StreamId = ZERO_ID
        self._wm_cursor: str = "$"
        self._read: StreamId = cursor  # the last entry read (held back ones included)
        self._sent: list[str] = []  # the cursors of the reads in flight
        self._gone = False  # a read found the entry it started after gone
        self._anchor = format_id(cursor)  # the snapshot this replica loaded last: its entry may be gone (evicted)
        self._no_snapshot_since: float | None = None

    def request_resync(self, reason: str, delay: float = 0.0) -> None:
        """Fetch the fleet's snapshot for the main loop (after ``delay`` seconds: a refused one is not asked for in a loop)."""
        with self._lock:
            self._resync = reason
            self._resync_after = time.monotonic() + delay

    def _take_resync(self) -> str | None:
        with self._lock:
            reason, self._resync = self._resync, None
            if reason is not None and time.monotonic() < self._resync_after:
                self._resync = reason  # not yet: read on meanwhile (the main loop drops what it cannot apply)
                reason = None
            return reason

    def loop(self) -> None:
        member = self.member
        publisher = member.publisher
        while not self.stop.is_set():
            if not publisher.joined_event.wait(0.1):
                continue
            joined = publisher.joined
            try:
                fleet = self._connect()
                reason = self._take_resync()
                if reason is None and joined is not None and self.epoch != joined.epoch:
                    if self.epoch != 0 and fleet.epoch() != joined.epoch:
                        # The fleet was made again since the publisher joined: it joins the new one first (its lease
                        # may have survived, so nothing else would tell it); then this replica loads its snapshot.
                        publisher.rejoin.set()
                        publisher.wake()
                        self.stop.wait(0.05)
                        continue
                    reason = (
                        "joining the fleet" if self.epoch == 0 else "the fleet's epoch changed (Redis lost it and it was created again)"
                    )
                if reason is None:
                    fleet.check_primary(self.options.target, self.options.timeout)
                    reason = fleet.consistent(self.cursor)
                if reason is not None:
                    if member.replica.bound and reason.startswith("the last entry"):
                        publisher.rejoin.set()  # joining heals what Redis lost and counts this host's windows it lost
                        publisher.wake()
                    self._fetch_snapshot(fleet, reason)
                    continue
                self._held.clear()
                self._read = self.cursor  # entries held back for the watermark are read again
                if self.options.min_replicas:
                    wm_id, self._watermark = fleet.watermark()
                    self._wm_cursor = format_id(wm_id)
                self._up()
                self._tail(fleet, joined)
            except LinkDown as exc:
                self._down(str(exc))

    # ------------------------------------------------------------- the pipelined tail

    def _send(self, fleet: FleetLog, cursor: str, wm_cursor: str) -> None:
        k = fleet.k
        conn = fleet.client.connection
        streams = [k["log"]] + ([k["wm"]] if self.options.min_replicas else [])
        ids = [cursor] + ([wm_cursor] if self.options.min_replicas else [])
        count = READ_COUNT
        conn.send_packed_command(
            conn.pack_commands(
                [
                    ("XREAD", "COUNT", count, "BLOCK", READ_BLOCK_MS, "STREAMS", *streams, *ids),
                    ("GET", k["trimmed"]),
                    ("HGET", k["meta"], "epoch"),
                    ("XRANGE", k["log"], cursor, cursor, "COUNT", 1),  # read after it: is the entry read from still there?
                ]
            )
        )
        self._sent.append(cursor)

    def _receive(self, fleet: FleetLog) -> tuple[list[Any], list[Any], Any, Any]:
        conn = fleet.client.connection

        def read() -> Any:
            try:
                return conn.read_response()
            except fleet._response_error as exc:  # an error reply: the answer to its command (e.g. NOPERM)
                return exc

        streams, trimmed, epoch, at = fleet._call(lambda: (read(), read(), read(), read()))
        for reply in (streams, trimmed, epoch, at):
            if isinstance(reply, Exception):
                fleet._call(_raise, reply)
        cursor = self._sent.pop(0)
        if not at and cursor not in ("0-0", self._anchor):
            # The entry this read started after is gone (the stream was evicted or deleted and made again, or trimmed
            # past): what came after it may not follow this replica's state. Not handed over: resync first.
            self._gone = True
        log_rows: list[Any] = []
        wm_rows: list[Any] = []
        for key, rows in streams.items() if isinstance(streams, dict) else streams or []:  # RESP3: a map; RESP2: pairs
            parsed = [(row_id, dict(zip(flat[0::2], flat[1::2], strict=False))) for row_id, flat in rows]
            (wm_rows if key == fleet.k["wm"].encode() else log_rows).extend(parsed)
        return log_rows, wm_rows, trimmed, epoch

    def _tail(self, fleet: FleetLog, joined: Joined | None) -> None:
        """Read the stream until a check is due or something asks for a new connection. The next read goes out as
        soon as a reply is in, before the reply is handled: Redis re-arms while this thread works."""
        member = self.member
        checked_at = time.monotonic()
        self._sent.clear()
        self._gone = False
        self._send(fleet, format_id(self._read), self._wm_cursor)
        while True:
            rows, wm, trimmed, epoch = self._receive(fleet)
            if rows:
                self._read = parse_id(rows[-1][0])
            if wm:
                self._wm_cursor = _text(wm[-1][0])
            go_on = not self.stop.is_set() and self._resync is None and self._moves == member.moves and not self._gone
            go_on = go_on and time.monotonic() - checked_at < CHECK_INTERVAL
            if go_on:
                self._send(fleet, format_id(self._read), self._wm_cursor)
            if not self._handle(fleet, joined, rows, wm, trimmed, epoch):
                if go_on:  # a read is in flight: drop it with the connection
                    fleet.close()
                    self.log = None
                return
            if not go_on:
                return

    def _handle(self, fleet: FleetLog, joined: Joined | None, rows: list[Any], wm: list[Any], trimmed: Any, epoch: Any) -> bool:
        """One reply: hand its entries over (up to the watermark); False if this connection must stop reading."""
        member = self.member
        self._up()
        from .stream import _id_or_zero, _u64_or_zero

        if self._gone:
            if member.replica.bound:
                member.publisher.rejoin.set()  # joining heals what Redis lost and counts this host's windows it lost
                member.publisher.wake()
            self.request_resync("the last entry this replica read is not in the stream any more (Redis lost writes: an eviction)")
            return False

        epoch_now, trimmed_id = _u64_or_zero(epoch), _id_or_zero(trimmed)
        if epoch_now != self.epoch:
            if joined is None or epoch_now != joined.epoch:
                # The fleet is gone from Redis (epoch 0: joining makes it again) or was made again by another
                # host: the publisher joins it; the next pass compares with that.
                member.publisher.rejoin.set()
                member.publisher.wake()
                self.stop.wait(0.05)
            return False
        if self.cursor < trimmed_id and not rows:
            self.request_resync("the stream was trimmed past this replica while it read")
            return False
        entries = _entries(rows)
        if self.options.min_replicas:
            for _, fields in wm:
                confirmed = _id_or_zero(fields.get(b"i"))
                self._watermark = max(self._watermark, confirmed)
            self._held.extend(entries)
            cut = 0
            while cut < len(self._held) and self._held[cut].id <= self._watermark:
                cut += 1
            entries, self._held = self._held[:cut], self._held[cut:]
        if entries:
            self.cursor = entries[-1].id
            member.inbox.put(("entries", entries))
            member.ring()
        return True

    def _fetch_snapshot(self, fleet: FleetLog, reason: str) -> None:
        fields = fleet.get_snapshot()
        self._up()
        if fields is None and self.member.replica.bound:
            # Evicted, and no replica whose state is a prefix of the stream offered a new one (they all wait for it):
            # after a while the fleet is made again from this host's state; what it lacks is counted from the gaps.
            now = time.monotonic()
            if self._no_snapshot_since is None:
                self._no_snapshot_since = now
            elif now - self._no_snapshot_since > 2 * _LEASE_RENEW:
                self._no_snapshot_since = None
                self.member.publisher.reset = True
        else:
            self._no_snapshot_since = None
        if fields is None:
            self.request_resync(reason)  # the fleet is being created again (or lost its snapshot): one comes soon
            self.member.publisher.rejoin.set()
            self.member.publisher.wake()
            self.stop.wait(0.2)
            return
        try:
            snap = Snapshot.from_fields(fields)
        except BadSnapshot as exc:
            log.error("%s; trying again in 2 s", exc)
            self.request_resync(reason)
            self.stop.wait(2.0)
            return
        self.cursor = self._read = snap.cursor
        self._anchor = format_id(snap.cursor)
        self.epoch = snap.epoch
        self._held.clear()
        self.member.inbox.put(("snapshot", snap, reason))
        self.member.ring()


def _raise(exc: BaseException) -> Any:
    raise exc


_LEASE_RENEW = LEASE_TTL / 3
LEASE_WAIT = LEASE_TTL + _LEASE_RENEW


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
        self.config_json = config_json(layout.config, routes)
        self.host_key_hex = f"{host_key(options.host_id):016x}"
        self._record = state
        self.token = self._identity()
        self.replica = Replica(layout, state, self._outbox, options.host_id, routes, self.token)
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
        self.moves = 0  # bumped by a thread that found the primary moved: the other reconnects too
        self.fenced = False  # another segment took the host id: seal nothing more (set by the main thread)
        self._fence_ready = threading.Event()
        self._fence_asked = False
        self._lease_seen: tuple[float, float] | None = None
        self._policy_told = False
        self._bell = segment.bell  # opened here, before the threads use it
        self.publisher = _Publisher(self)
        self.reader = _Reader(self, self.replica.cursor, self.replica.epoch)
        if self.replica.bound:
            self.publisher.snapshots_allowed.set()
        if layout.config.rule == "routing":
            self._speculate(start=True)
        self.start()

    # ----------------------------------------------------------------- identity

    def _identity(self) -> str:
        """The segment's token (made once), and its host id and key, checked against a bound segment's."""
        buf = self.segment.buf
        token = fleet_token(buf, self.layout, secrets.token_bytes(FLEET_TOKEN_BYTES))
        if int(self._record[0]["fleet_epoch"]):  # bound to a fleet already
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
        configuration was never compared with the fleet's. A lease on the host id that no
        live flusher renews (a host that rebooted: its old flusher died with it) is waited
        out, at most ``LEASE_WAIT`` seconds, logged; one a live flusher renews is refused.
        """
        while True:
            try:
                fleet = FleetLog(connect(self.options.target, timeout=self.options.timeout), self.options.key)
            except LinkDown as exc:
                log.warning("fleet %r: Redis did not answer (%s); joining in the background", self.options.key, exc)
                break
            try:
                joined = self.join(fleet)
            except LeaseHeld as exc:
                if not self.lease_waited(exc.seconds):
                    raise FleetError(f"{exc} (it was renewed while this flusher waited: a live flusher holds it)") from None
                time.sleep(min(max(exc.seconds, 0.05), 0.5))
                continue
            except LinkDown as exc:
                log.warning("fleet %r: Redis did not answer (%s); joining in the background", self.options.key, exc)
            else:
                self.publisher.joined = joined
                self.inbox.put(("joined", joined))
                self.publisher.joined_event.set()
            finally:
                fleet.close()
            break
        self.publisher.start()
        self.reader.start()

    def lease_waited(self, seconds: float) -> bool:
        """Whether to wait on for a lease that holds this host id (``seconds``: what it still lives): no once it was
        renewed (a live flusher) or after ``LEASE_WAIT``."""
        now = time.monotonic()
        if self._lease_seen is None:
            self._lease_seen = (now, seconds)
            log.warning(
                "fleet %r: host id %r is held by a lease for %.1f s more (a flusher that died: this host restarted?); "
                "waiting for it to expire (at most %.0f s; a live flusher renews it, and this one is refused then)",
                self.options.key,
                self.options.host_id,
                seconds,
                LEASE_WAIT,
            )
            return True
        seen_at, seen = self._lease_seen
        if seconds > seen - (now - seen_at) + 1.0:
            return False  # renewed since: a live flusher holds it
        return now - seen_at < LEASE_WAIT

    @property
    def applied_cursor(self) -> StreamId:
        return self.replica.cursor

    def fence(self, stop: threading.Event) -> bool:
        """(Publisher thread.) Ask the main loop to seal its open window and learn no more; wait until it has
        (False if stopped first)."""
        self._fence_ready.clear()
        self.inbox.put(("fence",))
        self.ring()
        while not self._fence_ready.wait(0.1):
            if stop.is_set():
                return False
        return True

    def committed_outstanding(self) -> list[tuple[int, int]]:
        """(Any thread.) ``(seq, n)`` of every own window sealed and not retired in the committed record."""
        record = self.ledger.snapshot()[0]
        tail, head = int(record["fleet_out_tail"]), int(record["fleet_out_head"])
        out = []
        for seq in range(tail + 1, head + 1):
            entry = self._outbox[(seq - 1) % self.layout.fleet_outbox]
            out.append((seq, int(entry[24:32].view(np.uint64)[0])))  # n, bytes 24..32 of the window's header
        return out

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
            reset=self.publisher.reset,
        )
        self.publisher.reset = False
        self._lease_seen = None
        log.info(
            "fleet %r: %s as host %r (epoch %d)",
            self.options.key,
            "created" if joined.created else "joined",
            self.options.host_id,
            joined.epoch,
        )
        if joined.healed:
            log.warning(
                "fleet %r: Redis had lost the fleet's %s (evicted or deleted); rebuilt from its snapshot and stream",
                self.options.key,
                "stream" if joined.healed == "log" else "hosts' last seqs",
            )
        self._tell_policy(fleet)
        return joined

    def _tell_policy(self, fleet: FleetLog) -> None:
        """Warn once, loudly, when Redis may evict the fleet's keys (a Redis that is also a cache)."""
        if self._policy_told:
            return
        self._policy_told = True
        found = fleet.eviction_policy()
        if found is None:
            return
        policy, maxmemory = found
        if policy in EVICTING or (policy in VOLATILE and maxmemory):
            log.warning(
                "fleet %r: Redis has maxmemory-policy %s%s: it may evict the fleet's keys (stream, snapshot, seqs). sona_shm "
                "heals what it can from the hosts' state and counts what it cannot, but learning is lost that way: set "
                "maxmemory-policy noeviction (or a Redis of its own for the fleet) with room for the stream, which is "
                "trimmed to two snapshots",
                self.options.key,
                policy,
                f" and maxmemory {maxmemory}" if maxmemory else " (no maxmemory set yet)",
            )
            if policy in VOLATILE:
                log.warning(
                    "fleet %r: under %s only keys with a TTL are evicted: the leases; writes fail at maxmemory", self.options.key, policy
                )
        elif maxmemory:
            log.info(
                "fleet %r: Redis maxmemory %d with policy %s: at the limit writes fail (the fleet waits and retries)",
                self.options.key,
                maxmemory,
                policy,
            )

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
                own = replica.applied_seq(replica.host)
                if replica.tail > own:  # own windows retired here that the fleet's state lacks: a gap entry counts them
                    self.publisher.gap = (replica.tail, replica.cum_at(replica.tail))
                    self.publisher.wake()
                self.publisher.snapshots_allowed.set()
                self._offered = max(self._offered, replica.tail)
                changed = weights = foreign = True
            elif kind == "joined":
                joined: Joined = message[1]
                # Offer every outstanding window again: Redis may have lost some it had confirmed
                # (a failover, a restart without persistence); it appends only what it lacks.
                self._offered = replica.tail
                if replica.bound and joined.epoch == replica.epoch and replica.tail > joined.last_seq:
                    # Own windows this replica retired (applied back) that Redis lost: a gap entry counts them
                    # on every replica even if this host never seals another window.
                    self.publisher.gap = (replica.tail, replica.cum_at(replica.tail))
                if not replica.bound:
                    replica.rebase(joined.last_seq)
                    changed = True
                if joined.epoch != replica.epoch:
                    self.publisher.snapshots_allowed.clear()  # not until this replica holds the fleet's state
            elif kind == "fence":
                if not self.fenced:
                    self.fenced = True  # seal nothing more; what is open is sealed now, then given up with the rest
                    if self.learner.pending and replica.outstanding < self.layout.fleet_outbox:
                        self.on_window(self.learner.close_window())
                    changed = True
                self._fence_asked = True
            elif kind == "unfence":
                self.fenced = False
            elif kind == "fenced":
                replica.give_up()  # counted lost on every replica through the stream: retired here
                changed = True
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

    def _speculate(self, start: bool = False) -> None:
        """The routing rule learns from the fleet's learned state with this host's windows in flight applied (see
        Replica.speculate); its open window moves along. ``start``: the record's working copy was learned from that
        state already (a restarted flusher): the learner takes it as its published state, nothing moves."""
        up, down, vectors, bias = self.replica.speculate()
        learner = self.learner
        if start:
            k = len(bias)
            learner.up[...], learner.down[...] = up, down
            learner.route_vectors[:k], learner.route_bias[:k] = vectors, bias
        else:
            learner.set_weights(up, down, vectors, bias)

    def may_learn(self, window_open: bool) -> bool:
        """Whether learning may go on: once bound, a window open may fill; a new one opens only while the outbox has
        room (and ``--fleet-lag`` allows)."""
        replica = self.replica
        if window_open and not self.fenced:
            return replica.bound
        full = replica.outstanding >= self.layout.fleet_outbox
        ok = replica.bound and not full and replica.outstanding <= self.lag and not self.fenced
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

    def on_window(self, window: Window | DeltaWindow) -> None:
        """Seal a window the learner closed into the outbox; the flusher's next commit publishes it."""
        raw = self.replica.seal(window)
        self._sealed[self.replica.head] = raw  # handed to the publisher after the commit
        if isinstance(window, DeltaWindow):  # routing: the next window learns from this one applied (Replica.speculate)
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
        if self._fence_asked:
            self._fence_asked = False
            self._fence_ready.set()  # after the commit of the window sealed last: the publisher may read it
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
