"""Drained trajectories as rows a data team reads: JSON lines (no dependency) and Parquet (``pyarrow``), unpadded.

An ``.npz`` of :class:`~sona_shm.trajectory.TrajectoryBatch` pads every trajectory to
the engine's ``max_steps`` x ``hidden_dim`` plus attention (10,000 feedbacks of an
h = 384 reference-sized engine: 162 MB). A row holds only what was recorded — the
real steps, each with its real activations and attention:

- ``traj_id`` (int), ``query`` (h floats), ``quality`` (float: a feedback's reward;
  1.0 for a full-information one), ``latency_us`` (int);
- ``route`` (the route's name, or null), ``route_index`` (the route taken of a
  feedback, or null), ``best_index`` and ``best`` (the route that was right, by index
  and name, or null), ``probability`` (the chance the route taken was chosen with,
  for off-policy evaluation; null when not recorded);
- ``steps``: a list of ``{"reward", "activations", "attention"}`` (``attention`` an
  empty list when the step had none).

:func:`write_jsonl` writes one JSON object per line; :func:`write_parquet` the same
rows as one Parquet table (``pip install 'sona-shm[parquet]'``); :func:`read_rows`
reads either back as dicts, and :func:`trajectories_of` turns rows into
:class:`~sona_shm.trajectory.Trajectory` objects again. Floats are written as float32
values (JSON: the shortest text that reads back to the same float32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from ..errors import InvalidInputError, SonaShmError
from ..trajectory import Step, Trajectory, TrajectoryBatch

#: The suffixes :func:`writer_for` knows, and what writes them (the ``.npz`` is the batch's own format).
FORMATS = (".npz", ".jsonl", ".parquet")


def _float32_text(a: np.ndarray) -> list[float]:
    # str(np.float32) is the shortest repr of the float32; float() of it rounds back to the same float32.
    return [float(str(x)) for x in a.astype(np.float32)]


def batch_rows(batch: TrajectoryBatch, route_names: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """The rows of a drained batch (``route_names``: the engine's route table, to name ``best``)."""
    n_steps, act_len, att_len = batch.n_steps.tolist(), batch.act_len.tolist(), batch.att_len.tolist()
    route_index, best_index = batch.route_index.tolist(), batch.best_index.tolist()
    for i in range(len(batch)):
        probability = float(batch.probability[i])
        best = best_index[i]
        yield {
            "traj_id": int(batch.traj_id[i]),
            "query": _float32_text(batch.query[i]),
            "quality": float(str(batch.quality[i])),
            "latency_us": int(batch.latency_us[i]),
            "route": str(batch.route[i]) or None,
            "route_index": None if route_index[i] < 0 else route_index[i],
            "best_index": None if best < 0 else best,
            "best": route_names[best] if 0 <= best < len(route_names) else None,
            "probability": None if probability != probability else float(str(batch.probability[i])),  # NaN: not recorded
            "steps": [
                {
                    "reward": float(str(batch.rewards[i, s])),
                    "activations": _float32_text(batch.activations[i, s, : act_len[i][s]]),
                    "attention": _float32_text(batch.attention[i, s, : att_len[i][s]]),
                }
                for s in range(n_steps[i])
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
            ("probability", pa.float32()),
            ("steps", pa.list_(step)),
        ]
    )


def write_parquet(batch: TrajectoryBatch, file: IO[bytes], route_names: Sequence[str] = ()) -> None:
    """The rows as one Parquet table (``pip install 'sona-shm[parquet]'``), to a binary file."""
    pa = import_pyarrow()
    table = pa.Table.from_pylist(list(batch_rows(batch, route_names)), schema=parquet_schema())
    pa.parquet.write_table(table, file)


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
