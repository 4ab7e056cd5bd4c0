"""A sealed window: its bytes (in the fleet outbox and in the stream) and the one arithmetic that applies it.

In fleet mode a flush point does not apply the gradient sums to the adapter; it *seals*
them: the window's ``G_U`` (and ``G_D`` under the routing rule) as float64, its signal
count ``n``, the host's sequence number and running signal total. Every replica applies
every window with :func:`apply_window`, the arithmetic of
:meth:`sona_shm.learning.Learner.flush` (and of ``apply_row`` in ``_speedups.c``)::

    U = f32(clip(f64(U) + G_U * (lr / n), -FLT_MAX, FLT_MAX))     (D likewise, routing rule)

so replicas that apply the same windows in the same order hold the same bits, and a
single host holds the bits it would have held without a fleet.

The byte form (``WINDOW_HEAD_BYTES`` of header, then the rows; :mod:`sona_shm.shm.layout`,
"Outbox entry", writes it down) is the same in the outbox entry and in the stream
entry's ``w`` field, so publishing copies bytes and nothing is re-encoded. Under the
reference rule every rank row of ``G_U`` is the same signal sum; such a window carries
one row (``up_rows`` 1), which is applied to every row.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import InternalSignal
from ..learn.learner import apply_sums
from ..native import speedups as _speedups
from ..shm.layout import WINDOW_HEAD_BYTES

WINDOW_MAGIC = b"SFW1"
#: magic, hidden_dim, rank, up_rows, down_rows, seq, n, cum, sealed_at (then zero up to WINDOW_HEAD_BYTES).
_HEAD = struct.Struct("<4sIIHHQQQd")
_LENGTHS = struct.Struct("<4sIIHH")  # the head's first fields: enough to know a window's length


class BadWindow(InternalSignal):
    """Bytes that are not a sealed window of this fleet's shape (written outside sona_shm)."""


@dataclass(frozen=True)
class Window:
    """One sealed window.

    ``grad_up``: ``float64[up_rows, h]`` (``up_rows`` 1 or R); ``grad_down``:
    ``float64[R, h]`` under the routing rule, else None. ``n`` >= 1 signals; ``cum``: the
    signals its host had sealed up to and including this window; ``sealed_at``: unix
    time on the host's clock.
    """

    seq: int
    n: int
    cum: int
    sealed_at: float
    grad_up: np.ndarray
    grad_down: np.ndarray | None


def write_window(
    out: np.ndarray, *, seq: int, n: int, cum: int, sealed_at: float, grad_up: np.ndarray, grad_down: np.ndarray | None
) -> int:
    """Encode a window into ``out`` (``uint8[>= window bytes]``, e.g. an outbox entry); return its length.

    ``grad_up``/``grad_down``: the flusher's ``float64[R, h]`` sums. Rows of ``grad_up``
    that are all the same bits (the reference rule's) are written once.
    """
    if _speedups is not None and _c_form(grad_up) and (grad_down is None or _c_form(grad_down)):
        return _speedups.write_window(out, grad_up, grad_down, seq, n, cum, sealed_at)  # the same bytes, in one call
    return _write_window(out, seq=seq, n=n, cum=cum, sealed_at=sealed_at, grad_up=grad_up, grad_down=grad_down)


def _c_form(a: np.ndarray) -> bool:
    flags = a.flags
    return bool(flags.c_contiguous and flags.writeable and a.dtype == np.float64 and a.ndim == 2)


def _write_window(
    out: np.ndarray, *, seq: int, n: int, cum: int, sealed_at: float, grad_up: np.ndarray, grad_down: np.ndarray | None
) -> int:
    """:func:`write_window` in numpy (the C one writes the same bytes)."""
    rank, hidden = grad_up.shape
    bits = grad_up.view(np.uint64)
    up_rows = 1 if rank > 1 and (bits[0] == bits[1:]).all() else rank
    down_rows = 0 if grad_down is None else grad_down.shape[0]
    size = WINDOW_HEAD_BYTES + 8 * hidden * (up_rows + down_rows)
    _HEAD.pack_into(out.data, 0, WINDOW_MAGIC, hidden, rank, up_rows, down_rows, seq, n, cum, sealed_at)
    out[_HEAD.size : WINDOW_HEAD_BYTES] = 0
    values = out[WINDOW_HEAD_BYTES:size].view(np.float64)
    values[: up_rows * hidden] = grad_up[:up_rows].reshape(-1)
    if grad_down is not None:
        values[up_rows * hidden :] = grad_down.reshape(-1)
    return size


def window_length(raw: bytes | memoryview | np.ndarray) -> int:
    """The length of the window at the start of ``raw`` (an outbox entry), from its header."""
    _, hidden, _, up_rows, down_rows, *_ = _HEAD.unpack_from(bytes(raw[: _HEAD.size]))
    return WINDOW_HEAD_BYTES + 8 * hidden * (up_rows + down_rows)


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
        _, hidden, _, up_rows, down_rows = _LENGTHS.unpack_from(view, at)
        end = at + WINDOW_HEAD_BYTES + 8 * hidden * (up_rows + down_rows)
        if end > size:
            return None
        out.append(view[at:end])
        at = end
    return out if at == size else None


def read_window(raw: bytes | memoryview, *, hidden_dim: int, rank: int, routing: bool) -> Window:
    """Decode and check a window for a fleet of ``hidden_dim``, ``rank`` and rule; :class:`BadWindow` if it is not one.

    Checked: the length, magic, shape, ``n >= 1``, ``cum >= n`` and that every value is
    finite. The arrays are read-only views of ``raw``.
    """
    size = len(raw)
    if size < WINDOW_HEAD_BYTES:
        raise BadWindow(f"window: expected at least {WINDOW_HEAD_BYTES} bytes, got {size}")
    magic, hidden, r, up_rows, down_rows, seq, n, cum, sealed_at = _HEAD.unpack_from(raw)
    if magic != WINDOW_MAGIC:
        raise BadWindow(f"window: magic {magic!r}, expected {WINDOW_MAGIC!r}")
    want_down = rank if routing else 0
    if hidden != hidden_dim or r != rank or up_rows not in (1, rank) or down_rows != want_down:
        raise BadWindow(
            f"window: shape hidden_dim {hidden}, rank {r}, rows {up_rows}+{down_rows}; "
            f"expected hidden_dim {hidden_dim}, rank {rank}, rows 1 or {rank} + {want_down}"
        )
    expected = WINDOW_HEAD_BYTES + 8 * hidden * (up_rows + down_rows)
    if size != expected:
        raise BadWindow(f"window: {size} bytes, its header says {expected}")
    if n < 1 or cum < n:
        raise BadWindow(f"window: n {n}, cum {cum}; expected n >= 1 and cum >= n")
    values = np.frombuffer(raw, np.float64, offset=WINDOW_HEAD_BYTES)
    if not np.isfinite(values).all() or not np.isfinite(sealed_at):
        raise BadWindow("window: a gradient sum or its time is not finite")
    grad_up = values[: up_rows * hidden].reshape(up_rows, hidden)
    grad_down = values[up_rows * hidden :].reshape(down_rows, hidden) if down_rows else None
    return Window(seq, n, cum, sealed_at, grad_up, grad_down)


def apply_window(up: np.ndarray, down: np.ndarray, window: Window, lr: float) -> None:
    """Apply ``window`` to ``up`` (and ``down``, when it carries ``grad_down``), in place: ``float32[R, h]``.

    The arithmetic of ``Learner.flush()``: ``f32(clip(f64(x) + g * (lr / n)))`` element by
    element, no fused multiply-add, so every replica and the single-host engine agree bit
    for bit.
    """
    apply_sums(up, down, window.grad_up, window.grad_down, lr / window.n)


__all__ = ["WINDOW_MAGIC", "BadWindow", "Window", "apply_window", "read_window", "split_windows", "window_length", "write_window"]
