"""Every error sona_shm raises on purpose is a subclass of :class:`SonaShmError`.

The exit codes of the ``sona-shm`` command live here too, beside the errors they
stand for, so any module can name them without importing the command line.

Bad input also subclasses :class:`ValueError`, so code that already catches
``ValueError`` around a model call keeps working. Messages name the argument, what
was expected and what was got.
"""

from __future__ import annotations


class SonaShmError(Exception):
    """Base class of every error sona_shm raises on purpose."""


class InvalidInputError(SonaShmError, ValueError):
    """A trajectory, vector, name or option is malformed; nothing was written."""


class SegmentNotFoundError(SonaShmError, FileNotFoundError):
    """No segment of that name exists (or it was never fully created)."""


class LayoutMismatchError(SonaShmError):
    """A segment exists but its header disagrees with what the caller expects."""


class UntrustedSegmentError(LayoutMismatchError):
    """A segment or doorbell in /dev/shm is not this user's engine (another owner, or a mode
    wider than an engine's); it was not used."""


class FlusherRunningError(SonaShmError):
    """A second flusher tried to start on a segment that already has a live one."""


class EngineInUseError(SonaShmError):
    """``destroy`` refused: producers hold lanes of the engine (``--force`` removes it anyway)."""


class EngineDestroyedError(SonaShmError):
    """The engine's segment was removed (``sona-shm destroy``) while this process had it mapped;
    nothing more is learned from it: attach again to a new one."""


class NoFreeLaneError(SonaShmError):
    """Every producer lane is held by a live process."""


class FlusherTimeoutError(SonaShmError, TimeoutError):
    """The flusher did not answer a ``flush()``/``sync()`` within its timeout."""


class ClosedError(SonaShmError):
    """The client was closed; attach again to keep recording."""


class DrainTimeoutError(SonaShmError, TimeoutError):
    """Another consumer held the drain lock for longer than the drain's timeout."""


class NoSpaceError(SonaShmError):
    """A segment does not fit in /dev/shm (or in memory), or its backing could not be reserved; nothing was created."""


class CheckpointError(SonaShmError):
    """A checkpoint cannot be read or written, is corrupt, or does not fit the engine; nothing was changed."""


class TornRead(SonaShmError):
    """A consistent read of an engine's state failed: the flusher committed every time, ``READ_RETRIES``
    times in a row, while this process copied it (a reader paused for long, say). Readers that can keep
    their last good copy do; elsewhere it is raised: try again."""


class FleetError(SonaShmError):
    """The fleet refused this host (another configuration, a host id in use, too many hosts),
    or fleet mode cannot run (no redis-py, a bad Redis URL, a segment without an outbox)."""


class InternalSignal(Exception):
    """Base class of the conditions sona_shm raises and handles inside itself (a fleet's link to Redis
    down, a window or snapshot that is not one, a replica that must resync); never a user's error."""


# ----------------------------------------------------------------- exit codes of ``sona-shm``

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure; the message says what
EXIT_USAGE = 2  # argparse's own code for bad arguments; also InvalidInputError
EXIT_NOT_FOUND = 3  # no such segment
EXIT_FLUSHER_RUNNING = 4  # a flusher already owns the segment (destroy: or producers hold lanes)
EXIT_LAYOUT_MISMATCH = 5  # the segment exists with another configuration or version
EXIT_NOT_RUNNING = 6  # the monitor found no live flusher
EXIT_CHECKPOINT = 7  # a checkpoint could not be read, restored or written; nothing was changed
EXIT_DESTROYED = 8  # the flusher's engine was destroyed under it (destroy --force); it stopped learning
EXIT_FLEET = 9  # the fleet refused this flusher (configuration, host id), or fleet mode cannot run here
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) before the command could start, or one it does not handle (the shell's 128 + 2)

# The first matching class decides; SonaShmError catches the rest.
_EXIT_CODES: tuple[tuple[type[SonaShmError], int], ...] = (
    (SegmentNotFoundError, EXIT_NOT_FOUND),
    (FlusherRunningError, EXIT_FLUSHER_RUNNING),
    (EngineInUseError, EXIT_FLUSHER_RUNNING),
    (EngineDestroyedError, EXIT_DESTROYED),
    (LayoutMismatchError, EXIT_LAYOUT_MISMATCH),
    (CheckpointError, EXIT_CHECKPOINT),
    (FleetError, EXIT_FLEET),
    (InvalidInputError, EXIT_USAGE),
    (SonaShmError, EXIT_ERROR),
)


def exit_code(exc: SonaShmError) -> int:
    """The ``sona-shm`` exit code that stands for ``exc``."""
    return next(code for kind, code in _EXIT_CODES if isinstance(exc, kind))
