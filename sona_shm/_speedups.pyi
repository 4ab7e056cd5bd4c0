"""The C twin's interface (``sona_shm/_speedups.c``), loaded by :mod:`sona_shm.native`.

Checked against the built module by ``mypy.stubtest`` in CI (``.ci/run``). Every function
that may decline an input returns None (or -1) for it: the caller then takes the Python
path, which converts or raises the precise error.
"""

from typing import Any, Final, Protocol, final, type_check_only

import numpy as np
from typing_extensions import Buffer

from sona_shm.trajectory import RouteChoice

# The layout's byte offsets as compiled in (tests/test_speedups.py compares them with shm/layout.py).
ROUTE_MAX_BYTES: Final[int]
SLOT_HEAD_BYTES: Final[int]
SLOT_TRAJ_ID: Final[int]
SLOT_LATENCY_US: Final[int]
SLOT_QUALITY: Final[int]
SLOT_N_STEPS: Final[int]
SLOT_ROUTE_LEN: Final[int]
SLOT_ROUTE_INDEX: Final[int]
SLOT_BEST_INDEX: Final[int]
SLOT_PROBABILITY: Final[int]
LANE_CONTROL_BYTES: Final[int]
LANE_HEAD: Final[int]
LANE_NEXT_ID: Final[int]
LANE_LAST_AT: Final[int]
FLUSHER_LINE: Final[int]
COMMIT_LINE: Final[int]
FL_IDLE: Final[int]
WINDOW_HEAD_BYTES: Final[int]
MAX_ROUTES: Final[int]
INTERFACE: Final[int]
# The routing rule's constants (learn/routing.py) and route()'s (learn/routes.py: TIE, ACTIVE), as compiled in
# (tests/test_routing_c.py compares them).
BETA: Final[float]
OFFSET: Final[float]
BIAS_LR: Final[float]
CENTRE: Final[int]
PROTECT: Final[float]
SPARSE: Final[float]
GROWTH: Final[int]
GRADIENT_FLOOR: Final[float]
MIN_ADAPTED_NORM: Final[float]
TIE: Final[float]
ACTIVE: Final[int]

@final
class Geometry:
    """A segment's slot and lane geometry (``Layout.geometry`` builds it), checked once."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        rank: int,
        max_steps: int,
        attention_dim: int,
        lanes: int,
        lane_slots: int,
        slot_bytes: int,
        payload_offset: int,
        route_offset: int,
        step_bytes: int,
        routes: int,
        lanes_offset: int,
        slots_offset: int,
        unit_reward: bool,
        routes_used_offset0: int,
        routes_used_offset1: int,
    ) -> None: ...
    @property
    def hidden_dim(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def attention_dim(self) -> int: ...
    @property
    def lanes(self) -> int: ...
    @property
    def lane_slots(self) -> int: ...
    @property
    def slot_bytes(self) -> int: ...
    @property
    def payload_offset(self) -> int: ...
    @property
    def route_offset(self) -> int: ...
    @property
    def step_bytes(self) -> int: ...
    @property
    def routes(self) -> int: ...
    @property
    def lanes_offset(self) -> int: ...
    @property
    def slots_offset(self) -> int: ...
    @property
    def unit_reward(self) -> bool: ...
    @property
    def routes_used_offset0(self) -> int: ...
    @property
    def routes_used_offset1(self) -> int: ...

@final
class LaneWriter:
    """The producer's side of one lane (``shm/lane.py``'s ``PyLaneWriter`` is its twin; both are ``lane.Writer``s)."""

    def __init__(self, segment: Buffer, geometry: Geometry, lane: int, /) -> None: ...
    @property
    def head(self) -> int: ...
    @property
    def slot_offset(self) -> int: ...
    @property
    def tail(self) -> int: ...
    @tail.setter
    def tail(self, value: int) -> None: ...
    def record(self, traj: object, /) -> int: ...
    def fill(self, traj: object, /) -> int: ...
    def publish(self) -> int: ...
    def close(self) -> None: ...

@type_check_only
class _LearnerState(Protocol):
    """What the reference rule's learner reads of a ``learn.learner.Learner``."""

    lr: float
    flush_threshold: int
    pending: int
    grad_up: np.ndarray
    up: np.ndarray
    route_chosen: np.ndarray
    route_best: np.ndarray
    route_reward: np.ndarray

@type_check_only
class _RoutingState(Protocol):
    """What the routing rule's learners read (and update in place) of a ``learn.learner.Learner``."""

    lr: float
    adapter_lr: float
    temperature: float
    flush_threshold: int
    pending: int
    signals_accumulated: int
    routes_used: int
    up: np.ndarray
    down: np.ndarray
    work_up: np.ndarray
    work_down: np.ndarray
    route_vectors: np.ndarray
    work_vectors: np.ndarray
    route_bias: np.ndarray
    work_bias: np.ndarray
    route_centre: np.ndarray
    route_state: np.ndarray
    route_chosen: np.ndarray
    route_best: np.ndarray
    route_reward: np.ndarray

#: ``(pending, flushes, applied, width, signals, corrupt slot indices, consumed)``
_Learned = tuple[int, int, int, int, int, list[int], int]

def set_types(trajectory: type, step: type, route_choice: type, /) -> None: ...
def learn_slots(block: np.ndarray, geometry: Geometry, first_seq: int, learner: _LearnerState, stop: bool, /) -> _Learned: ...
def learn_routing(block: np.ndarray, geometry: Geometry, first_seq: int, learner: _RoutingState, stop: bool, /) -> _Learned: ...
def learn_routing_rows(
    query: np.ndarray,
    route_index: np.ndarray,
    best_index: np.ndarray,
    quality: np.ndarray,
    start: int,
    learner: _RoutingState,
    stop: bool,
    /,
) -> tuple[int, int, int, int, int]: ...
def write_window(out: np.ndarray, grad_up: np.ndarray, seq: int, n: int, cum: int, sealed_at: float, /) -> int: ...
def apply_window(up: np.ndarray, window: Buffer, lr: float, hidden_dim: int, rank: int, /) -> tuple[int, int, int, float] | None: ...
def apply_deltas_window(
    up: np.ndarray, down: np.ndarray, vectors: np.ndarray, bias: np.ndarray, window: Buffer, hidden_dim: int, rank: int, max_routes: int, /
) -> tuple[int, int, int, float] | None: ...
def route(
    x: Any,
    down: np.ndarray,
    up_scaled: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    active: np.ndarray,
    names: tuple[str, ...],
    mode: int,
    parameter: float,
    temperature: float,
    u: float,
    /,
) -> RouteChoice | None: ...
def adapt(x: Any, down: np.ndarray, up_scaled: np.ndarray, /) -> np.ndarray | None: ...

@final
class Descriptor:
    """An open file descriptor owned from the instant it is opened (in C); closed exactly once."""

    def __init__(self, path: str | bytes, flags: int, /) -> None: ...
    @classmethod
    def dup(cls, fd: int, /) -> Descriptor: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
