"""The admin mailbox: one request at a time from whoever changes an engine to its flusher; and the flusher's settings.

Layout and protocol are in :mod:`sona_shm.shm.layout` ("Admin mailbox"). A requester holds
the admin lock while its request is open; it writes the fields, then bumps ``request`` and
rings the doorbell. The flusher reads an open request (``request > answered``) between two
scans, applies it with one ledger commit that also records ``admin_request = request``,
then writes the reply and ``answered``. The requests: a route added, renamed or retired;
learning paused or resumed; the learned state rolled back to a checkpoint.

The same region holds the flusher's settings (:class:`Settings`): where it keeps its
checkpoints and how it guards the reward, written by the flusher when it starts, read by
the commands that list or roll back to checkpoints and by monitors.

This module is the region's bytes; what a request does to an engine is
:mod:`sona_shm.engine.admin` (and :mod:`sona_shm.engine.routes` for the route table).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import TornRead
from ..trajectory import ROUTE_MAX_BYTES
from .layout import (
    ADMIN_ANSWERED,
    ADMIN_DISCARDED,
    ADMIN_GENERATION,
    ADMIN_INDEX,
    ADMIN_MESSAGE,
    ADMIN_MESSAGE_BYTES,
    ADMIN_NAME,
    ADMIN_OP,
    ADMIN_PATH,
    ADMIN_PATH_BYTES,
    ADMIN_REQUEST,
    ADMIN_ROUTE,
    ADMIN_SETTINGS,
    ADMIN_STATUS,
    ADMIN_VECTOR,
    OP_ADD,
    OP_PAUSE,
    OP_RENAME,
    OP_RESUME,
    OP_RETIRE,
    OP_ROLLBACK,
    SET_GUARD_DROP,
    SET_GUARD_ROLLBACK,
    SET_GUARD_WINDOW,
    SET_INTERVAL,
    SET_KEEP,
    SET_PATH,
    SET_PID,
    SET_SEQ,
    STATUS_DONE,
    STATUS_REFUSED,
)
from .segment import Segment

#: The operations by name, as the command line and the API call them.
OPERATIONS = {"add": OP_ADD, "rename": OP_RENAME, "retire": OP_RETIRE, "pause": OP_PAUSE, "resume": OP_RESUME, "rollback": OP_ROLLBACK}
#: The operations that change the route table (engine/routes.py).
ROUTE_OPERATIONS = ("add", "rename", "retire")
_OP_NAMES = {code: name for name, code in OPERATIONS.items()}
#: Reader retries of the settings block before giving up (the flusher rewrites it only when it starts).
SETTINGS_RETRIES = 1000


@dataclass(frozen=True)
class Request:
    """An open request: ``op`` (:data:`OPERATIONS`), the ``route`` it changes (its index; -1 when none), the
    ``name`` (add: the new route's; rename: the new one), the ``vector`` as given (add; else None), the
    checkpoint ``path`` (rollback; else "")."""

    id: int
    op: str
    route: int
    name: str
    vector: np.ndarray | None
    path: str = ""


@dataclass(frozen=True)
class Reply:
    """The answer to a request: ``done`` (else refused: ``message`` says why), the route's ``index`` (route
    changes), the weights ``generation`` after it and, for a rollback, the signals whose learning it ``discarded``."""

    done: bool
    index: int
    message: str
    generation: int
    discarded: int


class Mailbox:
    """Views over a segment's admin mailbox."""

    def __init__(self, segment: Segment) -> None:
        layout = segment.layout
        at = layout.admin_offset
        self._u64 = segment.u64
        self._request, self._answered = (at + ADMIN_REQUEST) // 8, (at + ADMIN_ANSWERED) // 8
        self._generation, self._discarded = (at + ADMIN_GENERATION) // 8, (at + ADMIN_DISCARDED) // 8
        buf = segment.numpy_buffer()
        self._u32 = np.ndarray((4,), dtype="<u4", buffer=buf, offset=at + ADMIN_OP)  # op, route, status, index
        self._name = np.ndarray((ROUTE_MAX_BYTES,), dtype=np.uint8, buffer=buf, offset=at + ADMIN_NAME)
        self._message = np.ndarray((ADMIN_MESSAGE_BYTES,), dtype=np.uint8, buffer=buf, offset=at + ADMIN_MESSAGE)
        self._path = np.ndarray((ADMIN_PATH_BYTES,), dtype=np.uint8, buffer=buf, offset=at + ADMIN_PATH)
        self._vector = np.ndarray((layout.hidden_dim,), dtype="<f4", buffer=buf, offset=at + ADMIN_VECTOR)
        assert ADMIN_ROUTE == ADMIN_OP + 4 and ADMIN_STATUS == ADMIN_OP + 8 and ADMIN_INDEX == ADMIN_OP + 12

    @property
    def request(self) -> int:
        return int(self._u64[self._request])

    @property
    def answered(self) -> int:
        return int(self._u64[self._answered])

    # ----------------------------------------------------------------- the requester (holding the admin lock)

    def post(self, op: str, route: int = -1, name: str = "", vector: np.ndarray | None = None, path: str = "") -> int:
        """Write a request and open it (the store of ``request`` last); its id."""
        self._u32[0], self._u32[1] = OPERATIONS[op], max(route, 0)
        _store_text(self._name, name)
        _store_text(self._path, path)
        if vector is not None:
            self._vector[...] = vector
        request = self.answered + 1
        self._u64[self._request] = request  # opens it: the flusher reads the fields above only after this
        return request

    def reply(self) -> Reply:
        """The answer to the last request answered."""
        return Reply(
            int(self._u32[2]) == STATUS_DONE,
            int(self._u32[3]),
            _load_text(self._message),
            int(self._u64[self._generation]),
            int(self._u64[self._discarded]),
        )

    # ----------------------------------------------------------------- the flusher

    def open_request(self) -> Request | None:
        """The open request, if any (read only by the flusher, which alone answers)."""
        request = self.request
        if request <= self.answered:
            return None
        op = _OP_NAMES.get(int(self._u32[0]), "")
        vector = self._vector.copy() if op == "add" else None
        route = int(self._u32[1]) if op in ("rename", "retire") else -1
        return Request(request, op, route, _load_text(self._name), vector, _load_text(self._path) if op == "rollback" else "")

    def answer(self, request: int, done: bool, index: int = 0, message: str = "", generation: int = 0, discarded: int = 0) -> None:
        """Write the reply to ``request``, then ``answered`` (the store the requester waits for)."""
        self._u32[2], self._u32[3] = STATUS_DONE if done else STATUS_REFUSED, max(index, 0)
        self._u64[self._generation], self._u64[self._discarded] = generation, discarded
        _store_text(self._message, message)
        self._u64[self._answered] = request

    def close(self) -> None:
        for name in ("_u32", "_name", "_message", "_path", "_vector"):
            self.__dict__.pop(name, None)


@dataclass(frozen=True)
class Settings:
    """How the engine's (last) flusher keeps checkpoints and guards the reward, as it wrote them when it started.

    ``checkpoint``: the checkpoint path ("" without one); ``keep``: timestamped checkpoints kept beside it (0: the
    file alone); ``interval``: seconds between periodic checkpoints; ``guard_drop``: the reward guard's DROP (0: no
    guard); ``guard_window``: N, the feedbacks of the moving reward; ``guard_rollback``: the guard rolls back too;
    ``pid``: the flusher that wrote them (0: no flusher ever did).
    """

    checkpoint: str = ""
    keep: int = 0
    interval: float = 0.0
    guard_drop: float = 0.0
    guard_window: int = 0
    guard_rollback: bool = False
    pid: int = 0


def write_settings(segment: Segment, settings: Settings) -> None:
    """Store ``settings`` in the admin region (the flusher, holding the flusher lock, when it starts)."""
    at = segment.layout.admin_offset + ADMIN_SETTINGS
    u64 = segment.u64
    seq = at // 8 + SET_SEQ // 8
    odd = int(u64[seq]) | 1
    u64[seq] = odd  # odd: being written (a reader retries)
    path = settings.checkpoint.encode("utf-8")
    assert len(path) < ADMIN_PATH_BYTES, "checked by the flusher's options"
    struct.pack_into(
        "<QddQQq",
        segment.buf,
        at + SET_KEEP,
        settings.keep,
        settings.interval,
        settings.guard_drop,
        settings.guard_window,
        int(settings.guard_rollback),
        settings.pid,
    )
    segment.buf[at + SET_PATH : at + SET_PATH + ADMIN_PATH_BYTES] = path.ljust(ADMIN_PATH_BYTES, b"\0")
    u64[seq] = odd + 1  # even again: publishes the block whole
    assert SET_INTERVAL == SET_KEEP + 8 and SET_GUARD_DROP == SET_KEEP + 16 and SET_GUARD_WINDOW == SET_KEEP + 24
    assert SET_GUARD_ROLLBACK == SET_KEEP + 32 and SET_PID == SET_KEEP + 40


def read_settings(segment: Segment) -> Settings:
    """The settings the engine's last flusher wrote (all empty if none ever started); never a torn value."""
    at = segment.layout.admin_offset + ADMIN_SETTINGS
    u64, buf = segment.u64, segment.buf
    seq_word = at // 8 + SET_SEQ // 8
    for _ in range(SETTINGS_RETRIES):
        seq = int(u64[seq_word])
        if seq & 1:
            continue
        keep, interval, drop, window, rollback, pid = struct.unpack_from("<QddQQq", buf, at + SET_KEEP)
        path = bytes(buf[at + SET_PATH : at + SET_PATH + ADMIN_PATH_BYTES]).split(b"\0", 1)[0].decode("utf-8", "replace")
        if int(u64[seq_word]) == seq:
            return Settings(path, keep, interval, drop, window, bool(rollback), pid)
    raise TornRead("the flusher's settings")


def _store_text(field: np.ndarray, text: str) -> None:
    data = text.encode("utf-8", "replace")[: len(field)]
    field[...] = 0
    field[: len(data)] = np.frombuffer(data, np.uint8)


def _load_text(field: np.ndarray) -> str:
    return bytes(field).rstrip(b"\0").decode("utf-8", "replace")
