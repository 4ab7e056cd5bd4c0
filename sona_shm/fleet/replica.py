"""A fleet replica's state in the flusher's ledger record: the outbox, the applied table, the stream applied in order, snapshots.

Everything here changes the flusher's *private* ledger record (and the outbox entries
of the segment), never the published copy: the flusher commits it with everything
else, so a window sealed, the lane tails that produced it and the zeroed sums become
current together, and so do an applied entry, the weights it changed, the stream
cursor and the applied table. No Redis and no thread here (:mod:`sona_shm.fleet.member` has
them); the rules:

- **Sealing.** Own window ``s = fleet_out_head + 1`` is written into its outbox entry;
  ``fleet_out_head = s``. It stays until the replica applies it back from the stream,
  which retires it (``fleet_out_tail = s``), or moves past it in an entry counted bad
  (it never comes back then).
- **Applying.** Stream entries come in stream order; each carries a host's consecutive
  windows ``seq..last``, applied one after the other. An entry whose ``last`` is at or
  below the host's row of the applied table was applied already and is skipped.
  Otherwise ``prev`` (what Redis held as the host's last seq when it appended the entry)
  must equal that row: if it is larger, this replica missed entries (the
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

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import EngineConfig
from ..errors import CheckpointError, InternalSignal, SonaShmError
from ..learn.learner import DeltaWindow, Window
from ..learn.routes import RouteTable
from ..native import speedups as _speedups
from ..shm.layout import Layout
from ..store.checkpoint import Checkpoint
from .window import BadWindow, apply_sealed, read_window, split_windows, window_length, write_window

StreamId = tuple[int, int]
#: The most windows an entry may claim to carry (``redis_log.ENTRY_WINDOWS`` is what sona_shm writes; more is not an entry of ours).
MAX_ENTRY_WINDOWS = 4096
ZERO_ID: StreamId = (0, 0)


def host_key(host_id: str) -> int:
    """The 64-bit key of a host id in the applied table (never 0, which marks a free row)."""
    key = int.from_bytes(hashlib.blake2b(host_id.encode("utf-8"), digest_size=8).digest(), "little")
    return key or 1


def parse_id(raw: bytes | str) -> StreamId:
    """A Redis stream id ``b"MS-SEQ"`` as a pair of ints; :class:`ValueError` if it is not one (each part a u64)."""
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    if not (ms.isdigit() and (seq.isdigit() or not seq)):
        raise ValueError(f"not a stream id: {text[:40]!r}")
    pair = int(ms), int(seq or 0)
    if max(pair) >= 1 << 64:
        raise ValueError(f"not a stream id: {text[:40]!r}")
    return pair


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


class NeedResync(InternalSignal):
    """This replica's state is not a prefix of the stream any more; load the snapshot (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadSnapshot(InternalSignal):
    """A snapshot in Redis that cannot be loaded (written outside sona_shm, or for another fleet shape)."""


@dataclass(frozen=True)
class StreamEntry:
    """One stream entry as read: its id, the host that sealed its windows, their seqs ``seq..last``, ``prev``, their bytes.

    ``kind``: ``windows``; ``gap`` (no windows: the host's seqs ``prev + 1..last`` are lost, ``cum`` its signal total
    at ``last``); ``hello``/``bye`` (the host was registered / removed); ``given`` (``seq`` windows of ``cum`` signals
    a segment gave up when its host id was taken over: lost).
    """

    id: StreamId
    host: str
    seq: int
    prev: int
    windows: bytes
    last: int
    kind: str = "windows"
    cum: int = 0
    token: str = ""  # the first characters of the writing segment's token ("": not said)


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
            if not isinstance(state, dict) or not isinstance(state.get("table"), dict):
                raise ValueError("state: expected an object with a table")
            if len(state["table"]) > 4096:
                raise ValueError(f"state: {len(state['table'])} hosts")
            table = {}
            for k, v in state["table"].items():
                if not (isinstance(k, str) and len(k) == 16) or not (isinstance(v, list) and len(v) == 2):
                    raise ValueError("state: a table row is not 16 hex digits -> [seq, cum]")
                table[_u64(int(k, 16), "a host key")] = (_u64(v[0], "a seq"), _u64(v[1], "a cum"))
            counts = {k: _u64(state[k], k) for k in ("entries", "signals", "lost_entries", "lost_signals", "bad_entries")}
            written_at = float(fields.get(b"written_at", b"0"))
            epoch = _u64(int(fields[b"epoch"]), "epoch")
            snap = cls(
                epoch=epoch,
                cursor=parse_id(fields[b"id"]),
                checkpoint=bytes(fields[b"checkpoint"]),
                table=table,
                written_at=written_at if math.isfinite(written_at) else 0.0,
                by=fields.get(b"by", b"").decode("utf-8", "replace"),
                **counts,
            )
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError, UnicodeDecodeError) as exc:
            raise BadSnapshot(f"fleet snapshot: cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
        if epoch == 0 or 0 in table:
            raise BadSnapshot("fleet snapshot: epoch 0 or a zero host key")
        return snap


def _u64(value: object, what: str) -> int:
    """``value`` if it is an integer a u64 field holds (a snapshot from Redis may hold anything); ValueError if not."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ValueError(f"{what}: expected an integer in [0, 2**64), got {str(value)[:40]}")
    return value


class Replica:
    """The fleet part of the flusher's private ledger record; see the module docstring.

    ``state``: the flusher's private ledger record (shape ``(1,)``). The replica writes only
    what it owns there: every ``fleet_`` field, the fleet's adapter (``up``, ``down``) and
    learned route table (``route_vectors``, ``route_bias``) and its ``generation`` (the
    host's learner computes at private weights). ``outbox``:
    ``uint8[fleet_outbox, entry_bytes]``, the segment's outbox entries. ``host_id``: this
    host. Not thread-safe: the flusher's main thread alone uses it. The positions, counters
    and table are kept as Python ints too (reading a field of the record costs a
    microsecond) and written into the record as they change.
    """

    def __init__(
        self, layout: Layout, state: np.ndarray, outbox: np.ndarray, host_id: str, routes: RouteTable | None, token: str = ""
    ) -> None:
        if layout.fleet_outbox == 0:
            raise SonaShmError("replica: the segment has no fleet outbox")
        self.layout = layout
        self.config: EngineConfig = layout.config
        self.routes = routes
        self.st = state[0]
        self.outbox = outbox
        self._outbox64 = outbox.view(np.float64)  # the same entries, as float64 (entry_bytes is a multiple of 64)
        self.host_id = host_id
        self.host = host_key(host_id)
        #: This segment's token as entries carry it: windows of the same host id written by another segment (one that
        #: took the host id over) are not this segment's own, and never retire its outbox.
        self.token = token[:8]
        self.routing = self.config.rule == "routing"
        self._keys: dict[str, int] = {}  # host id -> host_key(host id), as met in the stream
        self._read_state()

    def _read_state(self) -> None:
        st = self.st
        self._epoch = int(st["fleet_epoch"])
        self._head = int(st["fleet_out_head"])
        self._tail = int(st["fleet_out_tail"])
        self._cursor: StreamId = (int(st["fleet_cursor_ms"]), int(st["fleet_cursor_seq"]))
        self._sealed = int(st["fleet_sealed_signals"])
        hosts = st["fleet_host"].tolist()
        self._rows: dict[int, int] = {k: i for i, k in enumerate(hosts) if k}
        self._seq: list[int] = st["fleet_host_seq"].tolist()
        self._cum: list[int] = st["fleet_host_cum"].tolist()

    # ----------------------------------------------------------------- identity and positions

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def bound(self) -> bool:
        return self._epoch != 0

    @property
    def head(self) -> int:
        return self._head

    @property
    def tail(self) -> int:
        return self._tail

    @property
    def outstanding(self) -> int:
        """Own windows sealed and not yet applied back from the stream."""
        return self._head - self._tail

    @property
    def cursor(self) -> StreamId:
        return self._cursor

    @property
    def hosts(self) -> int:
        return len(self._rows)

    def applied_seq(self, host: int) -> int:
        row = self._rows.get(host)
        return 0 if row is None else self._seq[row]

    def table(self) -> dict[int, tuple[int, int]]:
        return {k: (self._seq[i], self._cum[i]) for k, i in self._rows.items()}

    def _set_positions(self, head: int, tail: int) -> None:
        self._head, self._tail = head, tail
        self.st["fleet_out_head"] = head
        self.st["fleet_out_tail"] = tail

    def rebase(self, last_seq: int) -> None:
        """A segment that takes a host id over continues its sequence after ``last_seq`` (Redis's last for the host).

        Only with an empty outbox (a new segment, or one that sealed nothing unpublished).
        """
        if self._head == self._tail and last_seq > self._head:
            self._set_positions(last_seq, last_seq)

    # ----------------------------------------------------------------- the outbox

    def seal(self, window: Window | DeltaWindow, now: float | None = None) -> bytes:
        """Write ``window`` (as the learner closed it) into own window ``head + 1`` of the outbox and make it the head;
        return its bytes.

        The caller checked there is room (``outstanding < fleet_outbox``); the learner has zeroed its sums.
        """
        if self.outstanding >= self.layout.fleet_outbox:
            raise SonaShmError(f"replica: the outbox is full ({self.outstanding} entries); a window must not be opened without room")
        if self._head == self._tail:
            self.rebase(self.applied_seq(self.host))  # never a seq the fleet has seen from this host id
        seq = self._head + 1
        cum = self._sealed + window.n
        slot = (seq - 1) % self.layout.fleet_outbox
        sealed_at = time.time() if now is None else now
        size = write_window(self.outbox[slot], window, rank=self.config.rank, seq=seq, cum=cum, sealed_at=sealed_at)
        self._head, self._sealed = seq, cum
        self.st["fleet_out_head"] = seq  # published by the flusher's next commit, with the lane tails and zeroed sums
        self.st["fleet_sealed_signals"] = cum
        return self.outbox[slot, :size].tobytes()

    def window_bytes(self, seq: int) -> bytes:
        """The bytes of own outstanding window ``seq`` (what the stream entry's ``w`` field carries)."""
        if not self._tail < seq <= self._head:
            raise SonaShmError(f"replica: window {seq} is not in the outbox ({self._tail}, {self._head}]")
        entry = self.outbox[(seq - 1) % self.layout.fleet_outbox]
        return entry[: window_length(entry)].tobytes()

    def cum_at(self, seq: int) -> int:
        """The signals this host had sealed up to own window ``seq`` (``tail <= seq <= head``)."""
        cum = self._sealed
        for later in range(seq + 1, self._head + 1):
            cum -= int(self.outbox[(later - 1) % self.layout.fleet_outbox, 24:32].view(np.uint64)[0])  # n, bytes 24..32
        return max(0, cum)

    def give_up(self) -> None:
        """Retire every own outstanding window: another segment took the host id and they are counted lost."""
        self._set_positions(self._head, self._head)

    def outstanding_windows(self) -> list[bytes]:
        """Own windows sealed and not yet applied, oldest first (their bytes)."""
        return [self.window_bytes(seq) for seq in range(self._tail + 1, self._head + 1)]

    def oldest_outstanding_at(self) -> float | None:
        """When the oldest own outstanding window was sealed (None: none outstanding); reads its header only."""
        if self._head == self._tail:
            return None
        return float(self._outbox64[self._tail % self.layout.fleet_outbox, 5])  # sealed_at, bytes 40..48

    # ----------------------------------------------------------------- applying the stream

    def apply(self, entries: list[StreamEntry]) -> tuple[int, bool]:
        """Apply ``entries`` (stream order) to the record; return ``(applied, foreign)``.

        ``foreign``: an entry of another host changed the adapter. Raises
        :class:`NeedResync` at the first entry that does not follow this replica's state;
        the entries before it are applied (the caller commits or discards them).
        """
        st = self.st
        up, down, vectors, bias = st["up"], st["down"], st["route_vectors"], st["route_bias"]
        seqs, cums, rows, keys = self._seq, self._cum, self._rows, self._keys
        applied = signals = bad = lost_entries = lost_signals = 0
        foreign = False
        applied_at = None
        cursor, tail = self._cursor, self._tail
        try:
            for entry in entries:
                if entry.id <= cursor:
                    continue  # read twice (a reconnect re-reads from the committed cursor)
                if not entry.host:  # not an entry sona_shm wrote (see redis_log): counted, passed
                    bad += 1
                    cursor = entry.id
                    continue
                key = keys.get(entry.host)
                if key is None:
                    key = keys[entry.host] = host_key(entry.host)
                row = rows.get(key)
                kind = entry.kind
                if kind != "windows":
                    if kind == "hello":  # a registered host gets a row (one it has already keeps its place)
                        if row is None and self._new_row(key) is None:
                            bad += 1  # more hosts than the table holds: Redis refuses them, so only a foreign writer
                    elif kind == "bye":  # a retired host: its row is free again
                        if row is not None:
                            self._free_row(key)
                    elif kind == "given":  # windows a segment whose host id was taken over never published
                        if row is None:
                            bad += 1
                        else:
                            lost_entries += entry.seq
                            lost_signals += entry.cum
                    cursor = entry.id
                    if kind != "gap":
                        continue
                if row is None:
                    bad += 1  # a host never registered: not one of this fleet's (a table of ghosts locks no one out)
                    cursor = entry.id
                    continue
                last = seqs[row]
                if entry.last <= last:
                    cursor = entry.id  # applied already: a publish repeated after a lost answer is refused by Redis
                    continue
                if entry.prev != last:
                    if entry.prev > last:
                        raise NeedResync(f"entries of host {entry.host!r} after seq {last} are missing here (the stream was trimmed)")
                    raise NeedResync(
                        f"host {entry.host!r}: this replica applied its seqs up to {last}, the stream has them only up to "
                        f"{entry.prev} (Redis lost writes: a failover)"
                    )
                if kind == "gap":  # seqs prev+1..last are lost (Redis lost them after the host retired them)
                    lost_entries += entry.last - entry.prev
                    lost_signals += max(0, entry.cum - cums[row])
                    seqs[row], cums[row] = entry.last, max(cums[row], entry.cum)
                    if key == self.host and self._mine(entry):
                        tail = max(tail, min(entry.last, self._head))
                    cursor = entry.id
                    continue
                mine = key == self.host and self._mine(entry)
                count = entry.last - entry.seq + 1
                parts = split_windows(entry.windows, count) if entry.seq > entry.prev and 0 < count <= MAX_ENTRY_WINDOWS else None
                for i, raw in enumerate(parts or ()):
                    if int.from_bytes(raw[16:24], "little") != entry.seq + i:
                        break  # not the seq its place says (read from its head, which split_windows saw): not applied either
                    done = self._apply(up, down, vectors, bias, raw)
                    if done is None:
                        break  # every replica decides alike: the windows before it count, the rest of the entry is bad
                    _, n, cum, applied_at = done
                    if i == 0 and entry.seq > entry.prev + 1:  # the windows between were lost by Redis
                        lost_entries += entry.seq - entry.prev - 1
                        lost_signals += max(0, cum - n - cums[row])
                    signals += n
                    seqs[row], cums[row] = entry.seq + i, cum
                    applied += 1
                    if mine:
                        tail = max(tail, min(entry.seq + i, self._head))  # own window back from the stream: retired
                    else:
                        foreign = True
                if seqs[row] != entry.last:
                    bad += 1  # not windows of this fleet (or not all of them): the host's seq still moves past the entry
                    seqs[row] = entry.last
                    if mine:  # own windows the fleet moved past unapplied: never coming back, so retired
                        tail = max(tail, min(entry.last, self._head))
                cursor = entry.id
        finally:
            # Into the record once per batch (also when a resync interrupts it: the entries before count).
            if cursor != self._cursor or bad:
                self._cursor = cursor
                st["fleet_cursor_ms"], st["fleet_cursor_seq"] = cursor
                st["fleet_host_seq"][:] = seqs
                st["fleet_host_cum"][:] = cums
                st["fleet_entries"] += applied
                st["fleet_signals"] += signals
                st["fleet_bad_entries"] += bad
                st["fleet_lost_entries"] += lost_entries
                st["fleet_lost_signals"] += lost_signals
                if applied_at is not None:
                    st["fleet_applied_at"] = applied_at
                if tail != self._tail:
                    self._tail = tail
                    st["fleet_out_tail"] = tail
        return applied, foreign

    def _new_row(self, key: int) -> int | None:
        hosts = self.st["fleet_host"]
        free = np.flatnonzero(hosts == 0)
        if not len(free):
            return None
        row = int(free[0])
        hosts[row] = key
        self._seq[row] = self._cum[row] = 0
        self._rows[key] = row
        return row

    def _mine(self, entry: StreamEntry) -> bool:
        return not entry.token or not self.token or entry.token == self.token

    def _free_row(self, key: int) -> None:
        row = self._rows.pop(key)
        self.st["fleet_host"][row] = 0
        self._seq[row] = self._cum[row] = 0

    def _apply(self, up: np.ndarray, down: np.ndarray, vectors: np.ndarray, bias: np.ndarray, raw: bytes | memoryview) -> tuple | None:
        """Check window ``raw`` and apply it to the state ``up``, ``down``, ``vectors``, ``bias``: ``(seq, n, cum,
        sealed_at)``, or None (nothing changed) if it is not a window of this fleet (every replica decides alike)."""
        config = self.config
        if _speedups is not None:  # one call, the same checks and bits as below
            if not self.routing:
                return _speedups.apply_window(up, raw, config.lr, config.hidden_dim, config.rank)
            if all(a.flags.c_contiguous and a.flags.writeable for a in (up, down, vectors, bias)):
                return _speedups.apply_deltas_window(up, down, vectors, bias, raw, config.hidden_dim, config.rank, self._routes_used)
        try:
            sealed = read_window(raw, hidden_dim=config.hidden_dim, rank=config.rank, routing=self.routing, max_routes=self._routes_used)
        except BadWindow:
            return None
        apply_sealed(up, down, vectors, bias, sealed, config.lr)
        return sealed.seq, sealed.n, sealed.cum, sealed.sealed_at

    @property
    def _routes_used(self) -> int:
        """The routes a window may carry biases of: the engine's in use (a fleet's hosts have the same table)."""
        return int(self.st["routes_used"]) if self.routing else 0

    # ----------------------------------------------------------------- snapshots

    def snapshot(self, now: float | None = None) -> Snapshot:
        """The fleet's state as this replica holds it (its committed record must be what ``state`` holds)."""
        st = self.st
        entries, signals = int(st["fleet_entries"]), int(st["fleet_signals"])
        copy = np.zeros(1, st.dtype)
        copy[0] = st
        record = copy[0]  # the fleet's learned state: no open window, no counts of this host
        record["grad_up"] = 0.0
        for name in ("route_chosen", "route_best", "route_reward", "route_centre"):
            record[name] = 0
        if self.routing:
            for work, published in (
                ("work_up", "up"),
                ("work_down", "down"),
                ("work_vectors", "route_vectors"),
                ("work_bias", "route_bias"),
            ):
                record[work] = record[published]
        checkpoint = dataclasses.replace(
            Checkpoint.from_record(record, self.config, self.routes),
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
            engine_id=0,  # the fleet's state, no one engine's
            paused=0,
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
        if self.routing:
            k = len(checkpoint.arrays["route_bias"])
            st["route_vectors"][:k] = checkpoint.arrays["route_vectors"]
            st["route_bias"][:k] = checkpoint.arrays["route_bias"]
        st["fleet_epoch"] = snap.epoch
        st["fleet_cursor_ms"], st["fleet_cursor_seq"] = snap.cursor
        for name in ("entries", "signals", "lost_entries", "lost_signals", "bad_entries"):
            st[f"fleet_{name}"] = getattr(snap, name)
        st["fleet_applied_at"] = checkpoint.last_flush_at
        st["fleet_host"][:] = 0
        st["fleet_host_seq"][:] = 0
        st["fleet_host_cum"][:] = 0
        self._read_state()
        for key, (seq, cum) in snap.table.items():
            row = self._new_row(key)
            assert row is not None  # check_snapshot bounded the table
            self._seq[row], self._cum[row] = seq, cum
        st["fleet_host_seq"][:] = self._seq
        st["fleet_host_cum"][:] = self._cum
        own = self.applied_seq(self.host)
        if own > self._head and self._head == self._tail:
            self._set_positions(own, own)  # the fleet knows more of this host id than this segment sealed
        self._set_positions(self._head, max(self._tail, min(own, self._head)))

    # ----------------------------------------------------------------- the record

    def bump_generation(self) -> None:
        """The fleet's adapter changed (windows applied, a snapshot loaded): workers reload it."""
        self.st["generation"] += 1

    # ----------------------------------------------------------------- the learner's weights

    def speculate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The fleet's learned state with this host's outstanding windows applied, in order: ``(up, down,
        route_vectors, route_bias)`` (the route table's rows in use), new arrays.

        The routing rule learns from there: what the state will be once the stream brings those windows back, if
        no other host's entry comes between. With one host that is exactly the state of a host without a fleet.
        """
        st = self.st
        k = self._routes_used
        state = (np.array(st["up"]), np.array(st["down"]), np.array(st["route_vectors"][:k]), np.array(st["route_bias"][:k]))
        for raw in self.outstanding_windows():
            if self._apply(*state, raw) is None:
                raise SonaShmError("replica: an own outbox entry is not a window (memory written outside sona_shm?)")
        return state


__all__ = ["NeedResync", "BadSnapshot", "Replica", "Snapshot", "StreamEntry", "StreamId", "ZERO_ID", "format_id", "host_key", "parse_id"]
