"""What an engine is: its configuration, the learning rules it may use, and their defaults.

Every field of :class:`EngineConfig` is stored in the segment's header (and in
checkpoints); this module validates them once, for the in-process
:class:`~sona_shm.loop.InstantLoop` and the shared-memory engine alike. It imports
nothing of sona_shm but the errors and the argument checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .checks import check_int
from .errors import InvalidInputError

#: The learning rules: the seed's bit-exact REINFORCE rule, and ours for routing.
RULES = ("reference", "routing")
#: Learning rate when none is given, by rule (the reference's own default; ours, see routing.py).
DEFAULT_LR = {"reference": 0.002, "routing": 1.0}
#: Softmax temperature of the routing rule (scores are cosines, so logits span [-tau, tau]).
DEFAULT_TEMPERATURE = 10.0
MAX_TEMPERATURE = 1000.0
#: Most routes a route table may hold (each costs K*h floats in route() and the learner).
MAX_ROUTES = 256
#: Outbox entries of an engine created for a fleet when none is given (``--fleet-outbox``).
#: A sealed window takes one; at 1,000 signals/s and the default flush threshold (10
#: windows/s) 4096 entries ride out ~7 minutes without Redis; at h=256, rank 2 they take
#: 16 MiB (reference rule) or 32 MiB (routing rule) of the segment.
DEFAULT_FLEET_OUTBOX = 4096
MAX_FLEET_OUTBOX = 1 << 20


def check_positive_float(name: str, value: Any, high: float = math.inf) -> float:
    """``value`` as a float if it is a finite real number in ``(0, high]``, else raise naming ``name``."""
    number = value if isinstance(value, float) else float(value) if isinstance(value, int) and abs(value) < 2**1023 else math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(number) and 0 < number <= high):
        bound = "" if high == math.inf else f" and <= {high:g}"
        raise InvalidInputError(f"{name}: expected a finite number > 0{bound}, got {value!r}")
    return number


def check_rule(rule: Any) -> str:
    if rule not in RULES:
        raise InvalidInputError(f"rule: expected one of {', '.join(map(repr, RULES))}, got {rule!r}")
    return rule


@dataclass(frozen=True)
class EngineConfig:
    """What an engine is created with; all of it is stored in the header.

    ``lr`` defaults by ``rule`` (:data:`DEFAULT_LR`). ``routes`` is the number of
    vectors in the engine's route table (0: none; the table itself is given apart, see
    :class:`~sona_shm.routes.RouteTable`); the routing rule needs one.
    ``temperature`` is the routing rule's softmax temperature. ``fleet_outbox``: entries
    of the segment's fleet outbox (0: the engine cannot join a fleet; see
    :mod:`sona_shm.fleet.member`); it shapes this host's segment only, never what is learned.
    """

    hidden_dim: int = 256
    rank: int = 2
    lr: float = None  # type: ignore[assignment]  # None: the rule's default, resolved in __post_init__
    flush_threshold: int = 100
    capacity: int = 10_000
    max_steps: int = 8
    attention_dim: int = 64
    lanes: int = 32
    lane_slots: int = 512
    rule: str = "reference"
    routes: int = 0
    temperature: float = DEFAULT_TEMPERATURE
    fleet_outbox: int = 0

    @classmethod
    def check_fields(cls, given: dict[str, Any]) -> None:
        """Refuse bad values among ``given`` (some of the fields, as a command line gives them).

        What only a whole configuration can say (the routing rule needs a route table) is
        checked when an engine is created; adopting one compares the fields given.
        """
        base: dict[str, Any] = {"routes": 2} if given.get("rule") == "routing" and "routes" not in given else {}
        cls(**{**base, **given})

    def __post_init__(self) -> None:
        check_rule(self.rule)
        check_int("hidden_dim", self.hidden_dim, 1, 65_535)
        if isinstance(self.rank, bool) or self.rank not in (1, 2):
            raise InvalidInputError(f"rank: expected 1 or 2, got {self.rank!r}")
        lr = DEFAULT_LR[self.rule] if self.lr is None else check_positive_float("lr", self.lr)
        object.__setattr__(self, "lr", lr)  # frozen: resolved once, here
        check_int("flush_threshold", self.flush_threshold, 1, 2**62)
        check_int("capacity", self.capacity, 0, 2**31 - 1)
        check_int("max_steps", self.max_steps, 0, 1024)
        check_int("attention_dim", self.attention_dim, 0, 65_535)
        check_int("lanes", self.lanes, 1, 4096)
        check_int("lane_slots", self.lane_slots, 1, 1 << 20)
        check_int("routes", self.routes, 0, MAX_ROUTES)
        if self.routes == 1:
            raise InvalidInputError("routes: expected 0 (no route table) or 2 to 256 routes, got 1 (one route leaves nothing to choose)")
        if self.rule == "routing" and self.routes == 0:
            raise InvalidInputError("routes: the routing rule learns which route serves a query; give it a route table (--routes FILE)")
        object.__setattr__(self, "temperature", check_positive_float("temperature", self.temperature, MAX_TEMPERATURE))
        check_int("fleet_outbox", self.fleet_outbox, 0, MAX_FLEET_OUTBOX)
        if self.rule == "routing" and self.max_steps < 1:
            raise InvalidInputError(
                "max_steps: expected >= 1 under the routing rule (a feedback is recorded as a one-step trajectory), got 0"
            )
