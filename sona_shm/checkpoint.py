"""Adapter checkpoints: an engine's learned state in a safetensors file, and restoring it as a transaction.

A checkpoint is what the ledger holds apart from lane and buffer positions: the adapter,
the pending gradients and the counters, plus the engine's configuration. It is a
safetensors file (:mod:`sona_shm.tensorfile`) that standard tools read::

    base_model.model.layers.0.self_attn.micro_lora_A.weight  F32 [rank, hidden_dim]  down
    base_model.model.layers.0.self_attn.micro_lora_B.weight  F32 [hidden_dim, rank]  up, transposed
    sona.grad_up                                             F64 [rank, hidden_dim]  pending gradient sums

The two adapter tensors have the names and shapes the Rust crate's exporter gives its
micro-LoRA (``export/safetensors.rs``), which are PEFT's conventions: ``lora_A`` is
``[r, in]``, ``lora_B`` is ``[out, r]``, and the adapter adds ``B @ A @ x * scaling``
with ``scaling = 1/sqrt(rank)`` (PEFT's ``use_rslora`` with ``lora_alpha = 1``).
``sona.grad_up`` is float64 as in the ledger, so a restored engine continues exactly
where the checkpointed one stopped, pending gradients included.

``__metadata__`` (all values strings): ``format`` = ``sona_shm.adapter``,
``format_version``, every :class:`~sona_shm.layout.EngineConfig` field, ``scaling``,
``generation``, ``pending``, the four metrics, ``last_flush_at`` and ``written_at``.

Restoring validates everything first — the file's structure, names, dtypes, shapes
against the engine, finiteness, the counters' consistency — and changes nothing when
any of it fails (:class:`CheckpointError`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np

from .errors import CheckpointError, FlusherRunningError, InvalidInputError
from .layout import LOCK_FLUSHER, EngineConfig, Layout
from .ledger import Ledger
from .segment import Segment
from .tensorfile import decode, encode, read_file, write_atomic

FORMAT = "sona_shm.adapter"
FORMAT_VERSION = "1"

DOWN = "base_model.model.layers.0.self_attn.micro_lora_A.weight"
UP_T = "base_model.model.layers.0.self_attn.micro_lora_B.weight"
GRAD_UP = "sona.grad_up"

#: The ledger counters a checkpoint carries (``generation`` is handled apart: see :func:`restore`).
COUNTERS = ("pending", "trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied")

_CONFIG_FIELDS = tuple(f.name for f in fields(EngineConfig))
#: The largest integer a checkpoint may carry (counters, generation, configuration): a
#: signed 64-bit integer, which leaves 2**63 increments before a ledger word would wrap.
#: (A generation of 2**64 - 1 once passed, then crash-looped the flusher with
#: OverflowError at its first flush, and made ``restore`` overflow at once.)
COUNTER_MAX = 2**63 - 1


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: ``down``/``up`` ``float32[rank, hidden_dim]``, ``grad_up`` float64."""

    config: EngineConfig
    down: np.ndarray
    up: np.ndarray
    grad_up: np.ndarray
    generation: int
    counters: dict[str, int]
    last_flush_at: float

    @classmethod
    def from_record(cls, record: np.void, config: EngineConfig) -> Checkpoint:
        """The checkpoint of one ledger record (a consistent snapshot) of an engine with ``config``."""
        return cls(
            config,
            np.array(record["down"]),
            np.array(record["up"]),
            np.array(record["grad_up"]),
            int(record["generation"]),
            {name: int(record[name]) for name in COUNTERS},
            float(record["last_flush_at"]),
        )

    def check_fits(self, layout: Layout, where: str) -> None:
        """Refuse a checkpoint whose shapes or pending count do not fit the engine of ``layout``."""
        for name in ("hidden_dim", "rank"):
            ours, theirs = getattr(layout.config, name), getattr(self.config, name)
            if ours != theirs:
                raise CheckpointError(f"{where}: {name} is {theirs}, the engine's is {ours}; nothing restored")
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
        for name, value in self.counters.items():
            record[name] = value
        record["last_flush_at"] = self.last_flush_at
        record["generation"] = generation

    def to_bytes(self) -> bytes:
        cfg = self.config
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION}
        metadata.update({name: repr(getattr(cfg, name)) for name in _CONFIG_FIELDS})
        metadata["scaling"] = repr(1.0 / math.sqrt(cfg.rank))
        metadata["generation"] = str(self.generation)
        metadata.update({name: str(value) for name, value in self.counters.items()})
        metadata["last_flush_at"] = repr(self.last_flush_at)
        metadata["written_at"] = repr(time.time())
        tensors = {DOWN: self.down.astype(np.float32), UP_T: self.up.astype(np.float32).T, GRAD_UP: self.grad_up.astype(np.float64)}
        return encode(tensors, metadata)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Checkpoint:
        """Parse and validate checkpoint bytes; :class:`CheckpointError` names ``where`` and the problem."""
        tensors, meta = decode(data, where)

        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{where}: {why}; nothing restored")

        if meta.get("format") != FORMAT:
            raise bad(f"not a sona_shm adapter checkpoint (metadata format is {meta.get('format')!r}, expected {FORMAT!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise bad(f"checkpoint format version {meta.get('format_version')!r}, this sona_shm reads version {FORMAT_VERSION!r}")
        values = {}
        for name in _CONFIG_FIELDS:
            values[name] = _number(meta, name, float if name == "lr" else int, bad)
        try:
            config = EngineConfig(**values)
        except InvalidInputError as exc:
            raise bad(f"invalid engine configuration in its metadata ({exc})") from None
        counters = {name: _number(meta, name, int, bad) for name in COUNTERS}
        generation = _number(meta, "generation", int, bad)
        last_flush_at = _number(meta, "last_flush_at", float, bad)
        if counters["pending"] != counters["signals_accumulated"] - counters["updates_applied"]:
            raise bad(
                f"inconsistent counters: pending {counters['pending']} != signals_accumulated "
                f"{counters['signals_accumulated']} - updates_applied {counters['updates_applied']}"
            )

        r, h = config.rank, config.hidden_dim
        expected = {DOWN: (np.float32, (r, h)), UP_T: (np.float32, (h, r)), GRAD_UP: (np.float64, (r, h))}
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise bad(f"expected exactly the tensors {sorted(expected)}; missing {missing}, unexpected {extra}")
        for name, (dtype, shape) in expected.items():
            arr = tensors[name]
            if arr.dtype != np.dtype(dtype) or arr.shape != shape:
                want = "F32" if dtype is np.float32 else "F64"
                raise bad(f"tensor {name!r}: expected {want} {list(shape)} (rank {r}, hidden_dim {h}), got {arr.dtype} {list(arr.shape)}")
            if not np.isfinite(arr).all():
                index = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
                raise bad(f"tensor {name!r}: non-finite value {arr[index]} at {list(index)}")
        return cls(config, tensors[DOWN], np.ascontiguousarray(tensors[UP_T].T), tensors[GRAD_UP], generation, counters, last_flush_at)


def _number(meta: dict[str, str], name: str, kind: type, bad) -> int | float:
    text = meta.get(name)
    if text is None:
        raise bad(f"metadata {name!r} is missing")
    try:
        value = kind(text)
    except ValueError:
        raise bad(f"metadata {name!r}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is int and not 0 <= value <= COUNTER_MAX:
        raise bad(f"metadata {name!r}: expected an integer in [0, 2**63), got {text!r}")
    if kind is float and not (math.isfinite(value) and (name == "lr" or value >= 0)):
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


def checkpoint_segment(name: str, path: str) -> Checkpoint:
    """Write engine ``name``'s committed state to ``path``; takes no lock, writes nothing into the segment.

    The file gets the segment's permissions (0600, or 0660 for a ``--group`` engine).
    """
    segment = Segment.open(name, writable=False)
    try:
        ledger = Ledger(segment)
        try:
            checkpoint = Checkpoint.from_record(ledger.snapshot()[0], segment.layout.config)
        finally:
            ledger.close()
        write_checkpoint(path, checkpoint, segment.mode)
        return checkpoint
    finally:
        segment.close()


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
        checkpoint.check_fits(segment.layout, f"checkpoint {path}")
        ledger = Ledger(segment)
        try:
            record = ledger.snapshot()
            generation = max(int(record[0]["generation"]), checkpoint.generation) + 1
            checkpoint.apply(record[0], generation)
            ledger.publish(record)
        finally:
            ledger.close()
        return generation
    finally:
        segment.close()  # also drops the flusher lock
