"""sona_shm: SONA's instant learning loop across processes, in POSIX shared memory.

The public names below are imported on first use (PEP 562): ``import sona_shm`` itself
loads only the CPU check and the errors, so the ``sona-shm`` command starts at once and
an interrupt in its first instants is a quiet exit (``sona_shm/__main__.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import machine  # noqa: F401 - first: refuses a CPU whose memory order the engine does not get (see there)
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

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {
    "Client": ".engine.client",
    "attach": ".engine.client",
    "Consumer": ".engine.consumer",
    "drain_to_file": ".engine.consumer",
    "open_consumer": ".engine.consumer",
    "LoopMetrics": ".learn.learner",
    "InstantLoop": ".learn.loop",
    "RouteTable": ".learn.routes",
    "RouteChoice": ".trajectory",
    "Step": ".trajectory",
    "Trajectory": ".trajectory",
    "TrajectoryBatch": ".trajectory",
}

if TYPE_CHECKING:
    from .engine.client import Client, attach
    from .engine.consumer import Consumer, drain_to_file, open_consumer
    from .learn.learner import LoopMetrics
    from .learn.loop import InstantLoop
    from .learn.routes import RouteTable
    from .trajectory import RouteChoice, Step, Trajectory, TrajectoryBatch


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sona_shm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # imported once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
    "RouteTable",
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
