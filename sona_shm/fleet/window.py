"""A sealed window: its bytes (in the fleet outbox and in the stream) and the one arithmetic that applies it.

In fleet mode a closed window is not applied to the host's published state; it is *sealed*:
what the window learned, its signal count ``n``, the host's sequence number and running
signal total. Every replica applies every window with :func:`apply_sealed`, the arithmetic
the learner applies its own windows with (:meth:`sona_shm.learn.learner.Learner.apply`), so
replicas that apply the same windows in the same order hold the same bits, and a single
host holds the bits it would have held without a fleet. One form per rule:

- ``SFW1``, the reference rule: the window's gradient sums ``G_U`` (float64), applied as
  ``U = f32(clip(f64(U) + G_U * (lr / n)))`` (``apply_sums``; ``apply_row`` in
  ``_speedups.c``). Every rank row of the reference rule's ``G_U`` is the same signal sum:
  such a window carries one row (``up_rows`` 1), applied to every row.
- ``SFW2``, the routing rule: float32 deltas ``working - published`` of what the window
  learned — the adapter when it learns (``adapter_lr > 0``), the bias of every route in
  use, and only the route rows the window touched — applied as ``x = f32(clip(f64(x) +
  f64(delta)))`` (``apply_deltas``).

The byte form is the same in the outbox entry and in the stream entry's ``w`` field, so
publishing copies bytes and nothing is re-encoded. :mod:`sona_shm.shm.layout` ("Outbox
entry") writes it down; in short, after the 64-byte head (``magic``, ``hidden_dim`` u32,
``rank`` u32, ``up_rows`` u16, ``down_rows`` u16, ``seq``, ``n``, ``cum`` u64,
``sealed_at`` f64, and in ``SFW2`` ``routes`` u16 and ``rows`` u16 at bytes 48 and 50)::

    SFW1   f64 grad_up[up_rows, h]
    SFW2   f32 up[up_rows, h], f32 down[down_rows, h], f32 bias[routes], u16 row[rows] (padded to 4 bytes),
           f32 vectors[rows, h]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import InternalSignal
from ..learn.learner import DeltaWindow, Window, apply_deltas, apply_sums
from ..native import speedups as _speedups
from ..shm.layout import WINDOW_HEAD_BYTES

SUMS_MAGIC = b"SFW1"
DELTAS_MAGIC = b"SFW2"
#: magic, hidden_dim, rank, up_rows, down_rows, seq, n, cum, sealed_at (then SFW2's routes and rows, then zero).
_HEAD = struct.Struct("<4sIIHHQQQd")
_ROUTES = struct.Struct("<HH")  # SFW2: routes (biases carried), rows (route rows carried), at byte _HEAD.size
_LENGTHS = struct.Struct("<4sIIHH")  # the head's first fields: with _ROUTES, enough to know a window's length


class BadWindow(InternalSignal):
    """Bytes that are not a sealed window of this fleet's shape (written outside sona_shm)."""


@dataclass(frozen=True)
class SealedWindow:
    """One sealed window: ``seq`` (its host's), ``n`` >= 1 signals, ``cum`` (the signals its host had sealed up to
    and including this one), ``sealed_at`` (unix time, the host's clock) and what it learned: the reference rule's
    :class:`~sona_shm.learn.learner.Window` or the routing rule's :class:`~sona_shm.learn.learner.DeltaWindow`
    (arrays are read-only views of the bytes)."""

    seq: int
    n: int
    cum: int
    sealed_at: float
    window: Window | DeltaWindow


def _row_bytes(rows: int) -> int:
    return -(-2 * rows // 4) * 4


def _length(magic: bytes, hidden: int, up_rows: int, down_rows: int, routes: int, rows: int) -> int:
    if magic == SUMS_MAGIC:
        return WINDOW_HEAD_BYTES + 8 * hidden * up_rows
    return WINDOW_HEAD_BYTES + 4 * hidden * (up_rows + down_rows + rows) + 4 * routes + _row_bytes(rows)


def max_window_bytes(hidden_dim: int, rank: int, max_routes: int, routing: bool) -> int:
    """The largest window an engine seals: every route row touched, and the adapter (routing rule)."""
    if routing:
        return _length(DELTAS_MAGIC, hidden_dim, rank, rank, max_routes, max_routes)
    return _length(SUMS_MAGIC, hidden_dim, rank, 0, 0, 0)


def write_window(out: np.ndarray, window: Window | DeltaWindow, *, rank: int, seq: int, cum: int, sealed_at: float) -> int:
    """Encode ``window`` (as the learner of a rank-``rank`` engine closed it) into ``out`` (``uint8[>= its bytes]``,
    e.g. an outbox entry); return its length. A reference window's rows that are all the same bits are written once."""
    if isinstance(window, Window):
        grad_up = window.grad_up
        if _speedups is not None and grad_up.flags.c_contiguous and grad_up.dtype == np.float64 and grad_up.ndim == 2:
            return _speedups.write_window(out, grad_up, seq, window.n, cum, sealed_at)  # the same bytes, in one call
        return _write_sums(out, grad_up, seq=seq, n=window.n, cum=cum, sealed_at=sealed_at)
    return _write_deltas(out, window, rank=rank, seq=seq, cum=cum, sealed_at=sealed_at)


def _write_sums(out: np.ndarray, grad_up: np.ndarray, *, seq: int, n: int, cum: int, sealed_at: float) -> int:
    """An SFW1 window in numpy (the C ``write_window`` writes the same bytes)."""
    rank, hidden = grad_up.shape
    bits = grad_up.view(np.uint64)
    up_rows = 1 if rank > 1 and (bits[0] == bits[1:]).all() else rank
    size = _length(SUMS_MAGIC, hidden, up_rows, 0, 0, 0)
    _HEAD.pack_into(out.data, 0, SUMS_MAGIC, hidden, rank, up_rows, 0, seq, n, cum, sealed_at)
    out[_HEAD.size : WINDOW_HEAD_BYTES] = 0
    out[WINDOW_HEAD_BYTES:size].view(np.float64)[:] = grad_up[:up_rows].reshape(-1)
    return size


def _write_deltas(out: np.ndarray, window: DeltaWindow, *, rank: int, seq: int, cum: int, sealed_at: float) -> int:
    routes, rows = len(window.bias), len(window.rows)
    hidden = window.vectors.shape[1]
    adapter_rows = 0 if window.up is None else rank
    size = _length(DELTAS_MAGIC, hidden, adapter_rows, adapter_rows, routes, rows)
    _HEAD.pack_into(out.data, 0, DELTAS_MAGIC, hidden, rank, adapter_rows, adapter_rows, seq, window.n, cum, sealed_at)
    _ROUTES.pack_into(out.data, _HEAD.size, routes, rows)
    out[_HEAD.size + _ROUTES.size : WINDOW_HEAD_BYTES] = 0
    at = WINDOW_HEAD_BYTES
    for part in (window.up, window.down):
        if part is not None:
            out[at : at + part.nbytes] = part.astype("<f4").view(np.uint8).reshape(-1)
            at += part.nbytes
    out[at : at + 4 * routes] = window.bias.astype("<f4").view(np.uint8)
    at += 4 * routes
    row_bytes = _row_bytes(rows)
    out[at : at + row_bytes] = 0
    out[at : at + 2 * rows] = window.rows.astype("<u2").view(np.uint8)
    at += row_bytes
    out[at:size] = np.ascontiguousarray(window.vectors, dtype="<f4").view(np.uint8).reshape(-1)
    return size


def window_length(raw: bytes | memoryview | np.ndarray) -> int:
    """The length of the window at the start of ``raw`` (an outbox entry), from its header."""
    head = bytes(raw[:WINDOW_HEAD_BYTES])
    magic, hidden, _, up_rows, down_rows = _LENGTHS.unpack_from(head)
    routes, rows = _ROUTES.unpack_from(head, _HEAD.size)
    return _length(magic, hidden, up_rows, down_rows, routes, rows)


def split_windows(raw: bytes | memoryview, count: int) -> list[memoryview] | None:
    """The ``count`` windows laid back to back in ``raw`` (a stream entry's ``w``), as views; None if they do not tile it.

    Only the lengths are read here (from each header); :func:`read_window` (or the C
    ``apply_window``) checks each window whole.
    """
    view = memoryview(raw)
    size = len(view)
    out = []
    at = 0
    for _ in range(count):
        if size - at < WINDOW_HEAD_BYTES:
            return None
        magic, hidden, _, up_rows, down_rows = _LENGTHS.unpack_from(view, at)
        if magic not in (SUMS_MAGIC, DELTAS_MAGIC):
            return None
        routes, rows = _ROUTES.unpack_from(view, at + _HEAD.size)
        end = at + _length(magic, hidden, up_rows, down_rows, routes, rows)
        if end > size:
            return None
        out.append(view[at:end])
        at = end
    return out if at == size else None


def read_window(raw: bytes | memoryview, *, hidden_dim: int, rank: int, routing: bool, max_routes: int = 0) -> SealedWindow:
    """Decode and check a window for a fleet of ``hidden_dim``, ``rank`` and rule (``max_routes``: the routing
    rule's); :class:`BadWindow` if it is not one.

    Checked: the length, magic, shape, ``n >= 1``, ``cum >= n``, that every value is finite and (SFW2) that the
    route rows are distinct, ascending and below the routes carried, at most ``max_routes``.
    """
    size = len(raw)
    if size < WINDOW_HEAD_BYTES:
        raise BadWindow(f"window: expected at least {WINDOW_HEAD_BYTES} bytes, got {size}")
    magic, hidden, r, up_rows, down_rows, seq, n, cum, sealed_at = _HEAD.unpack_from(raw)
    routes, rows = _ROUTES.unpack_from(raw, _HEAD.size)
    want = DELTAS_MAGIC if routing else SUMS_MAGIC
    if magic != want:
        raise BadWindow(f"window: magic {magic!r}, expected {want!r}")
    if routing:
        shape_ok = up_rows == down_rows and up_rows in (0, rank) and routes <= max_routes and rows <= routes
        expected_shape = f"rows 0 or {rank} + the same, at most {max_routes} routes"
    else:
        shape_ok = up_rows in (1, rank) and down_rows == 0
        expected_shape = f"rows 1 or {rank} + 0"
    if hidden != hidden_dim or r != rank or not shape_ok:
        raise BadWindow(
            f"window: shape hidden_dim {hidden}, rank {r}, rows {up_rows}+{down_rows}, routes {routes}, route rows {rows}; "
            f"expected hidden_dim {hidden_dim}, rank {rank}, {expected_shape}"
        )
    expected = _length(magic, hidden, up_rows, down_rows, routes, rows)
    if size != expected:
        raise BadWindow(f"window: {size} bytes, its header says {expected}")
    if n < 1 or cum < n:
        raise BadWindow(f"window: n {n}, cum {cum}; expected n >= 1 and cum >= n")
    if not np.isfinite(sealed_at):
        raise BadWindow("window: its time is not finite")
    if not routing:
        values = np.frombuffer(raw, np.float64, offset=WINDOW_HEAD_BYTES)
        if not np.isfinite(values).all():
            raise BadWindow("window: a gradient sum is not finite")
        return SealedWindow(seq, n, cum, sealed_at, Window(values.reshape(up_rows, hidden), n))
    at = WINDOW_HEAD_BYTES
    adapter = np.frombuffer(raw, "<f4", 2 * up_rows * hidden, at).reshape(2 * up_rows, hidden)
    at += adapter.nbytes
    bias = np.frombuffer(raw, "<f4", routes, at)
    at += 4 * routes
    index = np.frombuffer(raw, "<u2", rows, at).astype(np.int64)
    at += _row_bytes(rows)
    vectors = np.frombuffer(raw, "<f4", rows * hidden, at).reshape(rows, hidden)
    if not (np.isfinite(adapter).all() and np.isfinite(bias).all() and np.isfinite(vectors).all()):
        raise BadWindow("window: a delta is not finite")
    if rows and not (index[-1] < routes and (np.diff(index) > 0).all()):
        raise BadWindow(f"window: route rows {index.tolist()[:8]}...; expected distinct, ascending, below {routes}")
    up, down = (adapter[:up_rows], adapter[up_rows:]) if up_rows else (None, None)
    return SealedWindow(seq, n, cum, sealed_at, DeltaWindow(up, down, bias, index, vectors, n))


def apply_sealed(up: np.ndarray, down: np.ndarray, vectors: np.ndarray, bias: np.ndarray, sealed: SealedWindow, lr: float) -> None:
    """Apply a sealed window to a replica's published state, in place: the adapter (``float32[R, h]``) and, under the
    routing rule, the route table (``float32[Km, h]``, ``float32[Km]``). The learner's own arithmetic, so every
    replica and the single-host engine agree bit for bit."""
    window = sealed.window
    if isinstance(window, Window):
        apply_sums(up, down, window.grad_up, None, lr / window.n)
    else:
        apply_deltas(up, down, vectors, bias, window)


__all__ = [
    "DELTAS_MAGIC",
    "SUMS_MAGIC",
    "BadWindow",
    "SealedWindow",
    "apply_sealed",
    "max_window_bytes",
    "read_window",
    "split_windows",
    "window_length",
    "write_window",
]
