"""The binary layout of one sona_shm segment — the only place it is written down.

A segment is one POSIX shared-memory object ``/sona_shm.<name>`` (``/dev/shm/sona_shm.<name>``)
plus one POSIX semaphore ``/sona_shm.<name>.bell`` (the flusher's doorbell). All integers
are little-endian and naturally aligned. The publication rules below rely on x86-64's
total store order (a reader that sees a store also sees every store the writer made
before it), with the compiler barrier a C call implies; :mod:`sona_shm.machine` refuses
to import on any other CPU.

Regions, in order (``PAGE`` = 4096; every region offset is in the header)::

    offset          size                          region
    0               PAGE                          header + control lines
    ledger_offset   2 * ledger_bytes              the flusher's state, double-buffered
    routes_offset   routes_bytes                  the route vectors as given (max_routes rows)
    admin_offset    admin_bytes                   the admin mailbox and the flusher's settings
    fleet_offset    FLEET_BYTES (0 without outbox) the fleet's control lines and identity
    outbox_offset   fleet_outbox * entry_bytes    the fleet outbox: sealed windows (page-aligned)
    lanes_offset    lanes * 128                   lane control (one per producer lane)
    slots_offset    lanes * lane_slots * slot_bytes   lane rings of trajectory slots
    buffer_offset   capacity * slot_bytes         buffer of learned trajectories (for drain)

Header (offset 0, written once by the creator; ``magic`` last, so a reader that sees
the magic sees a complete header)::

    0   8s  magic            b"SONA-SHM"; zero while the segment is being created
    8   u32 layout_version   LAYOUT_VERSION
    12  u32 header_bytes     size of this struct
    16  u64 total_bytes      size of the whole segment
    24  u32 hidden_dim       h
    28  u32 rank             R (1 or 2)
    32  u32 max_steps        S, steps a slot can hold
    36  u32 attention_dim    A, attention weights a step can hold
    40  u32 lanes            L, producer lanes
    44  u32 lane_slots       N, slots per lane ring
    48  u32 capacity         C, slots in the learned-trajectory buffer
    52  u32 slot_bytes       stride of one slot
    56  f64 lr
    64  u64 flush_threshold
    72  u64 ledger_offset    (ledger_bytes = (routes_offset - ledger_offset) / 2)
    80  u64 lanes_offset
    88  u64 slots_offset
    96  u64 buffer_offset
    104 f64 created_at       unix time
    112 u32 rule             0 reference, 1 routing (config.RULES)
    116 u32 routes           K, routes in the table the engine was created with (0: no table)
    120 f64 temperature      the routing rule's softmax temperature
    128 u64 routes_offset    (routes_bytes = round_up(4 * Km * h, 64))
    136 u64 fleet_offset     (FLEET_BYTES when fleet_outbox > 0, else nothing there)
    144 u64 outbox_offset
    152 u32 fleet_outbox     entries of the outbox ring (0: the engine cannot join a fleet)
    156 u32 fleet_hosts      M, hosts the applied table can hold (MAX_FLEET_HOSTS, or 0 without outbox)
    160 f64 adapter_lr       the routing rule's step of the adapter (0: it does not learn)
    168 u32 max_routes       Km, rows reserved for routes (K and room to add more; 0 without a table)

Control lines (64 bytes each, inside the header page; one writer per line)::

    FLUSHER_LINE = 1024   written by the flusher holding the flusher lock
        +0  i64 pid           +8  u64 start_ticks (/proc/PID/stat field 22)
        +16 f64 heartbeat     unix time of the flusher's last loop
        +24 u64 idle          1 while the flusher waits on the doorbell: producers ring it
        +32 f64 started_at    +40 u64 scans (loop iterations)
    COMMIT_LINE = 1088    written by the flusher
        +0  u64 commit        ledger copy ``commit & 1`` is current (a seqcount latch)
    CONSUMER_LINE = 1152  written only by a buffer consumer holding the drain lock
        +0  u64 buffer_tail   buffer slots ``[buffer_tail, buffer_head)`` hold undrained
                              trajectories (buffer_head is in the ledger); it is also the
                              number drained, ever. A consumer copies its slots out, then
                              stores the new tail: the store that hands them over and
                              frees them for the flusher, which writes buffer index j
                              only while j < buffer_tail + capacity (a stale tail it
                              reads only makes the buffer look fuller)
        +8  i64 pid           the consumer that last took the drain lock (for people)
        +16 f64 drained_at    unix time of the last drain that moved the tail

Ledger copy (``LEDGER_DTYPE``; copy ``i`` at ``ledger_offset + i * ledger_bytes``). The
flusher keeps its state privately, writes it whole into copy ``(commit + 1) & 1`` and
then stores ``commit + 1`` — the store that publishes it. A reader reads ``commit``,
then copy ``commit & 1``, then ``commit`` again, and retries if it moved. A flusher
killed mid-write leaves the current copy untouched, so there is nothing to repair;
because the lane tails live in the same copy as the gradients, a trajectory is learned
exactly once across any crash::

    generation u64   bumped whenever the adapter changes (forward() caches by it)
    pending u64      signals accumulated since the last flush (reference: update_count)
    trajectories_processed, signals_accumulated, flushes_performed, updates_applied u64
    buffer_head u64     learned trajectories ever stored in the buffer
    buffer_dropped u64  learned trajectories not stored because the buffer was full
    last_flush_at f64   unix time of the last flush that changed the adapter (0: never)
    corrupt u64         published slots (and lane heads) that failed validation: counted, not learned
    engine_id u64       random, non-zero, drawn when the engine is created (or the checkpoint's it was created
                        from); checkpoints carry it, and a rollback takes only a checkpoint of the same id
    -- learning paused and rolled back (see "Admin mailbox"; engine/admin.py):
    paused u64          0 learning; 1 paused by a request (``sona-shm pause``); 2 paused by the reward guard
    paused_at f64       unix time learning was last paused (0: never)
    pauses u64          times learning was paused
    paused_skipped u64  trajectories the flusher took from the lanes while paused: counted in
                        ``trajectories_processed`` and per route, kept in the buffer, not learned (never)
    rollbacks u64       rollbacks applied (by request or by the guard)
    rolled_back_signals u64  signals whose learning rollbacks discarded: at each one, ``signals_accumulated``
                        before it minus the checkpoint's (0 when the checkpoint is ahead)
    last_rollback_at f64     unix time of the last rollback (0: never)
    rollback_checkpoint_at f64  ``written_at`` of the checkpoint the last rollback restored
    -- the moving reward and the reward guard (engine/guard.py):
    moving_reward f64   mean reward of the last ``moving_feedbacks`` feedbacks that name the route taken
    moving_feedbacks u64  feedbacks behind ``moving_reward`` (the guard's window once it has seen that many
                        since the flusher started, resumed or rolled back; fewer before)
    guard_trips u64     times the reward guard paused learning
    guard_level f64     the moving reward when the last good checkpoint was written (the guard's reference)
    guard_checkpoint_at f64  ``written_at`` of that checkpoint (0: none yet)
    -- the fleet (all 0 on an engine that never joined one; see "Fleet" below):
    fleet_epoch u64     the fleet this segment is bound to (its epoch in Redis); 0: not bound
    fleet_out_head u64  own windows sealed, ever: the seq of the last one in the outbox
    fleet_out_tail u64  own windows retired: applied back from the stream, or passed in a bad entry (seq; <= out_head)
    fleet_cursor_ms, fleet_cursor_seq u64   the stream id of the last entry applied
    fleet_entries u64   windows applied from the stream (every host's, own included; an entry carries one or more)
    fleet_signals u64   signals of those windows
    fleet_lost_entries, fleet_lost_signals u64   windows the stream lost (a failover; counted
                        from the gaps in a host's seqs, so the same on every replica)
    fleet_bad_entries u64   stream entries that failed validation: counted, skipped from the first window that failed
    fleet_resyncs u64   times this replica replaced its state by the fleet's snapshot
    fleet_sealed_signals u64   signals this host sealed, ever (the ``cum`` of its entries)
    fleet_applied_at f64    unix time the last applied window was sealed (its author's clock)
    down f32[R, h], up f32[R, h]   the adapter (``down`` learns only under the routing rule);
                        in fleet mode the fleet's adapter: changed only by applying the stream
    routes_used u64     rows of the route table in use (routes ever added: K at creation, then
                        one more per ``routes add``); rows below it hold a route, active or retired
    routes_version u64  bumped whenever a route's name or state changes (workers reload names)
    admin_request u64   the last admin request applied (see "Admin mailbox")
    down f32[R, h], up f32[R, h]   the published adapter (``down`` learns only under the routing rule
                        with ``adapter_lr``); in fleet mode the fleet's: changed only by applying the stream
    grad_up f64[R, h]   the reference rule's gradient sums since the last flush (or seal)
    lane_tail u64[L]    slots of each lane learned, ever
    route_chosen u64[Km] feedback whose route_index is k (the route taken)
    route_best u64[Km]  feedback whose best_index is k (the route that was right)
    route_reward f64[Km] summed reward of route k when taken (quality, or 1/0 against best_index)
    route_vectors f32[Km, h]  the published route vectors route() scores with: the unit vectors of the
                        table as given, then (routing rule) as learned; in fleet mode the fleet's
    route_bias f32[Km]  the published per-route bias (routing rule; 0 under the reference rule)
    route_state u8[Km]  0 free row, 1 active route, 2 retired route (never chosen or learned again)
    route_names S64[Km] route names, UTF-8, NUL-padded
    -- the routing rule's working copy (0 rows under the reference rule; learn/routing.py):
    work_up, work_down f32[R, h], work_vectors f32[Km, h], work_bias f32[Km]
                        the state every feedback moves; a window publishes ``working - published``
    route_centre f64[h] the running mean of the adapted queries the rule centres on
    fleet_host u64[M]   the applied table: a host (the first 8 bytes of blake2b(host id)), 0: free
    fleet_host_seq u64[M]   the last seq of that host applied here
    fleet_host_cum u64[M]   the ``cum`` of its last window applied (signals the host had sealed by then)

The scalars come first, the arrays from the next 64-byte boundary on.

Fleet (only with ``fleet_outbox > 0``; :mod:`sona_shm.fleet.member` runs it). Control lines at
``fleet_offset``, written by the flusher's main thread (holding the flusher lock) at most
every 20 ms, from its own state and what its Redis threads report; for monitors only,
nothing depends on them across a crash::

    +0   main line
         +0  f64 lag_s         age of the oldest learning this replica knows of and has not
                               applied (own sealed windows, entries read): 0 when caught up
         +8  u64 paused        1 while learning waits for room in the outbox (or --fleet-lag)
         +16 u64 pauses        times learning paused so
         +24..64 zero          (the hosts seen are counted from the ledger's applied table)
    +64  link line: the Redis threads' figures
         +0  u64 connected     1 while Redis answers both of them
         +8  f64 contact_at    unix time of the last answer from Redis
         +16 u64 published     the highest own seq Redis confirmed is in the stream
         +24 f64 error_at      unix time of the last failed call (0: none)
    +128 identity, written before the segment is bound (``fleet_epoch`` set) and not after
         +0  bytes[16] token   random: the lease on the host id in Redis is this segment's
         +16 u16 host_len      +18 u16 key_len
         +64 host id bytes[128] (UTF-8)    +192 fleet key bytes[320] (UTF-8)

Outbox entry ``s`` (own sealed window ``s``, 1-based) at ``outbox_offset + ((s - 1) %
fleet_outbox) * entry_bytes``: written by the main thread into a free entry (``s <=
out_tail + fleet_outbox``) before the ledger commit whose ``fleet_out_head = s``
publishes it, together with the lane tails that produced it and the zeroed gradient
sums (or the routing rule's working copy made published); freed by the commit that raises
``fleet_out_tail`` to ``s``. Its first bytes (as many as its header says: at most
``window_bytes``) are, byte for byte, what the stream entry's ``w`` field carries for it
(one or more consecutive windows back to back; :mod:`sona_shm.fleet.window`)::

    0   4s  magic        b"SFW1" (reference rule: gradient sums) or b"SFW2" (routing rule: deltas)
    4   u32 hidden_dim   8 u32 rank   12 u16 up_rows   14 u16 down_rows
    16  u64 seq          24 u64 n (signals)   32 u64 cum (signals sealed by the host, this one included)
    40  f64 sealed_at    48 u16 routes (SFW2: biases carried)   50 u16 rows (SFW2: route rows carried)   52..64 zero
    64  SFW1: f64 grad_up[up_rows, h]  (up_rows 1: every rank row is that one)
        SFW2: f32 up[up_rows, h], f32 down[down_rows, h] (up_rows = down_rows: R when the adapter learns, else 0),
              f32 bias[routes] (every route in use), u16 row[rows] (ascending; padded to a multiple of 4 bytes),
              f32 vectors[rows, h] (the deltas of the route rows the window touched)
    entry_bytes = round_up(window_bytes, 64); window_bytes: SFW1 64 + 8 * h * R,
                  SFW2 64 + 4 * h * (2 * R + Km) + 4 * Km + round_up(2 * Km, 4) (every route row touched)

Lane control (128 bytes per lane at ``lanes_offset + lane * 128``)::

    +0   producer line, written only by the lane's owner (holder of the lane lock)
         +0  u64 head          slots committed, ever: publishes slots [.., head)
         +8  u64 drops         trajectories refused because the ring was full
         +16 u64 next_id       trajectory-id counter of this lane
         +24 u64 flush_request bumped by flush(); the flusher answers in flush_ack
         +32 f64 last_record_at unix time of the last committed record
         +40 i64 owner_pid     +48 u64 owner_start_ticks  +56 u64 claims
    +64  flusher line, written only by the flusher
         +0  u64 flush_ack     the last flush_request answered

Slot (``slot_bytes`` each; lane ``l`` slot ``i`` at ``slots_offset + (l * N + i %
N) * slot_bytes``, buffer slot ``j`` at ``buffer_offset + (j % C) * slot_bytes``)::

    0   u64 seq         lane slots: lane index + 1 of the record, written after the rest;
                        buffer slots: buffer index + 1
    8   u64 traj_id     16 u64 latency_us     24 f32 quality
    28  u16 n_steps     30 u16 route_len
    32  u16 route_index + 1 (0: none)   34 u16 best_index + 1 (0: none)
    36  f32 probability (the route taken was chosen with it, in (0, 1]; 0: not recorded)
    40  S * (f32 reward, u16 act_len, u16 att_len)
    40 + 8S             route bytes[64] (UTF-8)
    payload_offset = round_up(104 + 8S, 64):
        query f32[h], then S * (activations f32[h] (zero-padded past act_len),
                                attention f32[A] (valid up to att_len))

Route vectors as given (at ``routes_offset``): ``f32[Km, h]``, row ``k`` the vector route
``k`` was created with (the table's, or ``routes add``'s) — what a feedback's step carries
and what a route's drift is measured from. Row ``k`` is written once, before the commit
that raises ``routes_used`` past ``k`` (by the creator before the magic, or by the
flusher), and never after; readers read only rows below a committed ``routes_used``.

Admin mailbox (at ``admin_offset``, ``admin_bytes``; every engine has one). Route changes,
pause, resume and rollback go from whoever asks to the flusher through it, one request at a
time: the requester holds the admin lock from writing a request until it has its answer (or
gives up waiting)::

    +0    u64 request      bumped by the requester after writing the fields below
    +8    u64 answered     the flusher: the last request answered (the reply fields are its)
    +16   u32 op           1 add, 2 rename, 3 retire (a route); 4 pause, 5 resume, 6 rollback
    +20   u32 route        the route changed (rename, retire): its index
    +24   u32 status       the reply: 1 done, 2 refused (the message says why)
    +28   u32 index        the reply: the route's index (route changes)
    +32   u64 generation   the reply: the weights generation after the request
    +40   u64 discarded    the reply: rollback: the signals whose learning it discarded
    +48..64 zero
    +64   S64 name         add: the new route's name; rename: its new name
    +128  S256 message     the reply: why a request was refused
    +384  S4096 path       rollback: the checkpoint file (an absolute path, UTF-8, NUL-padded)
    +4480 the flusher's settings (below)
    +8640 f32[h] vector    add: the new route's vector as given

The flusher applies a request between two scans: it validates it against the committed
record (a route change against the table, a rollback's file against the engine), changes
its learner and record and commits with ``admin_request = request``; then it writes the
reply and ``answered``. A flusher killed in between leaves ``admin_request == request >
answered``: the next one answers "done" without applying it twice. With no flusher
running, the requester applies it itself holding the flusher lock, with one commit.

The flusher's settings (at ``admin_offset + 4480``), written by the flusher holding the
flusher lock when it starts: how it keeps checkpoints and guards the reward, for the
commands and monitors that ask (``sona-shm checkpoints``, ``rollback --back``, ``stats``);
nothing depends on them across a crash::

    +0    u64 seq          odd while the flusher writes the block (a reader retries)
    +8    u64 checkpoint_keep      timestamped checkpoints kept (0: only the file itself)
    +16   f64 checkpoint_interval  seconds between periodic checkpoints
    +24   f64 guard_drop   the reward guard's DROP (0: no guard)
    +32   u64 guard_window N, the feedbacks of the moving reward
    +40   u64 guard_rollback  1: the guard also rolls back to the last good checkpoint
    +48   i64 pid          the flusher that wrote them
    +56   u64 zero
    +64   S4096 checkpoint the checkpoint path (absolute, UTF-8, NUL-padded; empty: none)

Only the prefix a trajectory uses is ever written or copied (``prefix_bytes(n_steps)``),
and slots of a page or more are page-aligned: at h=256 a one-step trajectory touches one
4 KiB page of its 12 KiB slot. The segment's pages are all reserved when it is created
(``segment.reserve``), so its memory cost is ``total_bytes`` from the start and no write
can fail for want of a page.

Advisory locks (Linux open-file-description locks on one byte of the segment file;
the kernel drops them when the holder dies, so a SIGKILLed holder never wedges anyone
and a recycled pid never inherits a lane)::

    byte 0            the flusher lock (exactly one flusher per segment)
    byte 1            the drain lock (its holder owns the consumer line)
    byte 2            the admin lock (its holder owns the admin mailbox's request)
    byte 64 + lane    the lane lock (its holder owns the lane's producer line)
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DEFAULT_FLEET_OUTBOX, DEFAULT_FLEET_OUTBOX_BYTES, RULES, EngineConfig
from ..errors import InvalidInputError, LayoutMismatchError
from ..native import speedups as _speedups
from ..trajectory import ROUTE_MAX_BYTES

MAGIC = b"SONA-SHM"
LAYOUT_VERSION = 5
PAGE = 4096
LINE = 64
LANE_CONTROL_BYTES = 128

HEADER_FORMAT = "<8sIIQIIIIIIIIdQQQQQdIIdQQQIIdI4x"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)

#: Byte offset of the header's ``created_at`` (read alone by monitors to tell a recreated engine apart).
HEADER_CREATED_AT = 104

FLUSHER_LINE = 1024
COMMIT_LINE = 1088
CONSUMER_LINE = 1152

# Field offsets inside the lines above, in bytes.
FL_PID, FL_START, FL_HEARTBEAT, FL_IDLE, FL_STARTED_AT, FL_SCANS = 0, 8, 16, 24, 32, 40
CONS_TAIL, CONS_PID, CONS_DRAINED_AT = 0, 8, 16
LANE_HEAD, LANE_DROPS, LANE_NEXT_ID, LANE_FLUSH_REQ, LANE_LAST_AT = 0, 8, 16, 24, 32
LANE_OWNER_PID, LANE_OWNER_START, LANE_CLAIMS = 40, 48, 56
LANE_FLUSH_ACK = 64

#: The fleet region: control lines and identity (see the docstring).
FLEET_BYTES = 512
FLEET_MAIN_LINE, FLEET_LINK_LINE, FLEET_IDENTITY = 0, 64, 128
FM_LAG, FM_PAUSED, FM_PAUSES = 0, 8, 16
FK_CONNECTED, FK_CONTACT_AT, FK_PUBLISHED, FK_ERROR_AT = 0, 8, 16, 24
FI_TOKEN, FI_HOST_LEN, FI_KEY_LEN, FI_HOST, FI_KEY = 0, 16, 18, 64, 192
FLEET_TOKEN_BYTES, FLEET_HOST_BYTES, FLEET_KEY_BYTES = 16, 128, 320
#: Hosts a fleet's applied table holds; a fleet key refuses more (see sona_shm.fleet.member).
MAX_FLEET_HOSTS = 64
#: The header of a sealed window (outbox entry and stream field), in bytes.
WINDOW_HEAD_BYTES = 64

#: The admin mailbox (see the docstring): field offsets, operations and reply states.
ADMIN_REQUEST, ADMIN_ANSWERED, ADMIN_OP, ADMIN_ROUTE, ADMIN_STATUS, ADMIN_INDEX = 0, 8, 16, 20, 24, 28
ADMIN_GENERATION, ADMIN_DISCARDED = 32, 40
ADMIN_NAME, ADMIN_MESSAGE, ADMIN_PATH, ADMIN_SETTINGS, ADMIN_VECTOR = 64, 128, 384, 4480, 8640
ADMIN_MESSAGE_BYTES = 256
#: Bytes of a path in the admin region (Linux's PATH_MAX, its terminating NUL included).
ADMIN_PATH_BYTES = 4096
OP_ADD, OP_RENAME, OP_RETIRE, OP_PAUSE, OP_RESUME, OP_ROLLBACK = 1, 2, 3, 4, 5, 6
STATUS_DONE, STATUS_REFUSED = 1, 2
#: The flusher's settings inside the admin region (offsets from ``ADMIN_SETTINGS``).
SET_SEQ, SET_KEEP, SET_INTERVAL, SET_GUARD_DROP, SET_GUARD_WINDOW, SET_GUARD_ROLLBACK, SET_PID, SET_PATH = 0, 8, 16, 24, 32, 40, 48, 64
#: ``paused`` in the ledger: learning, paused by a request, paused by the reward guard.
LEARNING, PAUSED_BY_REQUEST, PAUSED_BY_GUARD = 0, 1, 2

LOCK_FLUSHER = 0
LOCK_DRAIN = 1
LOCK_ADMIN = 2
LOCK_LANE_BASE = 64


# Word indexes: where each control field is as an index into the segment's 8-byte word views
# (``Segment.u64`` and ``Segment.f64``: index = byte offset // 8). The layout builds them once,
# from the byte offsets above; every role reads and writes the control lines through these.


@dataclass(frozen=True, slots=True)
class FlusherWords:
    """``FLUSHER_LINE``: written by the flusher holding the flusher lock."""

    pid: int
    start_ticks: int
    heartbeat: int  # f64
    idle: int
    started_at: int  # f64
    scans: int


@dataclass(frozen=True, slots=True)
class ConsumerWords:
    """``CONSUMER_LINE``: written by the consumer holding the drain lock."""

    tail: int
    pid: int
    drained_at: int  # f64


@dataclass(frozen=True, slots=True)
class LaneWords:
    """One lane's control: the producer line (its owner writes it) and ``flush_ack`` (the flusher's)."""

    head: int
    drops: int
    next_id: int
    flush_request: int
    last_record_at: int  # f64
    owner_pid: int
    owner_start_ticks: int
    claims: int
    flush_ack: int


@dataclass(frozen=True, slots=True)
class FleetWords:
    """The fleet region's main line (the flusher's main thread) and link line (its figures of the Redis threads)."""

    lag_s: int  # f64
    paused: int
    pauses: int
    connected: int
    contact_at: int  # f64
    published: int
    error_at: int  # f64


def _words(cls: Any, line: int, offsets: tuple[int, ...]) -> Any:
    return cls(*((line + offset) // 8 for offset in offsets))


#: The commit word of the ledger latch.
COMMIT_WORD = COMMIT_LINE // 8
FLUSHER_WORDS: FlusherWords = _words(FlusherWords, FLUSHER_LINE, (FL_PID, FL_START, FL_HEARTBEAT, FL_IDLE, FL_STARTED_AT, FL_SCANS))
CONSUMER_WORDS: ConsumerWords = _words(ConsumerWords, CONSUMER_LINE, (CONS_TAIL, CONS_PID, CONS_DRAINED_AT))
_LANE_FIELDS = (
    LANE_HEAD,
    LANE_DROPS,
    LANE_NEXT_ID,
    LANE_FLUSH_REQ,
    LANE_LAST_AT,
    LANE_OWNER_PID,
    LANE_OWNER_START,
    LANE_CLAIMS,
    LANE_FLUSH_ACK,
)

SLOT_HEAD_BYTES = 40
#: Bytes of one route name in the route table (UTF-8, NUL-padded), the bound of a trajectory's route.
ROUTE_NAME_BYTES = ROUTE_MAX_BYTES


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class Layout:
    """Offsets and numpy dtypes of a segment with a given :class:`EngineConfig`."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        h, r, s, a = config.hidden_dim, config.rank, config.max_steps, config.attention_dim
        k = config.routes
        km = self.max_routes = config.max_routes  # rows of the route table: its K routes and room for more
        routing = config.rule == "routing"
        kw, hw = (km, h) if routing else (0, 0)  # the routing rule's working state; none under the reference rule
        self.hidden_dim, self.rank, self.max_steps, self.attention_dim = h, r, s, a
        self.lanes, self.lane_slots, self.capacity, self.routes = config.lanes, config.lane_slots, config.capacity, k

        self.route_offset = SLOT_HEAD_BYTES + 8 * s
        self.payload_offset = _round_up(self.route_offset + ROUTE_MAX_BYTES, LINE)
        self.step_bytes = 4 * (h + a)
        used = self.payload_offset + 4 * h + s * self.step_bytes
        self.slot_bytes = _round_up(used, PAGE) if used > PAGE else _round_up(used, LINE)
        self.slot_dtype = np.dtype(
            {
                "names": [
                    "seq",
                    "traj_id",
                    "latency_us",
                    "quality",
                    "n_steps",
                    "route_len",
                    "route_index",
                    "best_index",
                    "probability",
                    "meta",
                    "route",
                    "query",
                    "steps",
                ],
                "formats": [
                    "<u8",
                    "<u8",
                    "<u8",
                    "<f4",
                    "<u2",
                    "<u2",
                    "<u2",
                    "<u2",
                    "<f4",
                    (np.dtype([("reward", "<f4"), ("act_len", "<u2"), ("att_len", "<u2")]), (s,)),
                    (np.dtype("S1"), (ROUTE_MAX_BYTES,)),
                    ("<f4", (h,)),
                    (np.dtype([("act", "<f4", (h,)), ("att", "<f4", (a,))]), (s,)),
                ],
                "offsets": [
                    0,
                    8,
                    16,
                    24,
                    28,
                    30,
                    32,
                    34,
                    36,
                    SLOT_HEAD_BYTES,
                    self.route_offset,
                    self.payload_offset,
                    self.payload_offset + 4 * h,
                ],
                "itemsize": self.slot_bytes,
            }
        )

        self.fleet_outbox = config.fleet_outbox
        m = self.fleet_hosts = MAX_FLEET_HOSTS if config.fleet_outbox else 0
        # The largest sealed window (fleet/window.py): the reference rule's f64 sums of up, or the routing rule's f32
        # deltas of the adapter (when it learns), of every bias and of every route row.
        if routing:
            self.window_bytes = WINDOW_HEAD_BYTES + 4 * h * (2 * r + km) + 4 * km + _round_up(2 * km, 4)
        else:
            self.window_bytes = WINDOW_HEAD_BYTES + 8 * h * r
        self.entry_bytes = _round_up(self.window_bytes, LINE)
        scalars: list[tuple[str, Any]] = [
            ("generation", "<u8"),
            ("pending", "<u8"),
            ("trajectories_processed", "<u8"),
            ("signals_accumulated", "<u8"),
            ("flushes_performed", "<u8"),
            ("updates_applied", "<u8"),
            ("buffer_head", "<u8"),
            ("buffer_dropped", "<u8"),
            ("last_flush_at", "<f8"),
            ("corrupt", "<u8"),
            ("engine_id", "<u8"),
            ("paused", "<u8"),
            ("paused_at", "<f8"),
            ("pauses", "<u8"),
            ("paused_skipped", "<u8"),
            ("rollbacks", "<u8"),
            ("rolled_back_signals", "<u8"),
            ("last_rollback_at", "<f8"),
            ("rollback_checkpoint_at", "<f8"),
            ("moving_reward", "<f8"),
            ("moving_feedbacks", "<u8"),
            ("guard_trips", "<u8"),
            ("guard_level", "<f8"),
            ("guard_checkpoint_at", "<f8"),
            ("fleet_epoch", "<u8"),
            ("fleet_out_head", "<u8"),
            ("fleet_out_tail", "<u8"),
            ("fleet_cursor_ms", "<u8"),
            ("fleet_cursor_seq", "<u8"),
            ("fleet_entries", "<u8"),
            ("fleet_signals", "<u8"),
            ("fleet_lost_entries", "<u8"),
            ("fleet_lost_signals", "<u8"),
            ("fleet_bad_entries", "<u8"),
            ("fleet_resyncs", "<u8"),
            ("fleet_sealed_signals", "<u8"),
            ("fleet_applied_at", "<f8"),
            ("routes_used", "<u8"),
            ("routes_version", "<u8"),
            ("admin_request", "<u8"),
        ]
        arrays: list[tuple[str, Any]] = [
            ("route_names", (f"S{ROUTE_NAME_BYTES}", (km,))),  # first: the arrays start on a line, and so do its names
            ("down", ("<f4", (r, h))),
            ("up", ("<f4", (r, h))),
            ("grad_up", ("<f8", (r, h))),
            ("lane_tail", ("<u8", (config.lanes,))),
            ("route_chosen", ("<u8", (km,))),
            ("route_best", ("<u8", (km,))),
            ("route_reward", ("<f8", (km,))),
            ("route_vectors", ("<f4", (km, h))),
            ("route_bias", ("<f4", (km,))),
            ("work_up", ("<f4", (r if routing else 0, h))),
            ("work_down", ("<f4", (r if routing else 0, h))),
            ("work_vectors", ("<f4", (kw, h))),
            ("work_bias", ("<f4", (kw,))),
            ("route_centre", ("<f8", (hw,))),
            ("fleet_host", ("<u8", (m,))),
            ("fleet_host_seq", ("<u8", (m,))),
            ("fleet_host_cum", ("<u8", (m,))),
            ("route_state", ("u1", (km,))),  # last: bytes need no alignment
        ]
        offsets, at = [], 0
        for i, (_, fmt) in enumerate(scalars + arrays):
            if i == len(scalars):
                at = _round_up(at, LINE)  # the arrays start on their own line, after the scalars
            offsets.append(at)
            at += np.dtype(fmt).itemsize
        fields = scalars + arrays
        self.ledger_dtype = np.dtype(
            {"names": [n for n, _ in fields], "formats": [f for _, f in fields], "offsets": offsets, "itemsize": _round_up(at, LINE)}
        )
        self.ledger_bytes = self.ledger_dtype.itemsize
        self.ledger_offset = PAGE
        self.routes_offset = self.ledger_offset + 2 * self.ledger_bytes
        self.routes_bytes = _round_up(4 * km * h, LINE)
        self.admin_offset = self.routes_offset + self.routes_bytes
        self.admin_bytes = _round_up(ADMIN_VECTOR + 4 * h, LINE)  # every engine: pause, resume and rollback go through it
        self.fleet_offset = self.admin_offset + self.admin_bytes
        self.fleet_bytes = FLEET_BYTES if config.fleet_outbox else 0
        self.outbox_offset = _round_up(self.fleet_offset + self.fleet_bytes, PAGE) if config.fleet_outbox else self.fleet_offset
        self.lanes_offset = self.outbox_offset + config.fleet_outbox * self.entry_bytes
        self.slots_offset = _round_up(self.lanes_offset + config.lanes * LANE_CONTROL_BYTES, PAGE)
        self.buffer_offset = _round_up(self.slots_offset + config.lanes * config.lane_slots * self.slot_bytes, PAGE)
        self.total_bytes = _round_up(self.buffer_offset + config.capacity * self.slot_bytes, PAGE)
        #: Word indexes of every lane's control fields (``lane_words[lane].head``, ...).
        self.lane_words: tuple[LaneWords, ...] = tuple(_words(LaneWords, self.lane_control(i), _LANE_FIELDS) for i in range(config.lanes))
        #: Word indexes of the fleet region's lines (None without a fleet outbox).
        self.fleet_words: FleetWords | None = None
        if config.fleet_outbox:
            main, link = self.fleet_offset + FLEET_MAIN_LINE, self.fleet_offset + FLEET_LINK_LINE
            self.fleet_words = FleetWords(
                *(w // 8 for w in (main + FM_LAG, main + FM_PAUSED, main + FM_PAUSES)),
                *(w // 8 for w in (link + FK_CONNECTED, link + FK_CONTACT_AT, link + FK_PUBLISHED, link + FK_ERROR_AT)),
            )
        ledger_fields = self.ledger_dtype.fields
        assert ledger_fields is not None  # a structured dtype
        #: Word index of each ledger copy's ``generation`` and of its ``lane_tail[0]`` (the fields readers take one at a time).
        self.generation_words = tuple(self.ledger_copy(i) // 8 + ledger_fields["generation"][1] // 8 for i in (0, 1))
        self.lane_tail_words = tuple(self.ledger_copy(i) // 8 + ledger_fields["lane_tail"][1] // 8 for i in (0, 1))
        #: ... and of its ``routes_used``, which only grows: a producer reads it alone (of either copy: any value read is
        #: one the engine had once, so a route index below it names a route) to refuse a route index above it.
        self.routes_used_words = tuple(self.ledger_copy(i) // 8 + ledger_fields["routes_used"][1] // 8 for i in (0, 1))

    @functools.cached_property
    def geometry(self) -> Any:
        """The slot and lane geometry as the C twin takes it (``_speedups.Geometry``), or None without the C module."""
        if _speedups is None:
            return None
        return _speedups.Geometry(
            hidden_dim=self.hidden_dim,
            rank=self.rank,
            max_steps=self.max_steps,
            attention_dim=self.attention_dim,
            lanes=self.lanes,
            lane_slots=self.lane_slots,
            slot_bytes=self.slot_bytes,
            payload_offset=self.payload_offset,
            route_offset=self.route_offset,
            step_bytes=self.step_bytes,
            routes=self.max_routes,
            lanes_offset=self.lanes_offset,
            slots_offset=self.slots_offset,
            unit_reward=self.config.rule == "routing",
            routes_used_offset0=8 * self.routes_used_words[0] if self.max_routes else 0,
            routes_used_offset1=8 * self.routes_used_words[1] if self.max_routes else 0,
        )

    def prefix_bytes(self, n_steps: int) -> int:
        """Bytes at the start of a slot that a trajectory with ``n_steps`` steps uses."""
        return self.payload_offset + 4 * self.hidden_dim + n_steps * self.step_bytes

    def lane_control(self, lane: int) -> int:
        return self.lanes_offset + lane * LANE_CONTROL_BYTES

    def lane_slot(self, lane: int, index: int) -> int:
        return self.slots_offset + (lane * self.lane_slots + index % self.lane_slots) * self.slot_bytes

    def ledger_copy(self, which: int) -> int:
        return self.ledger_offset + which * self.ledger_bytes

    def outbox_entry(self, seq: int) -> int:
        """Byte offset of the outbox entry that holds own sealed window ``seq`` (1-based)."""
        return self.outbox_offset + ((seq - 1) % self.fleet_outbox) * self.entry_bytes

    def pack_header(self) -> bytes:
        """The header with ``magic`` zeroed; the creator stores the magic last."""
        c = self.config
        return struct.pack(
            HEADER_FORMAT,
            b"\0" * 8,
            LAYOUT_VERSION,
            HEADER_BYTES,
            self.total_bytes,
            c.hidden_dim,
            c.rank,
            c.max_steps,
            c.attention_dim,
            c.lanes,
            c.lane_slots,
            c.capacity,
            self.slot_bytes,
            c.lr,
            c.flush_threshold,
            self.ledger_offset,
            self.lanes_offset,
            self.slots_offset,
            self.buffer_offset,
            time.time(),
            RULES.index(c.rule),
            c.routes,
            c.temperature,
            self.routes_offset,
            self.fleet_offset,
            self.outbox_offset,
            c.fleet_outbox,
            self.fleet_hosts,
            c.adapter_lr,
            c.max_routes,
        )

    @classmethod
    def from_header(cls, raw: bytes, name: str, size: int) -> Layout:
        """Parse and validate a header read from segment ``name`` of ``size`` bytes."""
        if len(raw) < HEADER_BYTES:
            raise LayoutMismatchError(f"segment {name!r}: {len(raw)} bytes is too small for a sona_shm header")
        (
            magic,
            version,
            header_bytes,
            total,
            h,
            r,
            s,
            a,
            lanes,
            lane_slots,
            cap,
            slot_bytes,
            lr,
            thr,
            ledger_off,
            lanes_off,
            slots_off,
            buffer_off,
            _created,
            rule,
            routes,
            temperature,
            routes_off,
            fleet_off,
            outbox_off,
            outbox,
            fleet_hosts,
            adapter_lr,
            max_routes,
        ) = struct.unpack_from(HEADER_FORMAT, raw)
        if magic != MAGIC:
            raise LayoutMismatchError(
                f"segment {name!r}: not a sona_shm segment (magic {magic!r}, expected {MAGIC!r}); "
                f"remove it with `sona-shm destroy --name {name}`"
            )
        if version != LAYOUT_VERSION:
            raise LayoutMismatchError(
                f"segment {name!r}: layout version {version}, this sona_shm reads version {LAYOUT_VERSION}; "
                f"stop its processes and remove it with `sona-shm destroy --name {name}`"
            )
        try:
            if rule >= len(RULES):
                raise InvalidInputError(f"rule: expected a code below {len(RULES)}, got {rule}")
            config = EngineConfig(
                h, r, lr, thr, cap, s, a, lanes, lane_slots, RULES[rule], routes, temperature, outbox, max_routes, adapter_lr
            )
            if config.max_routes != max_routes:
                raise InvalidInputError(f"max_routes: expected {config.max_routes} for {routes} routes, got {max_routes}")
            layout = cls(config)
        except InvalidInputError as exc:
            raise LayoutMismatchError(f"segment {name!r}: corrupt header ({exc})") from None
        derived = (
            HEADER_BYTES,
            layout.total_bytes,
            layout.slot_bytes,
            layout.ledger_offset,
            layout.lanes_offset,
            layout.slots_offset,
            layout.buffer_offset,
            layout.routes_offset,
            layout.fleet_offset,
            layout.outbox_offset,
            layout.fleet_hosts,
        )
        stored = (
            header_bytes,
            total,
            slot_bytes,
            ledger_off,
            lanes_off,
            slots_off,
            buffer_off,
            routes_off,
            fleet_off,
            outbox_off,
            fleet_hosts,
        )
        if derived != stored:
            raise LayoutMismatchError(f"segment {name!r}: header offsets {stored} disagree with its dimensions {derived}")
        if size < total:
            raise LayoutMismatchError(f"segment {name!r}: {size} bytes, its header says {total}; it was truncated")
        return layout

    def differences(self, wanted: Mapping[str, Any]) -> list[str]:
        """``field: segment has X, requested Y`` for every field of ``wanted`` this segment differs in."""
        return [f"{k}: segment has {getattr(self.config, k)!r}, requested {v!r}" for k, v in wanted.items() if getattr(self.config, k) != v]

    def describe_size(self) -> str:
        """One line for humans: the size reserved and what it holds."""
        return f"{self.total_bytes / 2**20:.1f} MiB reserved ({self.describe_contents()})"

    def describe_contents(self) -> str:
        """What the segment's size is made of, for humans."""
        return f"{self.lanes} lanes x {self.lane_slots} slots + {self.capacity} buffer slots, {self.slot_bytes} B per slot" + (
            f"; fleet outbox {self.fleet_outbox} x {self.entry_bytes} B" if self.fleet_outbox else ""
        )


def read_fleet_identity(buf: Any, layout: Layout) -> tuple[str, str]:
    """``(host id, fleet key)`` stored in the fleet region's identity (``""`` when not written yet)."""
    at = layout.fleet_offset + FLEET_IDENTITY
    host_len, key_len = struct.unpack_from("<HH", buf, at + FI_HOST_LEN)
    host = bytes(buf[at + FI_HOST : at + FI_HOST + min(host_len, FLEET_HOST_BYTES)]).decode("utf-8", "replace")
    key = bytes(buf[at + FI_KEY : at + FI_KEY + min(key_len, FLEET_KEY_BYTES)]).decode("utf-8", "replace")
    return host, key


def write_fleet_identity(buf: Any, layout: Layout, host: str, key: str) -> None:
    """Store the host id and fleet key in the fleet region's identity (only before the segment is bound to a fleet)."""
    at = layout.fleet_offset + FLEET_IDENTITY
    host_bytes, key_bytes = host.encode("utf-8"), key.encode("utf-8")
    buf[at + FI_HOST : at + FI_HOST + FLEET_HOST_BYTES] = bytes(FLEET_HOST_BYTES)
    buf[at + FI_KEY : at + FI_KEY + FLEET_KEY_BYTES] = bytes(FLEET_KEY_BYTES)
    buf[at + FI_HOST : at + FI_HOST + len(host_bytes)] = host_bytes
    buf[at + FI_KEY : at + FI_KEY + len(key_bytes)] = key_bytes
    struct.pack_into("<HH", buf, at + FI_HOST_LEN, len(host_bytes), len(key_bytes))


def fleet_token(buf: Any, layout: Layout, new: bytes) -> bytes:
    """The segment's fleet token (its lease on a host id is this token's); ``new`` is stored first if there is none yet."""
    at = layout.fleet_offset + FLEET_IDENTITY + FI_TOKEN
    token = bytes(buf[at : at + FLEET_TOKEN_BYTES])
    if token == bytes(FLEET_TOKEN_BYTES):
        buf[at : at + FLEET_TOKEN_BYTES] = new
        token = new
    return token


def default_fleet_outbox(config: EngineConfig) -> int:
    """The outbox entries an engine of ``config`` gets when created for a fleet without ``--fleet-outbox``:
    :data:`~sona_shm.config.DEFAULT_FLEET_OUTBOX`, or fewer so that they take at most
    :data:`~sona_shm.config.DEFAULT_FLEET_OUTBOX_BYTES` (and at least 256)."""
    entry = Layout(dataclasses.replace(config, fleet_outbox=1)).entry_bytes
    return max(256, min(DEFAULT_FLEET_OUTBOX, DEFAULT_FLEET_OUTBOX_BYTES // entry))


def given_vectors(buffer: Any, layout: Layout) -> np.ndarray:
    """``float32[max_routes, h]``: a view of the route region of a segment's ``buffer`` — each route's vector as
    it was given (see "Route vectors as given": row ``k`` is written once, before ``routes_used`` passes ``k``)."""
    return np.ndarray((layout.max_routes, layout.hidden_dim), dtype=np.float32, buffer=buffer, offset=layout.routes_offset)
