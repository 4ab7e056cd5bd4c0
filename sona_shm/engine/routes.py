"""Changing an engine's routes while it runs: add, rename, retire.

:func:`change` is what ``sona-shm routes add|rename|retire`` and ``Client.add_route`` /
``rename_route`` / ``retire_route`` call. It checks the change against the engine's
committed table (bad input is refused before anything is written) and asks for it through
the admin mailbox (:func:`sona_shm.engine.admin.ask`: the flusher applies it, or the caller
when no flusher runs, holding the flusher lock, with one ledger commit).

:func:`apply` is what the flusher (and that path) does with a request: the route table in
its learner and ledger record change, the caller commits. Adding a route writes its vector
as given into the route region first, then the commit that raises ``routes_used`` publishes
it; every route keeps its index, its learned vector and bias and its counts, so nothing
learned for the other routes changes. Every change bumps the generation, so a worker sees it
at its next ``route()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..learn.learner import Learner
from ..learn.routes import RouteTable
from ..shm.admin import ROUTE_OPERATIONS, Request
from ..shm.layout import given_vectors
from ..shm.ledger import route_table_of
from ..shm.segment import Segment
from ..trajectory import ROUTE_MAX_BYTES

#: Seconds a change waits for the flusher's answer (and for another request to finish) unless told otherwise.
DEFAULT_TIMEOUT = 10.0


def change(segment: Segment, op: str, *, route: Any = None, name: Any = None, vector: Any = None, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Add, rename or retire a route of the engine of ``segment`` (mapped writable); the route's index.

    ``op``: ``"add"`` (``name``, ``vector`` ``float[h]``: the new route, e.g. the mean embedding of its
    examples), ``"rename"`` (``route`` by index or name, its new ``name``) or ``"retire"`` (``route``).
    Refused with :class:`InvalidInputError` (nothing written) for an unknown route, a name in use, a
    vector of another width or not finite, a table at ``max_routes``, the last active route, or an
    engine that is a host of a fleet; :class:`FlusherTimeoutError` if the flusher does not answer
    within ``timeout`` (the change stays asked for: the flusher applies it when it gets to it).
    """
    from . import admin  # the admin mailbox's requester (it applies route changes with apply() below)

    if op not in ROUTE_OPERATIONS:
        raise InvalidInputError(f"op: expected one of {sorted(ROUTE_OPERATIONS)}, got {op!r}")
    layout = segment.layout
    if not layout.max_routes:
        raise InvalidInputError(f"routes: engine {segment.name!r} has no route table; create it with --routes FILE")

    def check(record: np.void) -> admin.Posted:
        table = route_table_of(segment, record)
        assert table is not None
        index, checked_name, checked_vector = _check(table, op, route, name, vector, layout.max_routes)
        return admin.Posted(index, checked_name, checked_vector)

    return admin.ask(segment, op, check, timeout=timeout).index


def _check(table: RouteTable, op: str, route: Any, name: Any, vector: Any, max_routes: int) -> tuple[int, str, np.ndarray | None]:
    """``(route index, name, vector)`` of a valid request (what :func:`apply` will do succeeds), or raise."""
    if op == "add":
        if route is not None:
            raise InvalidInputError(f"route: adding a route takes name= and vector=, not route=, got route={route!r}")
        new = table.added(name, vector, max_routes)
        return -1, new.names[-1], new.vectors[-1]
    if vector is not None:
        raise InvalidInputError(f"vector: only adding a route takes a vector, got one for {op}")
    index = table.index(route, "route")
    if op == "rename":
        return index, table.renamed(index, name).names[index], None
    if name is not None:
        raise InvalidInputError(f"name: retiring a route takes only route=, got name={name!r}")
    table.retired_route(index)
    return index, "", None


def apply(request: Request, learner: Learner, record: np.void, segment: Segment) -> tuple[int, RouteTable]:
    """Apply ``request`` to ``learner`` and its ledger ``record`` (not committed): the route's index and the new table.

    Raises :class:`InvalidInputError` (nothing changed) for a request the committed table refuses. With
    ``record["admin_request"] >= request.id`` it was applied already (by a flusher killed before it answered):
    nothing changes and the route's index is returned.
    """
    table = route_table_of(segment, record)
    assert table is not None
    if int(record["admin_request"]) >= request.id:
        return (table.names.index(request.name) if request.op == "add" else request.route), table
    layout = segment.layout
    if request.op == "add":
        if len(request.name.encode("utf-8")) > ROUTE_MAX_BYTES:
            raise InvalidInputError(f"name: expected at most {ROUTE_MAX_BYTES} UTF-8 bytes, got {request.name!r}")
        new = table.added(request.name, request.vector, layout.max_routes)
        index = len(table)
        given_vectors(segment.numpy_buffer(), layout)[index] = new.vectors[-1]  # before the commit that publishes the row
        learner.add_route(new.unit[-1])
        record["route_names"][index] = new.names_bytes()[-1]
    elif request.op == "rename":
        index = table.index(request.route, "route")
        new = table.renamed(index, request.name)
        record["route_names"][index] = new.names_bytes()[index]
        learner.generation += 1  # workers reload the table
    elif request.op == "retire":
        index = table.index(request.route, "route")
        new = table.retired_route(index)
        learner.retire_route(index)
    else:
        raise InvalidInputError(f"routes: unknown operation in the mailbox (code {request.op!r}); the segment was written outside sona_shm")
    record["routes_version"] += 1
    record["admin_request"] = request.id
    return index, new
