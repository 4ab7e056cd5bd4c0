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
#: Learning rate when none is given, by rule: the reference's own default; under the routing rule the step
#: of the learned route vectors (learn/routing.py; measured in BENCHMARKS.md, "Learning").
DEFAULT_LR = {"reference": 0.002, "routing": 0.03}
#: The sizes of a new engine when none is given, by rule. The reference rule's are the seed's (8-step
#: trajectories with attention, a buffer for Loop B). A routing engine records feedback, which is a
#: one-step trajectory without attention, and learns it in the flusher: it needs no buffer unless
#: someone drains it (``--capacity N``), and half the in-flight slots. At h = 384 that is 25 MiB where
#: the reference sizes reserve 412 MiB (issue 20).
RULE_SIZES: dict[str, dict[str, int]] = {
    "reference": {"capacity": 10_000, "max_steps": 8, "attention_dim": 64, "lane_slots": 512},
    "routing": {"capacity": 0, "max_steps": 1, "attention_dim": 0, "lane_slots": 256},
}
#: Softmax temperature of the routing rule (scores are cosines, so logits span [-tau, tau]).
DEFAULT_TEMPERATURE = 10.0
MAX_TEMPERATURE = 1000.0
#: Most routes a route table may hold (each costs K*h floats in route() and the learner).
MAX_ROUTES = 256


def default_max_routes(routes: int) -> int:
    """Rows reserved for a table of ``routes`` routes when ``--max-routes`` is not given: room to add as many
    again, and at least 16 (capped at :data:`MAX_ROUTES`; 0 without a table)."""
    return 0 if routes == 0 else min(MAX_ROUTES, routes + max(16, routes))


#: Outbox entries of an engine created for a fleet when none is given (``--fleet-outbox``), at most: a sealed
#: window takes one; at 1,000 signals/s and the default flush threshold (10 windows/s) 4096 entries ride out
#: ~7 minutes without Redis; at h=256, rank 2 they take 16 MiB under the reference rule. An entry holds the
#: largest window the engine can seal (the routing rule's: every route row touched), so the default is also
#: bounded by :data:`DEFAULT_FLEET_OUTBOX_BYTES` (``sona_shm.shm.layout.default_fleet_outbox``).
DEFAULT_FLEET_OUTBOX = 4096
#: ... and the outbox it makes takes at most this many bytes (but holds at least 256 entries).
DEFAULT_FLEET_OUTBOX_BYTES = 64 * 2**20
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

    ``lr`` defaults by ``rule`` (:data:`DEFAULT_LR`), and so do ``capacity``, ``max_steps``,
    ``attention_dim`` and ``lane_slots`` (:data:`RULE_SIZES`). ``routes`` is the number of
    vectors in the engine's route table (0: none; the table itself is given apart, see
    :class:`~sona_shm.routes.RouteTable`); the routing rule needs one.
    ``temperature`` is the routing rule's softmax temperature. ``max_routes``: the rows
    reserved for routes, so routes can be added at run time (0: the default,
    :func:`default_max_routes`). ``adapter_lr``: the routing rule's step of the adapter
    (``U``, ``D``); 0 (the default) keeps ``forward()`` the identity-based start and learns
    the route table alone (BENCHMARKS.md says why). ``fleet_outbox``: entries
    of the segment's fleet outbox (0: the engine cannot join a fleet; see
    :mod:`sona_shm.fleet.member`); it shapes this host's segment only, never what is learned.
    """

    hidden_dim: int = 256
    rank: int = 2
    lr: float = None  # type: ignore[assignment]  # None: the rule's default, resolved in __post_init__
    flush_threshold: int = 100
    capacity: int = None  # type: ignore[assignment]  # None: the rule's size (RULE_SIZES), resolved in __post_init__
    max_steps: int = None  # type: ignore[assignment]  # (likewise)
    attention_dim: int = None  # type: ignore[assignment]  # (likewise)
    lanes: int = 32
    lane_slots: int = None  # type: ignore[assignment]  # (likewise)
    rule: str = "reference"
    routes: int = 0
    temperature: float = DEFAULT_TEMPERATURE
    fleet_outbox: int = 0
    max_routes: int = 0
    adapter_lr: float = 0.0

    def describe(self) -> str:
        """One line for humans: the rule and the sizes the engine was made with."""
        routes = f", {self.routes} routes (room for {self.max_routes})" if self.routes else ""
        return (
            f"{self.rule} rule, hidden_dim {self.hidden_dim}, rank {self.rank}, lr {self.lr:g}{routes}, max_steps {self.max_steps}, "
            f"attention_dim {self.attention_dim}, capacity {self.capacity}, {self.lanes} lanes x {self.lane_slots} lane_slots"
        )

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
        for size, default in RULE_SIZES[self.rule].items():
            if getattr(self, size) is None:
                object.__setattr__(self, size, default)  # frozen: resolved once, here
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
        check_int("max_routes", self.max_routes, 0, MAX_ROUTES)
        if self.max_routes == 0:
            object.__setattr__(self, "max_routes", default_max_routes(self.routes))  # frozen: resolved once, here
        elif self.max_routes < self.routes:
            raise InvalidInputError(
                f"max_routes: expected at least the table's {self.routes} routes (and at most {MAX_ROUTES}), got {self.max_routes}"
            )
        elif self.routes == 0:
            raise InvalidInputError(
                f"max_routes: an engine without a route table reserves none (give --routes FILE), got {self.max_routes}"
            )
        adapter_lr = self.adapter_lr
        if isinstance(adapter_lr, bool) or not isinstance(adapter_lr, (int, float)) or not (0.0 <= adapter_lr < math.inf):
            raise InvalidInputError(f"adapter_lr: expected a finite number >= 0, got {adapter_lr!r}")
        if adapter_lr and self.rule != "routing":
            raise InvalidInputError(f"adapter_lr: only the routing rule has one (the reference rule's step is lr), got {adapter_lr!r}")
        object.__setattr__(self, "adapter_lr", float(adapter_lr))
        if self.rule == "routing" and self.max_steps < 1:
            raise InvalidInputError(
                "max_steps: expected >= 1 under the routing rule (a feedback is recorded as a one-step trajectory), got 0"
            )
