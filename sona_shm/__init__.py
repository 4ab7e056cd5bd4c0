"""sona_shm: SONA's instant learning loop across processes, in POSIX shared memory."""

from __future__ import annotations

from .errors import (
    CheckpointError,
    ClosedError,
    FlusherRunningError,
    FlusherTimeoutError,
    InvalidInputError,
    LayoutMismatchError,
    NoFreeLaneError,
    SegmentNotFoundError,
    SonaShmError,
)
from .learning import LoopMetrics
from .loop import InstantLoop
from .trajectory import Step, Trajectory

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ClosedError",
    "FlusherRunningError",
    "FlusherTimeoutError",
    "InstantLoop",
    "InvalidInputError",
    "LayoutMismatchError",
    "LoopMetrics",
    "NoFreeLaneError",
    "SegmentNotFoundError",
    "SonaShmError",
    "Step",
    "Trajectory",
]
