"""Drained trajectories as rows a data team reads: JSON lines (no dependency) and Parquet (``pyarrow``), unpadded.

An ``.npz`` of :class:`~sona_shm.trajectory.TrajectoryBatch` pads every trajectory to
the engine's ``max_steps`` x ``hidden_dim`` plus attention (10,000 feedbacks of an
h = 384 reference-sized engine: 162 MB). A row holds only what was recorded — the
real steps, each with its real activations and attention:

- ``traj_id`` (int), ``query`` (h floats), ``quality`` (float: a feedback's reward;
  1.0 for a full-information one), ``latency_us`` (int);
- ``route`` (the route's name, or null), ``route_index`` (the route taken of a
  feedback, or null), ``best_index`` and ``best`` (the route that was right, by index
  and name, or null), ``reward`` (what the route taken earned, as the engine's route
  counts have it: a bandit feedback's reward, or 1.0 / 0.0 when a full-information one
  says whether it was the right one; null when no route was taken), ``probability``
  (the chance the route taken was chosen with, for off-policy evaluation; null when not
  recorded);
- ``steps``: a list of ``{"reward", "activations", "attention"}`` (``attention`` an
  empty list when the step had none).

:func:`write_jsonl` writes one JSON object per line; :func:`write_parquet` the same
rows as one Parquet table (``pip install 'sona-shm[parquet]'``); :func:`read_rows`
reads either back as dicts, and :func:`trajectories_of` turns rows into
:class:`~sona_shm.trajectory.Trajectory` objects again. Floats are written as float32
values (JSON: the shortest text that reads back to the same float32, :func:`shortest`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from ..errors import InvalidInputError, SonaShmError
from ..trajectory import Step, Trajectory, TrajectoryBatch

#: The suffixes :func:`writer_for` knows, and what writes them (the ``.npz`` is the batch's own format).
FORMATS = (".npz", ".jsonl", ".parquet")


def shortest(a: np.ndarray) -> np.ndarray:
    """``float64`` values of the ``float32`` array ``a`` rounded to the fewest significant digits (6 to 9) that
    read back as the same float32: what JSON prints is then short (``0.1``, not ``0.10000000149011612``) and
    exact. Vectorised: one rounding per digit count, for the whole array."""
    x = a.astype(np.float64)
    out = x.copy()
    todo = np.isfinite(x) & (x != 0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        magnitude = np.floor(np.log10(np.abs(np.where(todo, x, 1.0))))
        for digits in range(6, 10):
            scale = 10.0 ** (digits - 1 - magnitude)
            rounded = np.round(x * scale) / scale
            fits = todo & np.isfinite(rounded) & (rounded.astype(np.float32) == a)
            out[fits] = rounded[fits]
            todo &= ~fits
    return out  # what is still todo keeps its exact float64 value (9 digits may not print the shortest)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """``int64[n + 1]``: where each of ``n`` runs of ``lengths`` starts in their concatenation, and the end."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass(frozen=True)
class _Unpadded:
    """The real steps of a batch, concatenated: step ``j`` (in trajectory order) has ``reward[j]``, activations
    ``activations[act[j]:act[j + 1]]`` and attention ``attention[att[j]:att[j + 1]]``; trajectory ``i`` has steps
    ``steps[i]:steps[i + 1]``."""

    steps: np.ndarray  # int64[k + 1]
    reward: np.ndarray  # float32[T]
    act_len: np.ndarray  # int32[T]
    activations: np.ndarray  # float32[sum act_len]
    att_len: np.ndarray  # int32[T]
    attention: np.ndarray  # float32[sum att_len]

    @classmethod
    def of(cls, batch: TrajectoryBatch) -> _Unpadded:
        k, steps_max, h = batch.activations.shape
        taken = np.arange(steps_max)[None, :] < batch.n_steps[:, None]  # bool[k, S]: the real steps, in order
        width = batch.attention.shape[2]
        return cls(
            _offsets(batch.n_steps),
            batch.rewards[taken],
            batch.act_len[taken],
            batch.activations[taken[:, :, None] & (np.arange(h)[None, None, :] < batch.act_len[:, :, None])],
            batch.att_len[taken],
            batch.attention[taken[:, :, None] & (np.arange(width)[None, None, :] < batch.att_len[:, :, None])],
        )


def rewards_earned(batch: TrajectoryBatch) -> np.ndarray:
    """``float64[k]``: what the route taken earned (the learner's ``count_routes``: the quality of a bandit feedback,
    1.0 / 0.0 against ``best_index``), NaN where no route was taken."""
    taken, best = batch.route_index >= 0, batch.best_index >= 0
    earned = np.where(best, (batch.route_index == batch.best_index).astype(np.float64), shortest(batch.quality))
    return np.where(taken, earned, np.nan)


def batch_rows(batch: TrajectoryBatch, route_names: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """The rows of a drained batch (``route_names``: the engine's route table, to name ``best``)."""
    real = _Unpadded.of(batch)
    steps, act, att = real.steps.tolist(), _offsets(real.act_len).tolist(), _offsets(real.att_len).tolist()
    activations, attention, reward = shortest(real.activations), shortest(real.attention), shortest(real.reward).tolist()
    route_index, best_index = batch.route_index.tolist(), batch.best_index.tolist()
    query, quality, probability = shortest(batch.query), shortest(batch.quality).tolist(), shortest(batch.probability).tolist()
    earned = rewards_earned(batch).tolist()
    for i in range(len(batch)):
        best = best_index[i]
        yield {
            "traj_id": int(batch.traj_id[i]),
            "query": query[i].tolist(),
            "quality": quality[i],
            "latency_us": int(batch.latency_us[i]),
            "route": str(batch.route[i]) or None,
            "route_index": None if route_index[i] < 0 else route_index[i],
            "best_index": None if best < 0 else best,
            "best": route_names[best] if 0 <= best < len(route_names) else None,
            "reward": None if earned[i] != earned[i] else earned[i],  # NaN: no route taken
            "probability": None if probability[i] != probability[i] else probability[i],  # NaN: not recorded
            "steps": [
                {
                    "reward": reward[j],
                    "activations": activations[act[j] : act[j + 1]].tolist(),
                    "attention": attention[att[j] : att[j + 1]].tolist(),
                }
                for j in range(steps[i], steps[i + 1])
            ],
        }


def write_jsonl(batch: TrajectoryBatch, file: IO[bytes], route_names: Sequence[str] = ()) -> None:
    """One JSON object per trajectory, one per line (UTF-8), to a binary file."""
    for row in batch_rows(batch, route_names):
        file.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n")


def import_pyarrow() -> Any:
    """``(pyarrow, pyarrow.parquet)``, or a :class:`SonaShmError` with the install command."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise SonaShmError(f"Parquet needs pyarrow: pip install 'sona-shm[parquet]' (or write .jsonl) ({exc})") from None
    return pyarrow


def parquet_schema() -> Any:
    pa = import_pyarrow()
    f32 = pa.list_(pa.float32())
    step = pa.struct([("reward", pa.float32()), ("activations", f32), ("attention", f32)])
    return pa.schema(
        [
            ("traj_id", pa.uint64()),
            ("query", f32),
            ("quality", pa.float32()),
            ("latency_us", pa.uint64()),
            ("route", pa.string()),
            ("route_index", pa.int32()),
            ("best_index", pa.int32()),
            ("best", pa.string()),
            ("reward", pa.float64()),
            ("probability", pa.float32()),
            ("steps", pa.list_(step)),
        ]
    )


def write_parquet(batch: TrajectoryBatch, file: IO[bytes], route_names: Sequence[str] = ()) -> None:
    """The rows as one Parquet table (``pip install 'sona-shm[parquet]'``), to a binary file.

    Built column by column from the batch's arrays (float32 as they are, no Python floats):
    a step's activations and attention are the first ``act_len``/``att_len`` of its row.
    """
    pa = import_pyarrow()
    k = len(batch)
    real = _Unpadded.of(batch)

    def lists(values: Any, offsets: np.ndarray) -> Any:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values) if isinstance(values, np.ndarray) else values)

    steps = pa.StructArray.from_arrays(
        [pa.array(real.reward), lists(real.activations, _offsets(real.act_len)), lists(real.attention, _offsets(real.att_len))],
        names=["reward", "activations", "attention"],
    )
    best, earned = batch.best_index, rewards_earned(batch)
    names = np.array([*route_names, ""], dtype=object)[np.where((best >= 0) & (best < len(route_names)), best, len(route_names))]
    route = batch.route.astype(object)
    columns = [
        pa.array(batch.traj_id),
        lists(batch.query.reshape(-1), np.arange(k + 1) * batch.query.shape[1]),
        pa.array(batch.quality),
        pa.array(batch.latency_us),
        pa.array(route, type=pa.string(), mask=route == ""),
        pa.array(batch.route_index, mask=batch.route_index < 0),
        pa.array(best, mask=best < 0),
        pa.array(names, type=pa.string(), mask=names == ""),
        pa.array(earned, mask=np.isnan(earned)),
        pa.array(batch.probability, mask=np.isnan(batch.probability)),
        lists(steps, real.steps),
    ]
    pa.parquet.write_table(pa.Table.from_arrays(columns, schema=parquet_schema()), file)


def writer_for(path: str) -> Any:
    """What writes a drained batch to a file of ``path``'s suffix: ``writer(batch, file, route_names)``."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        return lambda batch, file, route_names=(): batch.save(file)
    if suffix == ".jsonl":
        return write_jsonl
    if suffix == ".parquet":
        import_pyarrow()  # refuse before anything leaves the buffer
        return write_parquet
    raise InvalidInputError(f"out: expected a file name ending in {', '.join(FORMATS)}, got {path!r}")


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` or ``.parquet`` file written here, as dicts."""
    if os.fspath(path).endswith(".parquet"):
        pa = import_pyarrow()
        return list(pa.parquet.read_table(path).to_pylist())
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def trajectories_of(rows: Sequence[dict[str, Any]]) -> list[Trajectory]:
    """Rows back as :class:`Trajectory` objects (float32 arrays)."""
    f32 = np.float32
    return [
        Trajectory(
            np.array(row["query"], f32),
            [
                Step(np.array(s["activations"], f32), np.array(s["attention"], f32) if s["attention"] else None, s["reward"])
                for s in row["steps"]
            ],
            row["quality"],
            row["latency_us"],
            row["route"],
            row["traj_id"],
            row["route_index"],
            row["best_index"],
            row["probability"],
        )
        for row in rows
    ]
