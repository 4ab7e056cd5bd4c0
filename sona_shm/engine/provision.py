"""Provisioning an engine: what it is to be, creating or adopting its segment, destroying it.

An engine is one segment (:mod:`sona_shm.shm`) with one flusher. Before a flusher can learn,
the engine it is asked for must be resolved and opened:

- :class:`EngineSpec` resolves what a *new* segment would be: the checkpoint's engine
  (if a file is given and readable), the options given on top, the route table, and an
  outbox when the engine is to be a fleet host. Options that do not make an engine are an
  error only if the segment has to be created: adopting compares the options given.
- :func:`open_engine` creates the segment (checked for room first; reserved whole; the
  route table and any checkpoint written before the header's magic publishes it) or
  adopts the one there (its header and route table compared with what was asked for),
  and returns it holding the flusher lock.
- :func:`create` is ``sona-shm create``: an engine opened and released, no flusher.
- :func:`destroy` is ``sona-shm destroy``: refused while a flusher runs or producers hold
  lanes, unless forced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import stats
from ..config import DEFAULT_FLEET_OUTBOX, EngineConfig
from ..errors import (
    EXIT_DESTROYED,
    CheckpointError,
    EngineInUseError,
    FlusherRunningError,
    InvalidInputError,
    LayoutMismatchError,
    SegmentNotFoundError,
)
from ..learn.learner import STATE_ARRAYS, Learner
from ..learn.routes import RETIRED, RouteTable
from ..shm import segment as segment_module
from ..shm.layout import FL_PID, FLUSHER_LINE, HEADER_BYTES, LOCK_FLUSHER, MAGIC, Layout, default_fleet_outbox, given_vectors
from ..shm.ledger import Ledger, read_route_table
from ..shm.segment import (
    DEFAULT_MODE,
    GROUP_MODE,
    Segment,
    check_name,
    create_bell,
    create_fd,
    open_fd,
    reserve,
    try_lock_fd,
    unlink_created,
)
from ..shm.space import check_room
from ..store.checkpoint import Checkpoint, read_checkpoint

log = logging.getLogger("sona_shm.flusher")


@dataclass(frozen=True)
class EngineSpec:
    """What engine ``name`` is asked to be (:meth:`resolve` builds it).

    ``requested``: the configuration of a new segment, or why the options given do not make
    one (raised only if the segment must be created). ``given``: the fields an existing
    segment must have (the options given explicitly). ``routes``: the route table a new
    segment gets (and an existing one must hold, when given). ``checkpoint``: the state a
    new segment starts from, or why the file cannot be restored (raised only then).
    """

    name: str
    requested: EngineConfig | InvalidInputError
    given: dict[str, Any]
    routes: RouteTable | None
    checkpoint_path: str | None
    checkpoint: Checkpoint | CheckpointError | None

    @classmethod
    def resolve(
        cls,
        name: str,
        *,
        config: EngineConfig | None = None,
        config_overrides: dict[str, Any] | None = None,
        routes: RouteTable | None = None,
        checkpoint: str | None = None,
        outbox: bool = False,
    ) -> EngineSpec:
        """Resolve an engine's spec; ``outbox``: it is to be a fleet host (a new segment gets an outbox).

        ``config``: the fields of a new segment; ``config_overrides``: the fields an existing
        one must have (default: all of ``config``'s, or none). A new segment is the
        checkpoint's engine (if any) with ``config_overrides`` on top.
        """
        check_name(name)
        path = check_checkpoint_path(checkpoint)
        if config is not None:
            given = dict(config_overrides) if config_overrides is not None else dataclasses.asdict(config)
        else:
            given = dict(config_overrides or {})
        if routes is not None:
            given["routes"] = len(routes)
        saved = load_checkpoint(path)
        if isinstance(saved, Checkpoint) and saved.routes is not None and routes is not None and not saved.routes.starts_with(routes):
            saved = CheckpointError(f"checkpoint {path}: its route table does not start with --routes' routes; nothing restored")
        table = saved.routes if isinstance(saved, Checkpoint) and saved.routes is not None else routes
        # A new segment is the checkpoint's engine (if any) with the options given on top.
        base = dataclasses.asdict(saved.config) if isinstance(saved, Checkpoint) else {}
        if config is not None and not isinstance(saved, Checkpoint):
            base = dataclasses.asdict(config)
        if outbox and not base.get("fleet_outbox") and "fleet_outbox" not in given:
            try:  # a segment created for a fleet gets an outbox, sized for its windows
                base["fleet_outbox"] = default_fleet_outbox(EngineConfig(**{**base, **given}))
            except InvalidInputError:
                base["fleet_outbox"] = DEFAULT_FLEET_OUTBOX  # the options make no engine: said below, if it must be created
        try:
            requested: EngineConfig | InvalidInputError = EngineConfig(**{**base, **given})
        except InvalidInputError as exc:
            requested = exc  # only an error if the segment must be created: adopting compares the options given
        if outbox and isinstance(requested, EngineConfig) and requested.fleet_outbox == 0:
            raise InvalidInputError("fleet_outbox: a host of a fleet needs an outbox (--fleet-outbox N >= 1, default 4096), got 0")
        return cls(name, requested, given, table, path, saved)

    def restore_into(self, layout: Layout) -> Checkpoint | None:
        """The state a new segment of ``layout`` starts from (None: a fresh engine); raises if the checkpoint does not fit."""
        if isinstance(self.checkpoint, CheckpointError):
            raise self.checkpoint
        if self.checkpoint is not None:
            self.checkpoint.check_fits(layout, f"checkpoint {self.checkpoint_path}")
        return self.checkpoint


@dataclass
class OpenedEngine:
    """An engine's segment, opened by :func:`open_engine` with the flusher lock held."""

    segment: Segment
    created: bool
    restored: bool


def open_engine(spec: EngineSpec, mode: int = DEFAULT_MODE) -> OpenedEngine:
    """Create engine ``spec.name`` or adopt the existing one; hold the flusher lock on return.

    A new segment gets the spec's route table and checkpointed state (if any) before its
    header is published; if anything fails meanwhile, the segment is removed again — no
    worker can have attached — and the error propagates. ``mode``: 0600, or 0660 for a
    ``--group`` engine.
    """
    segment, fresh = _create_or_adopt(spec.name, spec.requested, spec.given, spec.routes, mode, spec.restore_into)
    return OpenedEngine(segment, fresh, fresh and isinstance(spec.checkpoint, Checkpoint))


def create(name: str, *, config_overrides: dict[str, Any], routes: RouteTable | None, mode: int = DEFAULT_MODE) -> bool:
    """``sona-shm create``: create engine ``name`` (or find it there) without a flusher; True if it was created."""
    opened = open_engine(EngineSpec.resolve(name, config_overrides=config_overrides, routes=routes), mode)
    opened.segment.close()  # releases the flusher lock
    return opened.created


def destroy(name: str, *, force: bool = False) -> list[str]:
    """``sona-shm destroy``: remove engine ``name``'s segment and doorbell; the names removed.

    Refused (:class:`FlusherRunningError`, :class:`EngineInUseError`) while a flusher runs or
    producers hold lanes, unless ``force``: a flusher then exits ``EXIT_DESTROYED`` at its
    next look and attached producers get :class:`EngineDestroyedError`.
    """
    check_name(name)
    if not force:
        try:
            observed: stats.EngineStats | None = stats.read(name)
        except (SegmentNotFoundError, LayoutMismatchError):
            observed = None  # missing (said below), or not ours to read but still ours to remove
        if observed is not None and observed.flusher.alive:
            raise FlusherRunningError(
                f"segment {name!r} has a live flusher; stop it first (SIGTERM) or pass --force (it then exits {EXIT_DESTROYED})"
            )
        lanes = observed.live_lanes if observed is not None else ()
        if lanes:
            held_by = ", ".join(f"lane {lane.lane}: pid {lane.pid}" for lane in lanes)
            raise EngineInUseError(
                f"segment {name!r}: {len(lanes)} producer(s) hold lanes ({held_by}); what they record into a removed "
                "engine is never learned. Stop them first, or pass --force (their next record(), flush() or sync() then "
                "raises EngineDestroyedError)"
            )
    removed = segment_module.unlink(name)
    if not removed:
        raise SegmentNotFoundError(f"segment {name!r} does not exist")
    return removed


def check_checkpoint_path(path: str | None) -> str | None:
    """``path`` if it names a file that can be written (its directory exists), else raise naming ``checkpoint``."""
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise InvalidInputError(f"checkpoint: expected a file path, got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InvalidInputError(f"checkpoint: directory {directory} does not exist")
    if os.path.isdir(path):
        raise InvalidInputError(f"checkpoint: {path} is a directory; give a file path")
    return path


def load_checkpoint(path: str | None) -> Checkpoint | CheckpointError | None:
    """The checkpoint at ``path``, or why it cannot be restored (raised only if a new segment needs it), or None: no file."""
    if path is None or not os.path.exists(path):
        return None
    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        return exc


def _create_or_adopt(
    name: str,
    requested: EngineConfig | InvalidInputError,
    overrides: dict[str, Any],
    routes: RouteTable | None,
    mode: int,
    restore_into: Callable[[Layout], Checkpoint | None] | None = None,
) -> tuple[Segment, bool]:
    """Create segment ``name`` or adopt the existing one; hold the flusher lock on return.

    ``requested``: the configuration of a new segment, or why the options given do not
    make one (raised only if the segment does not exist). A new segment gets the route
    table ``routes`` and the state ``restore_into(layout)`` returns (if any) before its
    header is published; if that raises, the segment is removed again — no worker can
    have attached to it — and the error propagates.
    """
    config_error = requested if isinstance(requested, InvalidInputError) else None
    layout = None if isinstance(requested, InvalidInputError) else Layout(requested)
    try:
        file = open_fd(name, writable=True, engine_mode=mode)  # only our own user's object, never wider than mode
        created = False
    except SegmentNotFoundError:
        if config_error is not None:
            raise config_error from None  # the options given do not make an engine to create
        assert layout is not None
        check_room(layout, name, group=mode == GROUP_MODE)  # before anything is created
        try:
            file = create_fd(name, layout.total_bytes, mode)  # O_EXCL, reserved whole: no SIGBUS on a full /dev/shm
            created = True
        except FileExistsError:  # another creator was quicker
            file = open_fd(name, writable=True, engine_mode=mode)
            created = False
    try:
        fd = file.fileno()
        if not try_lock_fd(fd, LOCK_FLUSHER):
            pid = int.from_bytes(os.pread(fd, 8, FLUSHER_LINE + FL_PID), "little") if os.fstat(fd).st_size > FLUSHER_LINE else 0
            raise FlusherRunningError(
                f"segment {name!r} already has a live flusher (pid {pid}); stop it first (SIGTERM) or use another --name"
            )
        raw = os.pread(fd, HEADER_BYTES, 0)
        # Zero magic: a creator died before finishing. Any other magic that is not ours is
        # another program's (or another version's) object: refused below, never overwritten.
        fresh = created or len(raw) < HEADER_BYTES or raw[:8] == b"\0" * 8
        if fresh:
            if config_error is not None or layout is None:
                raise config_error or InvalidInputError("config: no engine configuration")  # re-initialising needs one
            if not created:
                log.warning("segment %r was never completed (its creator died); initialising it again", name)
                os.ftruncate(fd, 0)  # back to all zeros
                reserve(fd, layout.total_bytes, name)
        else:
            existing = Layout.from_header(raw, name, os.fstat(fd).st_size)
            differences = existing.differences(overrides)
            if differences:
                diffs = "; ".join(differences)
                raise LayoutMismatchError(
                    f"segment {name!r} exists with another configuration ({diffs}); start the flusher without "
                    f"those options to adopt it, or remove it with `sona-shm destroy --name {name}` (its learned state is lost)"
                )
            layout = existing
            # An older sona_shm only sized the segment: reserve what it left sparse, or refuse.
            reserve(fd, layout.total_bytes, name)
        segment = Segment(name, file, layout, writable=True)  # closes the file with itself
        # What the flusher writes — the ledger copies and, above all, the buffer, where each
        # learned trajectory would otherwise land on a page touched for the first time — is
        # faulted in now, once, rather than one page per trajectory (Segment.populate). A new
        # segment is populated before its magic is published, so no producer waits for it.
        segment.populate(layout.ledger_offset, layout.lanes_offset - layout.ledger_offset)
        segment.populate(layout.buffer_offset, layout.total_bytes - layout.buffer_offset)
    except BaseException:
        if created and not file.closed:
            unlink_created(name, file.fileno())  # nobody can have attached: its header has no magic
        file.close()  # the segment's too, if it was made: closed once either way
        raise
    if fresh:
        try:
            _initialise(segment, mode, routes, restore_into(segment.layout) if restore_into else None)
        except BaseException:
            # No worker can have attached (no magic). The doorbell is not removed: if it
            # exists it was there before (create_bell is the last step that can fail).
            unlink_created(name, segment.fileno())
            segment.close()
            raise
    else:
        try:
            table = read_route_table(segment) if routes is not None else None
            # Routes may have been added, renamed or retired since: the table given must be the one it was created with.
            if routes is not None and (table is None or segment.layout.routes != len(routes) or not table.starts_with(routes)):
                raise LayoutMismatchError(
                    f"segment {name!r} exists with another route table; start the flusher without --routes to adopt it, "
                    f"or remove it with `sona-shm destroy --name {name}` (its learned state is lost)"
                )
            create_bell(name, mode)  # kept if it exists; recreated if someone removed it
        except BaseException:
            segment.close()
            raise
    return segment, fresh


def _initialise(segment: Segment, mode: int, routes: RouteTable | None, checkpoint: Checkpoint | None = None) -> None:
    """Write header, route table, first ledger copy and doorbell of a zeroed segment; the magic goes last.

    The first ledger copy is a fresh learner's state over ``routes`` (the cosine router's start), then the
    checkpoint's learned state on top."""
    layout = segment.layout
    if (routes is None) != (layout.max_routes == 0):
        raise InvalidInputError(
            f"routes: the engine's configuration says {layout.routes} routes, but {'no' if routes is None else 'a'} table was given"
        )
    if routes is not None and len(routes) > layout.max_routes:
        raise InvalidInputError(f"routes: the table has {len(routes)} routes, the engine reserves {layout.max_routes} (--max-routes)")
    segment.buf[: len(layout.pack_header())] = layout.pack_header()
    record = np.zeros(1, dtype=layout.ledger_dtype)
    st = record[0]
    fresh = Learner.for_engine(layout.config, None if routes is None else routes.unit)
    for name in STATE_ARRAYS:
        st[name] = getattr(fresh, name)
    st["engine_id"] = secrets.randbits(64) or 1  # this engine, in its checkpoints (a rollback takes only its own)
    if routes is not None:
        k = len(routes)
        given_vectors(segment.numpy_buffer(), layout)[:k] = routes.vectors
        st["routes_used"] = k
        st["route_names"][:k] = routes.names_bytes()
        st["route_state"][:k][np.array(routes.retired_flags(), bool)] = RETIRED
    if checkpoint is not None:
        checkpoint.apply(record[0], checkpoint.generation)  # no worker has seen this segment: keep its generation
    ledger = Ledger(segment)
    ledger.copies[0] = record[0]
    ledger.close()
    create_bell(segment.name, mode)
    segment.buf[:8] = MAGIC  # publishes the header: attach() accepts the segment from now on
