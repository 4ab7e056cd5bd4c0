"""A fleet replica's state in the flusher's ledger record: the outbox, the applied table, the stream applied in order, snapshots.

Everything here changes the flusher's *private* ledger record (and the outbox entries
of the segment), never the published copy: the flusher commits it with everything
else, so a window sealed, the lane tails that produced it and the zeroed sums become
current together, and so do an applied entry, the weights it changed, the stream
cursor and the applied table. No Redis and no thread here (:mod:`sona_shm.fleet` has
them); the rules:

- **Sealing.** Own window ``s = fleet_out_head + 1`` is written into its outbox entry;
  ``fleet_out_head = s``. It stays until the replica applies it back from the stream,
  which retires it (``fleet_out_tail = s``).
- **Applying.** Stream entries come in stream order. An entry ``(host, seq, prev)`` whose
  ``seq`` is at or below the host's row of the applied table was applied already and is
  skipped. Otherwise ``prev`` (what Redis held as the host's last seq when it appended
  the entry) must equal that row: if it is larger, this replica missed entries (the
  stream was trimmed past it); if smaller, this replica applied entries the stream no
  longer has (a failover lost writes). Either way :class:`NeedResync`. A ``seq`` more than
  one past ``prev`` means the stream lost the windows between (the host retired them
  before a failover dropped them): they are counted in ``fleet_lost_entries`` and, from
  the hosts' running signal totals, ``fleet_lost_signals`` — the same on every replica.
- **Snapshots.** The fleet's state at a stream id (the adapter as checkpoint bytes, the
  applied table and the fleet counters) is what a new or resyncing replica loads before
  it replays the stream after that id.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .checkpoint import Checkpoint
from .config import EngineConfig
from .errors import CheckpointError, SonaShmError
from .layout import Layout
from .routes import RouteTable
from .sealed import BadWindow, Window, apply_window, read_window, window_length, write_window

StreamId = tuple[int, int]
ZERO_ID: StreamId = (0, 0)


def host_key(host_id: str) -> int:
    """The 64-bit key of a host id in the applied table (never 0, which marks a free row)."""
    key = int.from_bytes(hashlib.blake2b(host_id.encode("utf-8"), digest_size=8).digest(), "little")
    return key or 1


def parse_id(raw: bytes | str) -> StreamId:
    """A Redis stream id ``b"MS-SEQ"`` as a pair of ints."""
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


class NeedResync(SonaShmError):
    """This replica's state is not a prefix of the stream any more; load the snapshot (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadSnapshot(SonaShmError):
    """A snapshot in Redis that cannot be loaded (written outside sona_shm, or for another fleet shape)."""


@dataclass(frozen=True)
class StreamEntry:
    """One stream entry as read: its id, the host that sealed it, ``seq``, ``prev`` and the window's bytes."""

    id: StreamId
    host: str
    seq: int
    prev: int
    window: bytes


@dataclass(frozen=True)
class Snapshot:
    """The fleet's state after applying the stream up to ``cursor``.

    ``checkpoint``: :class:`~sona_shm.checkpoint.Checkpoint` bytes of the adapter (no pending
    gradients; counters are the fleet's: signals and entries applied). ``table``: host key ->
    ``(seq, cum)`` of the last entry of that host applied.
    """

    epoch: int
    cursor: StreamId
    checkpoint: bytes
    table: dict[int, tuple[int, int]]
    entries: int
    signals: int
    lost_entries: int
    lost_signals: int
    bad_entries: int
    written_at: float
    by: str

    def to_fields(self) -> dict[str, bytes]:
        """The snapshot as the fields of a Redis hash."""
        state = {
            "table": {f"{k:016x}": [seq, cum] for k, (seq, cum) in sorted(self.table.items())},
            "entries": self.entries,
            "signals": self.signals,
            "lost_entries": self.lost_entries,
            "lost_signals": self.lost_signals,
            "bad_entries": self.bad_entries,
        }
        return {
            "epoch": str(self.epoch).encode(),
            "id": format_id(self.cursor).encode(),
            "checkpoint": self.checkpoint,
            "state": json.dumps(state, sort_keys=True).encode(),
            "written_at": repr(self.written_at).encode(),
            "by": self.by.encode("utf-8"),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Snapshot:
        """Parse the fields :meth:`to_fields` wrote; :class:`BadSnapshot` if anything is off."""
        try:
            state = json.loads(fields[b"state"])
            table = {int(k, 16): (int(v[0]), int(v[1])) for k, v in state["table"].items()}
            counts = {k: int(state[k]) for k in ("entries", "signals", "lost_entries", "lost_signals", "bad_entries")}
            written_at = float(fields.get(b"written_at", b"0"))
            snap = cls(
                epoch=int(fields[b"epoch"]),
                cursor=parse_id(fields[b"id"]),
                checkpoint=bytes(fields[b"checkpoint"]),
                table=table,
                written_at=written_at if math.isfinite(written_at) else 0.0,
                by=fields.get(b"by", b"").decode("utf-8", "replace"),
                **counts,
            )
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise BadSnapshot(f"fleet snapshot: cannot be read ({type(exc).__name__}: {exc})") from None
        if any(v < 0 for v in counts.values()) or any(k == 0 or s < 0 or c < 0 for k, (s, c) in table.items()):
            raise BadSnapshot("fleet snapshot: negative counts or a zero host key")
        return snap


class Replica:
    """The fleet part of the flusher's private ledger record; see the module docstring.

    ``state``: the flusher's private record (shape ``(1,)``; its ``up``/``down`` are the
    fleet's adapter). ``outbox``: ``uint8[fleet_outbox, entry_bytes]``, the segment's outbox
    entries. ``host_id``: this host. Not thread-safe: the flusher's main thread alone uses it.
    """

    def __init__(self, layout: Layout, state: np.ndarray, outbox: np.ndarray, host_id: str, routes: RouteTable | None) -> None:
        if layout.fleet_outbox == 0:
            raise SonaShmError("replica: the segment has no fleet outbox")
        self.layout = layout
        self.config: EngineConfig = layout.config
        self.routes = routes
        self.st = state[0]
        self.outbox = outbox
        self.host_id = host_id
        self.host = host_key(host_id)
        self.routing = self.config.rule == "routing"
        self._rows: dict[int, int] = {int(k): i for i, k in enumerate(self.st["fleet_host"]) if k}

    # ----------------------------------------------------------------- identity and positions

    @property
    def epoch(self) -> int:
        return int(self.st["fleet_epoch"])

    @property
    def bound(self) -> bool:
        return self.epoch != 0

    @property
    def head(self) -> int:
        return int(self.st["fleet_out_head"])

    @property
    def tail(self) -> int:
        return int(self.st["fleet_out_tail"])

    @property
    def outstanding(self) -> int:
        """Own windows sealed and not yet applied back from the stream."""
        return self.head - self.tail

    @property
    def cursor(self) -> StreamId:
        return int(self.st["fleet_cursor_ms"]), int(self.st["fleet_cursor_seq"])

    @property
    def hosts(self) -> int:
        return len(self._rows)

    def applied_seq(self, host: int) -> int:
        row = self._rows.get(host)
        return 0 if row is None else int(self.st["fleet_host_seq"][row])

    def table(self) -> dict[int, tuple[int, int]]:
        st = self.st
        return {k: (int(st["fleet_host_seq"][i]), int(st["fleet_host_cum"][i])) for k, i in self._rows.items()}

    def rebase(self, last_seq: int) -> None:
        """A segment that takes a host id over continues its sequence after ``last_seq`` (Redis's last for the host).

        Only with an empty outbox (a new segment, or one that sealed nothing unpublished).
        """
        if self.head == self.tail and last_seq > self.head:
            self.st["fleet_out_head"] = self.st["fleet_out_tail"] = last_seq

    # ----------------------------------------------------------------- the outbox

    def seal(self, grad_up: np.ndarray, grad_down: np.ndarray | None, n: int, now: float | None = None) -> Window:
        """Write own window ``head + 1`` into its outbox entry and make it the head; return it (views of the entry).

        The caller checked there is room (``outstanding < fleet_outbox``) and zeroes its sums.
        """
        if self.outstanding >= self.layout.fleet_outbox:
            raise SonaShmError(f"replica: the outbox is full ({self.outstanding} entries); a window must not be opened without room")
        if self.head == self.tail:
            self.rebase(self.applied_seq(self.host))  # never a seq the fleet has seen from this host id
        seq = self.head + 1
        cum = int(self.st["fleet_sealed_signals"]) + n
        entry = self.outbox[(seq - 1) % self.layout.fleet_outbox]
        size = write_window(
            entry, seq=seq, n=n, cum=cum, sealed_at=time.time() if now is None else now, grad_up=grad_up, grad_down=grad_down
        )
        self.st["fleet_out_head"] = seq  # published by the flusher's next commit, with the lane tails and zeroed sums
        self.st["fleet_sealed_signals"] = cum
        return self._decode(entry[:size].tobytes())

    def window_bytes(self, seq: int) -> bytes:
        """The bytes of own outstanding window ``seq`` (what the stream entry's ``w`` field carries)."""
        if not self.tail < seq <= self.head:
            raise SonaShmError(f"replica: window {seq} is not in the outbox ({self.tail}, {self.head}]")
        entry = self.outbox[(seq - 1) % self.layout.fleet_outbox]
        return entry[: window_length(entry)].tobytes()

    def outstanding_windows(self) -> list[Window]:
        """Own windows sealed and not yet applied, oldest first."""
        return [self._decode(self.window_bytes(seq)) for seq in range(self.tail + 1, self.head + 1)]

    def oldest_outstanding_at(self) -> float | None:
        """When the oldest own outstanding window was sealed (None: none outstanding); reads its header only."""
        if self.outstanding == 0:
            return None
        entry = self.outbox[self.tail % self.layout.fleet_outbox]
        return float(entry[40:48].view(np.float64)[0])

    # ----------------------------------------------------------------- applying the stream

    def apply(self, entries: list[StreamEntry]) -> tuple[int, bool]:
        """Apply ``entries`` (stream order) to the record; return ``(applied, foreign)``.

        ``foreign``: an entry of another host changed the adapter. Raises
        :class:`NeedResync` at the first entry that does not follow this replica's state;
        the entries before it are applied (the caller commits or discards them).
        """
        st = self.st
        applied, foreign = 0, False
        cursor = self.cursor
        for entry in entries:
            if entry.id <= cursor:
                continue  # read twice (a reconnect re-reads from the committed cursor)
            if not entry.host:  # not an entry sona_shm wrote (see redis_log): counted, passed
                st["fleet_bad_entries"] += 1
                cursor = self._move(entry.id)
                continue
            key = host_key(entry.host)
            row = self._rows.get(key)
            last = 0 if row is None else int(st["fleet_host_seq"][row])
            if entry.seq <= last:
                cursor = self._move(entry.id)  # applied already: a publish repeated after a lost answer is refused by Redis
                continue
            if entry.prev != last:
                if entry.prev > last:
                    raise NeedResync(f"entries of host {entry.host!r} after seq {last} are missing here (the stream was trimmed)")
                raise NeedResync(
                    f"host {entry.host!r}: this replica applied its seqs up to {last}, the stream has them only up to {entry.prev} "
                    "(Redis lost writes: a failover)"
                )
            if row is None:
                row = self._new_row(key)
                if row is None:  # more hosts than the table holds: registration refuses them, so only a foreign writer
                    st["fleet_bad_entries"] += 1
                    cursor = self._move(entry.id)
                    continue
            try:
                window = self._decode(entry.window)
                if window.seq != entry.seq:
                    raise BadWindow(f"window: seq {window.seq} in a stream entry of seq {entry.seq}")
            except BadWindow:
                st["fleet_bad_entries"] += 1  # every replica decides alike: the host's seq still moves on
                st["fleet_host_seq"][row] = entry.seq
                cursor = self._move(entry.id)
                continue
            if entry.seq > entry.prev + 1:  # the windows between were lost by Redis
                st["fleet_lost_entries"] += entry.seq - entry.prev - 1
                st["fleet_lost_signals"] += max(0, window.cum - window.n - int(st["fleet_host_cum"][row]))
            apply_window(st["up"], st["down"], window, self.config.lr)
            st["fleet_entries"] += 1
            st["fleet_signals"] += window.n
            st["fleet_host_seq"][row] = entry.seq
            st["fleet_host_cum"][row] = window.cum
            st["fleet_applied_at"] = window.sealed_at
            cursor = self._move(entry.id)
            applied += 1
            if key == self.host:
                # Own window back from the stream: retired (its outbox entry is free again).
                st["fleet_out_tail"] = max(self.tail, min(entry.seq, self.head))
            else:
                foreign = True
        return applied, foreign

    def _move(self, stream_id: StreamId) -> StreamId:
        self.st["fleet_cursor_ms"], self.st["fleet_cursor_seq"] = stream_id
        return stream_id

    def _new_row(self, key: int) -> int | None:
        hosts = self.st["fleet_host"]
        free = np.flatnonzero(hosts == 0)
        if not len(free):
            return None
        row = int(free[0])
        hosts[row] = key
        self.st["fleet_host_seq"][row] = 0
        self.st["fleet_host_cum"][row] = 0
        self._rows[key] = row
        return row

    def _decode(self, raw: bytes) -> Window:
        return read_window(raw, hidden_dim=self.config.hidden_dim, rank=self.config.rank, routing=self.routing)

    # ----------------------------------------------------------------- snapshots

    def snapshot(self, now: float | None = None) -> Snapshot:
        """The fleet's state as this replica holds it (its committed record must be what ``state`` holds)."""
        st = self.st
        entries, signals = int(st["fleet_entries"]), int(st["fleet_signals"])
        checkpoint = Checkpoint(
            config=self.config,
            down=np.array(st["down"]),
            up=np.array(st["up"]),
            grad_up=np.zeros_like(st["grad_up"]),
            grad_down=np.zeros_like(st["grad_down"]),
            routes=self.routes,
            route_chosen=np.zeros(self.config.routes, np.uint64),
            route_best=np.zeros(self.config.routes, np.uint64),
            route_reward=np.zeros(self.config.routes, np.float64),
            generation=entries,
            counters={
                "pending": 0,
                "trajectories_processed": signals,
                "signals_accumulated": signals,
                "flushes_performed": entries,
                "updates_applied": signals,
                "corrupt": 0,
            },
            last_flush_at=float(st["fleet_applied_at"]),
        )
        return Snapshot(
            epoch=self.epoch,
            cursor=self.cursor,
            checkpoint=checkpoint.to_bytes(),
            table=self.table(),
            entries=entries,
            signals=signals,
            lost_entries=int(st["fleet_lost_entries"]),
            lost_signals=int(st["fleet_lost_signals"]),
            bad_entries=int(st["fleet_bad_entries"]),
            written_at=time.time() if now is None else now,
            by=self.host_id,
        )

    def check_snapshot(self, snap: Snapshot) -> Checkpoint:
        """The snapshot's adapter, if it fits this engine (shape, rule, route table); :class:`BadSnapshot` if not."""
        try:
            checkpoint = Checkpoint.from_bytes(snap.checkpoint, "fleet snapshot")
            checkpoint.check_fits(self.layout, "fleet snapshot", self.routes)
        except CheckpointError as exc:
            raise BadSnapshot(str(exc)) from None
        if len(snap.table) > self.layout.fleet_hosts:
            raise BadSnapshot(f"fleet snapshot: {len(snap.table)} hosts, this engine's table holds {self.layout.fleet_hosts}")
        return checkpoint

    def load(self, snap: Snapshot) -> None:
        """Replace the fleet state by ``snap``: adapter, cursor, applied table, fleet counters, epoch.

        Local state stays: lane tails, pending sums, the outbox (own windows the snapshot
        already holds are retired), counters of this host. ``fleet_resyncs`` counts a load
        by a replica that was bound already.
        """
        checkpoint = self.check_snapshot(snap)
        st = self.st
        if self.bound:
            st["fleet_resyncs"] += 1
        st["up"] = checkpoint.up
        st["down"] = checkpoint.down
        st["fleet_epoch"] = snap.epoch
        st["fleet_cursor_ms"], st["fleet_cursor_seq"] = snap.cursor
        for name in ("entries", "signals", "lost_entries", "lost_signals", "bad_entries"):
            st[f"fleet_{name}"] = getattr(snap, name)
        st["fleet_applied_at"] = checkpoint.last_flush_at
        st["fleet_host"][:] = 0
        st["fleet_host_seq"][:] = 0
        st["fleet_host_cum"][:] = 0
        self._rows = {}
        for key, (seq, cum) in snap.table.items():
            row = self._new_row(key)
            assert row is not None  # check_snapshot bounded the table
            st["fleet_host_seq"][row] = seq
            st["fleet_host_cum"][row] = cum
        own = self.applied_seq(self.host)
        if own > self.head and self.head == self.tail:
            st["fleet_out_head"] = st["fleet_out_tail"] = own  # the fleet knows more of this host id than this segment sealed
        st["fleet_out_tail"] = max(self.tail, min(own, self.head))

    # ----------------------------------------------------------------- the learner's weights

    def speculate(self, up: np.ndarray, down: np.ndarray) -> None:
        """``up``/``down`` := the fleet's adapter with this host's outstanding windows applied, in order.

        The routing rule computes a window's gradients with these: what the adapter will
        be once the stream brings those windows back, if no other host's entry comes
        between. With one host that is exactly the adapter of a host without a fleet.
        """
        up[...] = self.st["up"]
        down[...] = self.st["down"]
        for window in self.outstanding_windows():
            apply_window(up, down, window, self.config.lr)


__all__ = ["NeedResync", "BadSnapshot", "Replica", "Snapshot", "StreamEntry", "StreamId", "ZERO_ID", "format_id", "host_key", "parse_id"]
