"""Every error sona_shm raises on purpose is a subclass of :class:`SonaShmError`.

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
