"""Adapter checkpoints: an engine's learned state in a safetensors file, and restoring it as a transaction.

A checkpoint is what the ledger holds apart from lane and buffer positions: the adapter,
the pending gradients, the counters and per-route counts, plus the engine's
configuration and route table. It is a safetensors file (:mod:`sona_shm.store.tensorfile`)
that standard tools read::

    base_model.model.layers.0.self_attn.micro_lora_A.weight  F32 [rank, hidden_dim]  down
    base_model.model.layers.0.self_attn.micro_lora_B.weight  F32 [hidden_dim, rank]  up, transposed
    sona.grad_up                                             F64 [rank, hidden_dim]  pending gradient sums of up
    sona.grad_down                                           F64 [rank, hidden_dim]  ... of down (routing rule)
    sona.routes                                              F32 [K, hidden_dim]     the route table (K > 0 only)
    sona.route_chosen, sona.route_best                       U64 [K]                 feedback counts per route
    sona.route_reward                                        F64 [K]                 summed reward per route

The two adapter tensors have the names and shapes the Rust crate's exporter gives its
micro-LoRA (``export/safetensors.rs``), in PEFT's orientation: ``lora_A`` is ``[r,
in]``, ``lora_B`` is ``[out, r]``, and the adapter adds ``B @ A @ x * scaling`` with
``scaling = 1/sqrt(rank)``. The gradient sums are float64 as in the ledger, so a
restored engine continues exactly where the checkpointed one stopped.

``__metadata__`` (all values strings): ``format`` = ``sona_shm.adapter``,
``format_version`` (2; version 1 files, written before the routing rule, are read as
reference-rule engines without routes), every :class:`~sona_shm.config.EngineConfig`
field, ``route_names`` (a JSON list), ``scaling``, ``generation``, ``pending``, the
four metrics, ``corrupt``, ``last_flush_at`` and ``written_at``.

Restoring validates everything first — the file's structure, names, dtypes, shapes
against the engine, its rule and route table, finiteness, the counters' ranges and
consistency — and changes nothing when any of it fails (:class:`CheckpointError`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..config import EngineConfig
from ..errors import CheckpointError, FleetError, FlusherRunningError, InvalidInputError
from ..learn.routes import RouteTable
from ..shm.layout import LOCK_FLUSHER, Layout, read_route_table
from ..shm.ledger import Ledger
from ..shm.segment import Segment
from .tensorfile import decode, encode, read_file, write_atomic

FORMAT = "sona_shm.adapter"
FORMAT_VERSION = "2"
_READABLE_VERSIONS = ("1", FORMAT_VERSION)

DOWN = "base_model.model.layers.0.self_attn.micro_lora_A.weight"
UP_T = "base_model.model.layers.0.self_attn.micro_lora_B.weight"
GRAD_UP = "sona.grad_up"
GRAD_DOWN = "sona.grad_down"
ROUTES = "sona.routes"
ROUTE_CHOSEN = "sona.route_chosen"
ROUTE_BEST = "sona.route_best"
ROUTE_REWARD = "sona.route_reward"

#: The ledger counters a checkpoint carries (``generation`` is handled apart: see :func:`restore`).
COUNTERS = ("pending", "trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied", "corrupt")
#: Counters and the generation stay below this, so that the engine can count on for centuries
#: without any uint64 word overflowing (2**62 events at a billion per second is 146 years).
COUNTER_MAX = 2**62

_CONFIG_FIELDS = tuple(f.name for f in fields(EngineConfig))
_CONFIG_KINDS: dict[str, type] = {"lr": float, "temperature": float, "rule": str}


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: ``down``/``up`` ``float32[rank, hidden_dim]``, gradient sums float64, routes and counts."""

    config: EngineConfig
    down: np.ndarray
    up: np.ndarray
    grad_up: np.ndarray
    grad_down: np.ndarray
    routes: RouteTable | None
    route_chosen: np.ndarray
    route_best: np.ndarray
    route_reward: np.ndarray
    generation: int
    counters: dict[str, int]
    last_flush_at: float

    @classmethod
    def from_record(cls, record: np.void, config: EngineConfig, routes: RouteTable | None) -> Checkpoint:
        """The checkpoint of one ledger record (a consistent snapshot) of an engine with ``config`` and ``routes``."""
        return cls(
            config,
            np.array(record["down"]),
            np.array(record["up"]),
            np.array(record["grad_up"]),
            np.array(record["grad_down"]),
            routes,
            np.array(record["route_chosen"]),
            np.array(record["route_best"]),
            np.array(record["route_reward"]),
            int(record["generation"]),
            {name: int(record[name]) for name in COUNTERS},
            float(record["last_flush_at"]),
        )

    def check_fits(self, layout: Layout, where: str, routes: RouteTable | None = None) -> None:
        """Refuse a checkpoint that does not fit the engine of ``layout`` (shapes, rule, route table, pending count).

        ``routes``: the engine's table, when the engine exists already (a restore).
        """
        for name in ("hidden_dim", "rank", "rule", "routes"):
            ours, theirs = getattr(layout.config, name), getattr(self.config, name)
            if ours != theirs:
                raise CheckpointError(f"{where}: {name} is {theirs!r}, the engine's is {ours!r}; nothing restored")
        if routes is not None and self.routes is not None and not routes.same_as(self.routes):
            raise CheckpointError(f"{where}: its route table differs from the engine's (names or vectors); nothing restored")
        if self.counters["pending"] >= layout.config.flush_threshold:
            raise CheckpointError(
                f"{where}: {self.counters['pending']} pending signals, the engine flushes at {layout.config.flush_threshold}; "
                "nothing restored"
            )

    def apply(self, record: np.void, generation: int) -> None:
        """Write the learned state into ledger ``record``; lane tails and buffer positions are kept."""
        record["down"] = self.down
        record["up"] = self.up
        record["grad_up"] = self.grad_up
        record["grad_down"] = self.grad_down
        record["route_chosen"] = self.route_chosen
        record["route_best"] = self.route_best
        record["route_reward"] = self.route_reward
        for name, value in self.counters.items():
            record[name] = value
        record["last_flush_at"] = self.last_flush_at
        record["generation"] = generation

    def to_bytes(self) -> bytes:
        cfg = self.config
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION}
        metadata.update({name: str(getattr(cfg, name)) if name == "rule" else repr(getattr(cfg, name)) for name in _CONFIG_FIELDS})
        metadata["route_names"] = json.dumps(list(self.routes.names) if self.routes is not None else [])
        metadata["scaling"] = repr(1.0 / math.sqrt(cfg.rank))
        metadata["generation"] = str(self.generation)
        metadata.update({name: str(value) for name, value in self.counters.items()})
        metadata["last_flush_at"] = repr(self.last_flush_at)
        metadata["written_at"] = repr(time.time())
        tensors: dict[str, np.ndarray] = {
            DOWN: self.down.astype(np.float32),
            UP_T: self.up.astype(np.float32).T,
            GRAD_UP: self.grad_up.astype(np.float64),
            GRAD_DOWN: self.grad_down.astype(np.float64),
        }
        if self.routes is not None:
            tensors[ROUTES] = self.routes.vectors
            tensors[ROUTE_CHOSEN] = self.route_chosen.astype(np.uint64)
            tensors[ROUTE_BEST] = self.route_best.astype(np.uint64)
            tensors[ROUTE_REWARD] = self.route_reward.astype(np.float64)
        return encode(tensors, metadata)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Checkpoint:
        """Parse and validate checkpoint bytes; :class:`CheckpointError` names ``where`` and the problem."""
        tensors, meta = decode(data, where)

        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{where}: {why}; nothing restored")

        if meta.get("format") != FORMAT:
            raise bad(f"not a sona_shm adapter checkpoint (metadata format is {meta.get('format')!r}, expected {FORMAT!r})")
        version = meta.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise bad(f"checkpoint format version {version!r}, this sona_shm reads versions {', '.join(map(repr, _READABLE_VERSIONS))}")
        legacy = version == "1"  # before the routing rule: a reference engine without routes
        values: dict[str, Any] = {}
        for name in _CONFIG_FIELDS:
            if legacy and name in ("rule", "routes", "temperature"):
                continue
            if name == "fleet_outbox" and name not in meta:
                continue  # written before fleets: no outbox
            values[name] = _value(meta, name, _CONFIG_KINDS.get(name, int), bad)
        try:
            config = EngineConfig(**values)
        except InvalidInputError as exc:
            raise bad(f"invalid engine configuration in its metadata ({exc})") from None
        counters = {name: (0 if legacy and name == "corrupt" else _value(meta, name, int, bad)) for name in COUNTERS}
        generation = _value(meta, "generation", int, bad)
        last_flush_at = _value(meta, "last_flush_at", float, bad)
        if counters["pending"] != counters["signals_accumulated"] - counters["updates_applied"]:
            raise bad(
                f"inconsistent counters: pending {counters['pending']} != signals_accumulated "
                f"{counters['signals_accumulated']} - updates_applied {counters['updates_applied']}"
            )

        r, h, k = config.rank, config.hidden_dim, config.routes
        expected: dict[str, tuple[Any, tuple[int, ...]]] = {DOWN: (np.float32, (r, h)), UP_T: (np.float32, (h, r))}
        expected[GRAD_UP] = (np.float64, (r, h))
        if not legacy:
            expected[GRAD_DOWN] = (np.float64, (r, h))
        if k:
            expected.update(
                {
                    ROUTES: (np.float32, (k, h)),
                    ROUTE_CHOSEN: (np.uint64, (k,)),
                    ROUTE_BEST: (np.uint64, (k,)),
                    ROUTE_REWARD: (np.float64, (k,)),
                }
            )
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise bad(f"expected exactly the tensors {sorted(expected)}; missing {missing}, unexpected {extra}")
        routes_note = f", {k} routes" if k else ""
        for name, (dtype, shape) in expected.items():
            arr = tensors[name]
            if arr.dtype != np.dtype(dtype) or arr.shape != shape:
                want = {np.float32: "F32", np.float64: "F64", np.uint64: "U64"}[dtype]
                raise bad(
                    f"tensor {name!r}: expected {want} {list(shape)} (rank {r}, hidden_dim {h}{routes_note}), "
                    f"got {arr.dtype} {list(arr.shape)}"
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                index = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
                raise bad(f"tensor {name!r}: non-finite value {arr[index]} at {list(index)}")
            if arr.dtype.kind == "u" and (arr >= COUNTER_MAX).any():
                raise bad(f"tensor {name!r}: a count of {int(arr.max())} is out of range (expected < 2**62)")
        routes = None
        names = _route_names(meta, k, legacy, bad)
        if k:
            try:
                routes = RouteTable.build(tensors[ROUTES], names, hidden_dim=h, where="route table")
            except InvalidInputError as exc:
                raise bad(str(exc)) from None
        zeros_k = np.zeros(k, np.uint64)
        return cls(
            config,
            tensors[DOWN],
            np.ascontiguousarray(tensors[UP_T].T),
            tensors[GRAD_UP],
            tensors[GRAD_DOWN] if not legacy else np.zeros((r, h), np.float64),
            routes,
            tensors.get(ROUTE_CHOSEN, zeros_k),
            tensors.get(ROUTE_BEST, zeros_k),
            tensors.get(ROUTE_REWARD, np.zeros(k, np.float64)),
            generation,
            counters,
            last_flush_at,
        )


def _route_names(meta: dict[str, str], k: int, legacy: bool, bad: Any) -> list[str]:
    if legacy:
        return []
    text = meta.get("route_names")
    if text is None:
        raise bad("metadata 'route_names' is missing")
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, str) for n in names):
        raise bad(f"metadata 'route_names': expected a JSON list of {k} strings, got {text!r}")
    return names


def _value(meta: dict[str, str], name: str, kind: type, bad: Any) -> Any:
    text = meta.get(name)
    if text is None:
        raise bad(f"metadata {name!r} is missing")
    if kind is str:
        return text
    try:
        value = kind(text)
    except ValueError:
        raise bad(f"metadata {name!r}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is int and not 0 <= value < COUNTER_MAX:
        raise bad(f"metadata {name!r}: expected an integer in [0, 2**62), got {text!r}")
    if kind is float and not (math.isfinite(value) and (name in ("lr", "temperature") or value >= 0)):
        raise bad(f"metadata {name!r}: expected a finite number, got {text!r}")
    return value


#: No checkpoint of any valid engine is larger (rank 2, hidden_dim 65535: 2 MiB of tensors).
MAX_CHECKPOINT_BYTES = 16 * 2**20


def read_checkpoint(path: str) -> Checkpoint:
    """Read and validate the checkpoint at ``path``; :class:`CheckpointError` if anything is wrong."""
    return Checkpoint.from_bytes(read_file(path, MAX_CHECKPOINT_BYTES), f"checkpoint {path}")


def write_checkpoint(path: str, checkpoint: Checkpoint, mode: int) -> None:
    """Write ``checkpoint`` to ``path`` atomically (see :func:`~sona_shm.tensorfile.write_atomic`)."""
    try:
        write_atomic(path, checkpoint.to_bytes(), mode)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot write it ({exc.strerror or exc}); the previous file, if any, is intact") from None


def engine_checkpoint(name: str) -> tuple[Checkpoint, int]:
    """Engine ``name``'s committed state and the segment's mode; no lock taken, nothing written."""
    segment = Segment.open(name, writable=False)
    try:
        ledger = Ledger(segment)
        try:
            return Checkpoint.from_record(ledger.snapshot()[0], segment.layout.config, read_route_table(segment)), segment.mode
        finally:
            ledger.close()
    finally:
        segment.close()


def checkpoint_segment(name: str, path: str) -> Checkpoint:
    """Write engine ``name``'s committed state to ``path``; takes no lock, writes nothing into the segment.

    The file gets the segment's permissions (0600, or 0660 for a ``--group`` engine).
    """
    checkpoint, mode = engine_checkpoint(name)
    write_checkpoint(path, checkpoint, mode)
    return checkpoint


def restore(name: str, path: str) -> int:
    """Replace engine ``name``'s learned state by the checkpoint at ``path``; return the new generation.

    Only while no flusher runs: holds the flusher lock for the duration, so no flusher
    can start meanwhile. Validates the whole file first, then publishes one ledger
    commit (the flusher's own mechanism), so a crash at any instant leaves the old state
    or the new one. The generation becomes ``max(engine's, file's) + 1`` so that every
    attached worker reloads the weights. Trajectories committed but not yet learned stay
    in their lanes and are learned on top of the restored state.
    """
    checkpoint = read_checkpoint(path)
    segment = Segment.open(name, writable=True)
    try:
        if not segment.try_lock(LOCK_FLUSHER):
            raise FlusherRunningError(
                f"segment {name!r} has a live flusher; stop it (SIGTERM) before restoring, or start it with --checkpoint on a new segment"
            )
        checkpoint.check_fits(segment.layout, f"checkpoint {path}", read_route_table(segment))
        ledger = Ledger(segment)
        try:
            record = ledger.snapshot()
            if record[0]["fleet_epoch"]:
                raise FleetError(
                    f"segment {name!r} is a replica of a fleet: its adapter is the fleet's and changes only through the fleet's "
                    "stream; restore the checkpoint into a segment outside the fleet, or destroy this one and let it join again"
                )
            generation = max(int(record[0]["generation"]), checkpoint.generation) + 1  # < 2**62 + 1: both are range-checked
            checkpoint.apply(record[0], generation)
            ledger.publish(record)
        finally:
            ledger.close()
        return generation
    finally:
        segment.close()  # also drops the flusher lock
