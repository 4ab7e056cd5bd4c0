"""sona_shm: SONA's instant learning loop across processes, in POSIX shared memory."""

from __future__ import annotations

from . import machine  # noqa: F401 - first: refuses a CPU whose memory order the engine does not get (see there)
from .engine.client import Client, attach
from .engine.consumer import Consumer, drain_to_file, open_consumer
from .errors import (
    CheckpointError,
    ClosedError,
    DrainTimeoutError,
    EngineDestroyedError,
    EngineInUseError,
    FlusherRunningError,
    FlusherTimeoutError,
    InvalidInputError,
    LayoutMismatchError,
    NoFreeLaneError,
    NoSpaceError,
    SegmentNotFoundError,
    SonaShmError,
    UntrustedSegmentError,
)
from .learn.learner import LoopMetrics
from .learn.loop import InstantLoop
from .trajectory import RouteChoice, Step, Trajectory, TrajectoryBatch

__version__ = "0.1.0"

__all__ = [
    "Client",
    "CheckpointError",
    "ClosedError",
    "Consumer",
    "DrainTimeoutError",
    "EngineDestroyedError",
    "EngineInUseError",
    "FlusherRunningError",
    "FlusherTimeoutError",
    "InstantLoop",
    "InvalidInputError",
    "LayoutMismatchError",
    "LoopMetrics",
    "NoFreeLaneError",
    "NoSpaceError",
    "RouteChoice",
    "SegmentNotFoundError",
    "SonaShmError",
    "Step",
    "Trajectory",
    "TrajectoryBatch",
    "UntrustedSegmentError",
    "attach",
    "drain_to_file",
    "open_consumer",
]
