"""The route-change mailbox: one request at a time from whoever changes an engine's routes to its flusher.

Layout and protocol are in :mod:`sona_shm.shm.layout` ("Route-change mailbox"). A
requester holds the admin lock while its request is open; it writes the fields, then bumps
``request`` and rings the doorbell. The flusher reads an open request (``request >
answered``) between two scans, applies it with one ledger commit that also records
``route_request = request``, then writes the reply and ``answered``. This module is the
mailbox's bytes; what a request does to an engine is :mod:`sona_shm.engine.routes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..trajectory import ROUTE_MAX_BYTES
from .layout import (
    ADMIN_ANSWERED,
    ADMIN_INDEX,
    ADMIN_MESSAGE,
    ADMIN_MESSAGE_BYTES,
    ADMIN_NAME,
    ADMIN_OP,
    ADMIN_REQUEST,
    ADMIN_ROUTE,
    ADMIN_STATUS,
    ADMIN_VECTOR,
    OP_ADD,
    OP_RENAME,
    OP_RETIRE,
)
from .segment import Segment

#: The operations by name, as ``sona-shm routes`` and the API call them.
OPERATIONS = {"add": OP_ADD, "rename": OP_RENAME, "retire": OP_RETIRE}
_OP_NAMES = {code: name for name, code in OPERATIONS.items()}


@dataclass(frozen=True)
class Request:
    """An open request: ``op`` ("add", "rename", "retire"), the ``route`` it changes (its index; -1 for add), the
    ``name`` (add: the new route's; rename: the new one), the ``vector`` as given (add; else None)."""

    id: int
    op: str
    route: int
    name: str
    vector: np.ndarray | None


class Mailbox:
    """Views over a segment's route-change mailbox (a segment with a route table)."""

    def __init__(self, segment: Segment) -> None:
        layout = segment.layout
        assert layout.admin_bytes, "a segment without a route table has no mailbox"
        at = layout.admin_offset
        self._u64 = segment.u64
        self._request, self._answered = (at + ADMIN_REQUEST) // 8, (at + ADMIN_ANSWERED) // 8
        buf = segment.numpy_buffer()
        self._u32 = np.ndarray((4,), dtype="<u4", buffer=buf, offset=at + ADMIN_OP)  # op, route, status, index
        self._name = np.ndarray((ROUTE_MAX_BYTES,), dtype=np.uint8, buffer=buf, offset=at + ADMIN_NAME)
        self._message = np.ndarray((ADMIN_MESSAGE_BYTES,), dtype=np.uint8, buffer=buf, offset=at + ADMIN_MESSAGE)
        self._vector = np.ndarray((layout.hidden_dim,), dtype="<f4", buffer=buf, offset=at + ADMIN_VECTOR)
        assert ADMIN_ROUTE == ADMIN_OP + 4 and ADMIN_STATUS == ADMIN_OP + 8 and ADMIN_INDEX == ADMIN_OP + 12

    @property
    def request(self) -> int:
        return int(self._u64[self._request])

    @property
    def answered(self) -> int:
        return int(self._u64[self._answered])

    # ----------------------------------------------------------------- the requester (holding the admin lock)

    def post(self, op: str, route: int, name: str, vector: np.ndarray | None) -> int:
        """Write a request and open it (the store of ``request`` last); its id."""
        self._u32[0], self._u32[1] = OPERATIONS[op], max(route, 0)
        _store_text(self._name, name)
        if vector is not None:
            self._vector[...] = vector
        request = self.answered + 1
        self._u64[self._request] = request  # opens it: the flusher reads the fields above only after this
        return request

    def reply(self) -> tuple[bool, int, str]:
        """The answer to the last request answered: ``(done, index, message)``."""
        return int(self._u32[2]) == 1, int(self._u32[3]), _load_text(self._message)

    # ----------------------------------------------------------------- the flusher

    def open_request(self) -> Request | None:
        """The open request, if any (read only by the flusher, which alone answers)."""
        request = self.request
        if request <= self.answered:
            return None
        op = _OP_NAMES.get(int(self._u32[0]), "")
        vector = self._vector.copy() if op == "add" else None
        return Request(request, op, int(self._u32[1]) if op != "add" else -1, _load_text(self._name), vector)

    def answer(self, request: int, done: bool, index: int, message: str) -> None:
        """Write the reply to ``request``, then ``answered`` (the store the requester waits for)."""
        self._u32[2], self._u32[3] = 1 if done else 2, max(index, 0)
        _store_text(self._message, message)
        self._u64[self._answered] = request

    def close(self) -> None:
        for name in ("_u32", "_name", "_message", "_vector"):
            self.__dict__.pop(name, None)


def _store_text(field: np.ndarray, text: str) -> None:
    data = text.encode("utf-8", "replace")[: len(field)]
    field[...] = 0
    field[: len(data)] = np.frombuffer(data, np.uint8)


def _load_text(field: np.ndarray) -> str:
    return bytes(field).rstrip(b"\0").decode("utf-8", "replace")
