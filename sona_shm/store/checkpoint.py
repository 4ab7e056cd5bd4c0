"""Adapter checkpoints: an engine's learned state in a safetensors file, and restoring it as a transaction.

A checkpoint is what the ledger holds apart from lane and buffer positions: the adapter,
the open window, the counters, the route table and what was learned of it, plus the
engine's configuration. It is a safetensors file (:mod:`sona_shm.store.tensorfile`) that
standard tools read::

    base_model.model.layers.0.self_attn.micro_lora_A.weight  F32 [rank, hidden_dim]  down
    base_model.model.layers.0.self_attn.micro_lora_B.weight  F32 [hidden_dim, rank]  up, transposed
    sona.grad_up                                             F64 [rank, hidden_dim]  the reference rule's pending sums
    -- with a route table of K routes (the routes in use: as created, added, retired):
    sona.routes                                              F32 [K, hidden_dim]     each route's vector as given
    sona.route_vectors, sona.route_bias                      F32 [K, h], F32 [K]     the published learned table
    sona.route_state                                         U8 [K]                  1 active, 2 retired
    sona.route_chosen, sona.route_best                       U64 [K]                 feedback counts per route
    sona.route_reward                                        F64 [K]                 summed reward per route
    -- and under the routing rule, the open window (learn/routing.py):
    sona.work_up, sona.work_down                             F32 [rank, hidden_dim]  the working adapter
    sona.work_vectors, sona.work_bias                        F32 [K, h], F32 [K]     the working route table
    sona.route_centre                                        F64 [hidden_dim]        the centre of the adapted queries

The two adapter tensors have the names and shapes the Rust crate's exporter gives its
micro-LoRA (``export/safetensors.rs``), in PEFT's orientation: ``lora_A`` is ``[r,
in]``, ``lora_B`` is ``[out, r]``, and the adapter adds ``B @ A @ x * scaling`` with
``scaling = 1/sqrt(rank)``. The open window is kept exactly (float64 sums, the working
copy), so a restored engine continues where the checkpointed one stopped.

``__metadata__`` (all values strings): ``format`` = ``sona_shm.adapter``,
``format_version`` (3), every :class:`~sona_shm.config.EngineConfig` field,
``route_names`` (a JSON list), ``scaling``, ``generation``, ``pending``, the four metrics,
``corrupt``, ``last_flush_at`` and ``written_at``; and, in files of this version that have
them, ``engine_id`` (16 hex digits: the engine whose state it is; a rollback takes only
its own engine's files), ``paused`` (0 learning, 1 paused by a request, 2 by the reward
guard: a new engine made from the file starts so) and ``moving_reward`` (the mean reward of
the last feedbacks when it was written, as the flusher measured it; absent when unknown). Older files still restore: version 1
(before routes) as a reference-rule engine without routes; version 2 (before the learned
route table) with its route vectors and biases at their start, and a routing-rule file's
open window applied as that rule's flush would have applied it (its adapter, ``U`` and
``D``, keeps routing through ``forward()``).

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
from ..learn.learner import STATE_ARRAYS, apply_sums
from ..learn.routes import ACTIVE, RETIRED, RouteTable
from ..shm.layout import LOCK_FLUSHER, Layout, given_vectors
from ..shm.ledger import Ledger, read_route_table, route_table_of
from ..shm.segment import Segment
from .tensorfile import decode, encode, read_file, write_atomic

FORMAT = "sona_shm.adapter"
FORMAT_VERSION = "3"
_READABLE_VERSIONS = ("1", "2", FORMAT_VERSION)

DOWN = "base_model.model.layers.0.self_attn.micro_lora_A.weight"
UP_T = "base_model.model.layers.0.self_attn.micro_lora_B.weight"
GRAD_UP = "sona.grad_up"
GRAD_DOWN = "sona.grad_down"  # version 2, routing rule: the old rule's pending sums of down
ROUTES = "sona.routes"
#: The tensors of a table of K routes: the ledger's per-route arrays of the same names (``sona.<name>``), K rows.
ROUTE_TENSORS = ("route_vectors", "route_bias", "route_state", "route_chosen", "route_best", "route_reward")
#: The routing rule's working state (``sona.<name>``): the adapter's, the route table's (K rows) and the centre.
WORK_TENSORS = ("work_up", "work_down", "work_vectors", "work_bias", "route_centre")
_PER_ROUTE = {"route_vectors", "route_bias", "route_state", "route_chosen", "route_best", "route_reward", "work_vectors", "work_bias"}

#: What a rollback keeps of the engine's record although the checkpoint has it: what was observed, not learned.
ROLLBACK_KEEPS = ("trajectories_processed", "corrupt", "route_chosen", "route_best", "route_reward")
#: The ledger counters a checkpoint carries (``generation`` is handled apart: see :func:`restore`).
COUNTERS = ("pending", "trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied", "corrupt")
#: Counters and the generation stay below this, so that the engine can count on for centuries
#: without any uint64 word overflowing (2**62 events at a billion per second is 146 years).
COUNTER_MAX = 2**62

#: How a file names each dtype (safetensors' names), for messages.
_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.uint64): "U64", np.dtype(np.uint8): "U8"}
_CONFIG_FIELDS = tuple(f.name for f in fields(EngineConfig))
_CONFIG_KINDS: dict[str, type] = {"lr": float, "temperature": float, "adapter_lr": float, "rule": str}
#: Config fields a file of an older format may lack, and what they were then.
_ADDED_FIELDS: dict[str, Any] = {"fleet_outbox": 0, "max_routes": 0, "adapter_lr": 0.0}


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: the engine's ``config``, its ``routes`` (K in use, as given, with names and retired
    flags; None without a table), the learner's state ``arrays`` by ledger field name (per-route arrays of K rows;
    only those the rule has), the generation, counters and the time of the last flush."""

    config: EngineConfig
    routes: RouteTable | None
    arrays: dict[str, np.ndarray]
    generation: int
    counters: dict[str, int]
    last_flush_at: float
    engine_id: int = 0  # the engine whose state it is (0: unknown, a file of an older version)
    written_at: float = 0.0  # unix time it was taken (0: not yet written)
    paused: int = 0  # the engine's learning when it was taken (layout.LEARNING, PAUSED_BY_REQUEST, PAUSED_BY_GUARD)
    moving_reward: float | None = None  # the moving reward then (None: not known)

    @property
    def down(self) -> np.ndarray:
        return self.arrays["down"]

    @property
    def up(self) -> np.ndarray:
        return self.arrays["up"]

    @classmethod
    def from_record(
        cls,
        record: np.void,
        config: EngineConfig,
        routes: RouteTable | None,
        *,
        moving_reward: float | None = None,
        written_at: float | None = None,
    ) -> Checkpoint:
        """The checkpoint of one ledger record (a consistent snapshot) of an engine with ``config`` and ``routes`` (the
        record's table: :func:`~sona_shm.shm.ledger.read_route_table` of the same snapshot's segment).

        ``moving_reward``: the mean reward of the last feedbacks now, if known; ``written_at``: the time it is
        taken (default: now)."""
        k = 0 if routes is None else len(routes)
        arrays = {name: np.array(record[name][:k] if name in _PER_ROUTE else record[name]) for name in _state_names(config, k)}
        return cls(
            config,
            routes,
            arrays,
            int(record["generation"]),
            {name: int(record[name]) for name in COUNTERS},
            float(record["last_flush_at"]),
            engine_id=int(record["engine_id"]),
            written_at=time.time() if written_at is None else written_at,
            paused=int(record["paused"]),
            moving_reward=moving_reward,
        )

    def check_fits(self, layout: Layout, where: str, routes: RouteTable | None = None) -> None:
        """Refuse a checkpoint that does not fit the engine of ``layout`` (shapes, rule, route table, pending count).

        ``routes``: the engine's table, when the engine exists already (a restore): its first routes must be the
        checkpoint's (routes added since start from their vectors as given; names and retirements stay the engine's).
        """
        for name in ("hidden_dim", "rank", "rule"):
            ours, theirs = getattr(layout.config, name), getattr(self.config, name)
            if ours != theirs:
                raise CheckpointError(f"{where}: {name} is {theirs!r}, the engine's is {ours!r}; nothing restored")
        k = 0 if self.routes is None else len(self.routes)
        if (k == 0) != (layout.max_routes == 0):
            raise CheckpointError(
                f"{where}: it has {k} routes, the engine {'has' if layout.max_routes else 'has no'} route table; nothing restored"
            )
        if k > layout.max_routes:
            raise CheckpointError(f"{where}: it has {k} routes, the engine reserves {layout.max_routes} (--max-routes); nothing restored")
        if routes is not None and self.routes is not None and not routes.starts_with(self.routes):
            raise CheckpointError(
                f"{where}: its {k} routes are not the engine's first routes (their vectors as given differ, or the engine has fewer); "
                "nothing restored"
            )
        if self.counters["pending"] >= layout.config.flush_threshold:
            raise CheckpointError(
                f"{where}: {self.counters['pending']} pending signals, the engine flushes at {layout.config.flush_threshold}; "
                "nothing restored"
            )

    def apply(self, record: np.void, generation: int, given: np.ndarray | None = None) -> None:
        """Write the learned state into ledger ``record``; lane tails and buffer positions are kept.

        The checkpoint's routes take rows ``[0, K)``; routes the engine added since restart from their vectors
        as given (``given``: the segment's route region), with no counts. Names, retirements and
        ``routes_used`` are written only into a new engine's record (``given`` None): a restore keeps the engine's."""
        k = 0 if self.routes is None else len(self.routes)
        for name, value in self.arrays.items():
            if name == "route_state" and given is not None:
                continue  # retirements are the engine's (an operator's decision, not something learned)
            if name in _PER_ROUTE:
                record[name][:k] = value
            else:
                record[name] = value
        used = int(record["routes_used"])
        if given is not None and used > k:
            unit = (given[k:used].astype(np.float64) / np.linalg.norm(given[k:used].astype(np.float64), axis=1)[:, None]).astype(np.float32)
            for name in ("route_vectors", "work_vectors"):
                if len(record[name]):
                    record[name][k:used] = unit
            for name in ("route_bias", "work_bias", "route_chosen", "route_best", "route_reward"):
                if len(record[name]):
                    record[name][k:used] = 0
        if given is None and self.routes is not None:
            record["routes_used"] = k
            record["route_names"][:k] = self.routes.names_bytes()
        if given is None:  # a new engine made from the file is the file's engine, paused if it was
            if self.engine_id:
                record["engine_id"] = self.engine_id
            record["paused"] = self.paused
        for counter, count in self.counters.items():
            record[counter] = count
        record["last_flush_at"] = self.last_flush_at
        record["generation"] = generation

    def roll_back(self, record: np.void, generation: int, given: np.ndarray) -> int:
        """Roll the learned state in ledger ``record`` back to this checkpoint's (checked to fit); the signals discarded.

        What was learned is replaced, as :meth:`apply` does — the adapter, the learned route table, the open window
        and the counters that schedule the windows (``pending``, ``signals_accumulated``, ``updates_applied``,
        ``flushes_performed``) — and what was observed is kept (:data:`ROLLBACK_KEEPS`: trajectories taken in, corrupt
        slots, per-route feedback counts), as are lane and buffer positions, names and retirements, pause and guard
        state. Discarded: the signals learned since the checkpoint, ``signals_accumulated`` before minus the
        checkpoint's (0 when the checkpoint is ahead of the engine, after an earlier rollback).
        """
        kept = {name: np.array(record[name]) for name in ROLLBACK_KEEPS}
        before = int(record["signals_accumulated"])
        self.apply(record, generation, given)
        for name, value in kept.items():
            record[name] = value
        return max(0, before - self.counters["signals_accumulated"])

    def to_bytes(self) -> bytes:
        cfg = self.config
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION}
        metadata.update({name: str(getattr(cfg, name)) if name == "rule" else repr(getattr(cfg, name)) for name in _CONFIG_FIELDS})
        metadata["route_names"] = json.dumps(list(self.routes.names) if self.routes is not None else [])
        metadata["scaling"] = repr(1.0 / math.sqrt(cfg.rank))
        metadata["generation"] = str(self.generation)
        metadata.update({name: str(value) for name, value in self.counters.items()})
        metadata["last_flush_at"] = repr(self.last_flush_at)
        metadata["written_at"] = repr(self.written_at or time.time())
        if self.engine_id:
            metadata["engine_id"] = f"{self.engine_id:016x}"
        metadata["paused"] = str(self.paused)
        if self.moving_reward is not None:
            metadata["moving_reward"] = repr(self.moving_reward)
        tensors: dict[str, np.ndarray] = {DOWN: self.down.astype(np.float32), UP_T: self.up.astype(np.float32).T}
        tensors.update({f"sona.{name}": value for name, value in self.arrays.items() if name not in ("down", "up")})
        if self.routes is not None:
            tensors[ROUTES] = self.routes.vectors
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
        values: dict[str, Any] = {}
        for name in _CONFIG_FIELDS:
            if version == "1" and name in ("rule", "routes", "temperature"):
                continue  # before the routing rule: a reference engine without routes
            if name in _ADDED_FIELDS and name not in meta:
                continue
            values[name] = _value(meta, name, _CONFIG_KINDS.get(name, int), bad)
        try:
            config = EngineConfig(**values)
        except InvalidInputError as exc:
            raise bad(f"invalid engine configuration in its metadata ({exc})") from None
        counters = {name: (0 if version == "1" and name == "corrupt" else _value(meta, name, int, bad)) for name in COUNTERS}
        generation = _value(meta, "generation", int, bad)
        last_flush_at = _value(meta, "last_flush_at", float, bad)
        if counters["pending"] != counters["signals_accumulated"] - counters["updates_applied"]:
            raise bad(
                f"inconsistent counters: pending {counters['pending']} != signals_accumulated "
                f"{counters['signals_accumulated']} - updates_applied {counters['updates_applied']}"
            )
        names = _route_names(meta, version == "1", bad)
        k = len(names)
        if k != config.routes if version != "3" else k < config.routes:  # a table grows by routes added, never shrinks
            raise bad(
                f"metadata 'route_names': expected {'' if version != '3' else 'at least '}{config.routes} names (its 'routes'), got {k}"
            )
        if k > config.max_routes:
            raise bad(f"metadata 'route_names': {k} routes, more than its max_routes {config.max_routes}")
        r, h = config.rank, config.hidden_dim
        expected: dict[str, tuple[type, tuple[int, ...]]] = {DOWN: (np.float32, (r, h)), UP_T: (np.float32, (h, r))}
        expected.update({f"sona.{name}": spec for name, spec in _state_specs(config, k, version).items() if name not in ("down", "up")})
        if k:
            expected[ROUTES] = (np.float32, (k, h))
        if version == "2" and config.rule == "routing":
            expected[GRAD_DOWN] = (np.float64, (r, h))
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise bad(f"expected exactly the tensors {sorted(expected)}; missing {missing}, unexpected {extra}")
        routes_note = f", {k} routes" if k else ""
        for name, (dtype, shape) in expected.items():
            arr = tensors[name]
            if arr.dtype != np.dtype(dtype) or arr.shape != shape:
                want = _DTYPE_NAMES[np.dtype(dtype)]
                raise bad(
                    f"tensor {name!r}: expected {want} {list(shape)} (rank {r}, hidden_dim {h}{routes_note}), "
                    f"got {arr.dtype} {list(arr.shape)}"
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                index = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
                raise bad(f"tensor {name!r}: non-finite value {arr[index]} at {list(index)}")
            if arr.dtype.kind == "u" and (arr >= COUNTER_MAX).any():
                raise bad(f"tensor {name!r}: a count of {int(arr.max())} is out of range (expected < 2**62)")
        state = tensors.get("sona.route_state")
        if state is not None and not np.isin(state, (ACTIVE, RETIRED)).all():
            raise bad(f"tensor 'sona.route_state': expected 1 (active) or 2 (retired) per route, got {sorted(set(state.tolist()))}")
        if state is not None and not (state == ACTIVE).any():
            raise bad("tensor 'sona.route_state': no route is active")
        routes = None
        if k:
            try:
                routes = RouteTable.from_stored(
                    tensors[ROUTES], RouteTable.build(tensors[ROUTES], names).names_bytes(), "route table", state
                )
            except InvalidInputError as exc:
                raise bad(str(exc)) from None
        arrays = {"down": tensors[DOWN], "up": np.ascontiguousarray(tensors[UP_T].T)}
        arrays.update({name: tensors[f"sona.{name}"] for name in _state_specs(config, k, version) if f"sona.{name}" in tensors})
        if version != "3":
            _upgrade(arrays, config, routes, counters, tensors.get(GRAD_DOWN))
        written_at = _value(meta, "written_at", float, bad) if "written_at" in meta else 0.0
        engine_id, paused, moving_reward = _provenance(meta, bad)
        return cls(
            config,
            routes,
            arrays,
            generation,
            counters,
            last_flush_at,
            engine_id=engine_id,
            written_at=written_at,
            paused=paused,
            moving_reward=moving_reward,
        )


def _state_names(config: EngineConfig, k: int) -> tuple[str, ...]:
    """The learner's state arrays a checkpoint of ``config`` with ``k`` routes carries (:data:`STATE_ARRAYS` the rule has)."""
    names = ["down", "up", "grad_up"]
    if k:
        names += ROUTE_TENSORS
    if config.rule == "routing":
        names += WORK_TENSORS
    assert set(names) <= set(STATE_ARRAYS)
    return tuple(names)


def _state_specs(config: EngineConfig, k: int, version: str) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """dtype and shape of each state array a file of ``version`` carries for ``config`` and ``k`` routes."""
    r, h = config.rank, config.hidden_dim
    specs: dict[str, tuple[Any, tuple[int, ...]]] = {
        "down": (np.float32, (r, h)),
        "up": (np.float32, (r, h)),
        "grad_up": (np.float64, (r, h)),
        "route_vectors": (np.float32, (k, h)),
        "route_bias": (np.float32, (k,)),
        "route_state": (np.uint8, (k,)),
        "route_chosen": (np.uint64, (k,)),
        "route_best": (np.uint64, (k,)),
        "route_reward": (np.float64, (k,)),
        "work_up": (np.float32, (r, h)),
        "work_down": (np.float32, (r, h)),
        "work_vectors": (np.float32, (k, h)),
        "work_bias": (np.float32, (k,)),
        "route_centre": (np.float64, (h,)),
    }
    names = _state_names(config, k)
    if version != "3":  # before the learned route table: only the counts of it
        names = tuple(n for n in names if n in ("down", "up", "grad_up", "route_chosen", "route_best", "route_reward"))
    return {name: specs[name] for name in names}


def _upgrade(
    arrays: dict[str, np.ndarray], config: EngineConfig, routes: RouteTable | None, counters: dict[str, int], grad_down: Any
) -> None:
    """A version 1 or 2 file's state as this version keeps it, in place: the route table at its start (unit vectors,
    no bias, every route active) and, under the routing rule, the old rule's open window applied as its flush
    would have (``up``/``down += lr * sums / pending``), then the working copy equal to the published state."""
    k = 0 if routes is None else len(routes)
    if k:
        arrays["route_vectors"] = routes.unit.copy() if routes is not None else np.zeros((0, config.hidden_dim), np.float32)
        arrays["route_bias"] = np.zeros(k, np.float32)
        arrays["route_state"] = np.full(k, ACTIVE, np.uint8)
    if config.rule != "routing":
        return
    pending = counters["pending"]
    if pending:
        apply_sums(arrays["up"], arrays["down"], arrays["grad_up"], grad_down, config.lr / pending)
        counters["updates_applied"] += pending
        counters["flushes_performed"] += 1
        counters["pending"] = 0
    arrays["grad_up"] = np.zeros_like(arrays["grad_up"])
    arrays["work_up"], arrays["work_down"] = arrays["up"].copy(), arrays["down"].copy()
    arrays["work_vectors"], arrays["work_bias"] = arrays["route_vectors"].copy(), arrays["route_bias"].copy()
    arrays["route_centre"] = np.zeros(config.hidden_dim, np.float64)


def _provenance(meta: dict[str, str], bad: Any) -> tuple[int, int, float | None]:
    """``(engine_id, paused, moving_reward)`` from a file's metadata (each optional: 0, 0, None)."""
    engine_id = 0
    if "engine_id" in meta:
        text = meta["engine_id"]
        try:
            engine_id = int(text, 16) if len(text) == 16 else -1
        except ValueError:
            engine_id = -1
        if not 0 < engine_id < 2**64:
            raise bad(f"metadata 'engine_id': expected 16 hex digits, not all zero, got {text!r}")
    paused = 0
    if "paused" in meta:
        paused = {"0": 0, "1": 1, "2": 2}.get(meta["paused"], -1)
        if paused < 0:
            raise bad(f"metadata 'paused': expected 0, 1 or 2, got {meta['paused']!r}")
    moving = None
    if "moving_reward" in meta:
        try:
            moving = float(meta["moving_reward"])
        except ValueError:
            moving = math.nan
        if not math.isfinite(moving):
            raise bad(f"metadata 'moving_reward': expected a finite number, got {meta['moving_reward']!r}")
    return engine_id, paused, moving


def _route_names(meta: dict[str, str], legacy: bool, bad: Any) -> list[str]:
    if legacy:
        return []
    text = meta.get("route_names")
    if text is None:
        raise bad("metadata 'route_names' is missing")
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad(f"metadata 'route_names': expected a JSON list of strings, got {text!r}")
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
    if kind is float and not (math.isfinite(value) and (name in ("lr", "temperature", "adapter_lr") or value >= 0)):
        raise bad(f"metadata {name!r}: expected a finite number, got {text!r}")
    return value


#: No checkpoint of any valid engine is larger (hidden_dim 65535, rank 2, 256 routes under the routing rule: three
#: route tables of 64 MiB each, the adapter and the centre: about 200 MiB of tensors).
MAX_CHECKPOINT_BYTES = 256 * 2**20


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
            record = ledger.snapshot()[0]
            return Checkpoint.from_record(record, segment.layout.config, route_table_of(segment, record)), segment.mode
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
            checkpoint.apply(record[0], generation, given_vectors(segment.numpy_buffer(), segment.layout))
            ledger.publish(record)
        finally:
            ledger.close()
        return generation
    finally:
        segment.close()  # also drops the flusher lock
