"""Checkpoint history: the last K checkpoints of an engine, kept beside its checkpoint file, timestamped.

With ``--checkpoint PATH --checkpoint-keep K`` every checkpoint the flusher writes is a new
file ``PATH.YYYYMMDDTHHMMSS.ffffffZ`` (the UTC time it was taken, to the microsecond),
written atomically with the segment's mode (:func:`~sona_shm.store.tensorfile.write_atomic`),
and ``PATH`` becomes a hard link to it (a second name, swapped in with one rename; a copy
where the file system has no hard links), so ``PATH`` is always the newest and a new
engine is made from it. Then the oldest timestamped files are removed until K are left —
never the one named in ``protect`` (the reward guard's last good checkpoint). Without
``--checkpoint-keep`` the history is ``PATH`` alone, rewritten each time.

The names sort as the times do, so listing needs no file read; :func:`entries` reads each
file's header (its metadata, not its tensors) for what ``sona-shm checkpoints`` shows.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import secrets
from dataclasses import dataclass

from ..checks import check_int
from ..errors import CheckpointError, InvalidInputError
from ..shm.admin import read_settings
from ..shm.ledger import Ledger
from ..shm.segment import Segment
from .checkpoint import MAX_CHECKPOINT_BYTES, Checkpoint, write_checkpoint
from .tensorfile import MAX_HEADER_BYTES

#: The timestamp a kept checkpoint's name ends with (UTC, microseconds).
_STAMP = re.compile(r"\.(\d{8}T\d{6}\.\d{6}Z)$")
#: Checkpoints a flusher keeps at most (``--checkpoint-keep``).
MAX_KEEP = 10_000


def stamp(written_at: float) -> str:
    """``YYYYMMDDTHHMMSS.ffffffZ`` of unix time ``written_at`` (the same float always gives the same stamp)."""
    moment = _dt.datetime.fromtimestamp(written_at, _dt.UTC)
    return moment.strftime("%Y%m%dT%H%M%S.%fZ")


def kept_path(path: str, written_at: float) -> str:
    """The name of the checkpoint taken at ``written_at`` in the history of ``path``."""
    return f"{path}.{stamp(written_at)}"


def kept(path: str) -> list[str]:
    """The timestamped checkpoints of ``path``'s history, oldest first (names only; nothing read)."""
    directory, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    prefix = base + "."
    found = [n for n in names if n.startswith(prefix) and _STAMP.fullmatch(n[len(base) :])]
    return [os.path.join(directory, n) for n in sorted(found)]


def write(path: str, checkpoint: Checkpoint, mode: int, keep: int, protect: str | None = None) -> str:
    """Write ``checkpoint`` into the history of ``path`` (``keep`` > 0) or over ``path`` (``keep`` 0); the file written.

    ``checkpoint.written_at`` names it. Files beyond the newest ``keep`` are removed, except ``protect``.
    Raises :class:`CheckpointError` when it cannot be written (the previous files are intact).
    """
    if keep <= 0:
        write_checkpoint(path, checkpoint, mode)
        return path
    target = kept_path(path, checkpoint.written_at)
    if os.path.lexists(target):  # two checkpoints in one microsecond: impossible in practice, refused rather than replaced
        raise CheckpointError(f"checkpoint {target}: exists already; the previous files are intact")
    write_checkpoint(target, checkpoint, mode)
    try:
        _link_over(target, path)
    except OSError:
        write_checkpoint(path, checkpoint, mode)  # no hard links here: a copy
    prune(path, keep, protect)
    return target


def _link_over(source: str, path: str) -> None:
    """Make ``path`` a hard link to ``source`` with one rename (a crash leaves the old ``path`` or the new one)."""
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.link")
    os.link(source, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(path: str, keep: int, protect: str | None = None) -> list[str]:
    """Remove the timestamped checkpoints of ``path`` beyond the newest ``keep``, except ``protect``; those removed."""
    files = kept(path)
    removed = []
    for old in files[: max(0, len(files) - keep)]:
        if protect is not None and os.path.abspath(old) == os.path.abspath(protect):
            continue
        try:
            os.unlink(old)
        except FileNotFoundError:
            continue
        removed.append(old)
    return removed


@dataclass(frozen=True)
class Entry:
    """One checkpoint of a history, as its metadata describes it (nothing validated but the header)."""

    path: str
    written_at: float | None
    generation: int | None
    trajectories_processed: int | None
    signals_accumulated: int | None
    moving_reward: float | None
    paused: int | None
    engine_id: int | None
    error: str | None = None  # why its metadata could not be read (it cannot be rolled back to either)


def entries(path: str) -> list[Entry]:
    """The checkpoints of ``path``'s history, newest first: the timestamped ones, and ``path`` itself when it is not
    one of them (a history without ``--checkpoint-keep``, or a file written before)."""
    files = kept(path)
    found = [_entry(f) for f in reversed(files)]
    try:
        here = os.stat(path)
    except OSError:
        return found
    if not any(_same(here, f) for f in files):
        found.append(_entry(path))
        found.sort(key=lambda e: -(e.written_at or 0.0))
    return found


def find(path: str, written_at: float) -> str | None:
    """The kept checkpoint of ``path`` taken at ``written_at`` (its name says so), or ``path`` if it is that one; None."""
    candidate = kept_path(path, written_at)
    if os.path.exists(candidate):
        return candidate
    entry = _entry(path) if os.path.exists(path) else None
    return path if entry is not None and entry.written_at == written_at else None


@dataclass(frozen=True)
class Kept:
    """One row of ``sona-shm checkpoints``: an :class:`Entry` of the engine's history, ``back`` places from the newest
    (1: the newest; ``rollback --back K`` takes that one), with a ``note``: ``good`` (the reward guard's last good
    checkpoint), ``rolled back to`` (the last rollback restored it), ``other engine`` (not this engine's)."""

    back: int
    entry: Entry
    note: str

    def as_dict(self) -> dict[str, object]:
        e = self.entry
        return {
            "back": self.back,
            "path": e.path,
            "written_at": e.written_at,
            "generation": e.generation,
            "trajectories_processed": e.trajectories_processed,
            "signals_accumulated": e.signals_accumulated,
            "moving_reward": e.moving_reward,
            "paused": e.paused,
            "engine_id": None if e.engine_id is None else f"{e.engine_id:016x}",
            "note": self.note,
            "error": e.error,
        }


def engine_history(segment: Segment) -> tuple[str, list[Kept]]:
    """The checkpoint path the engine's (last) flusher published and its history, newest first; ``("", [])``
    when that flusher kept no checkpoint."""
    settings = read_settings(segment)
    if not settings.checkpoint:
        return "", []
    ledger = Ledger(segment)
    try:
        engine_id, good_at, restored_at = ledger.read("engine_id", "guard_checkpoint_at", "rollback_checkpoint_at")
    finally:
        ledger.close()
    rows = []
    for back, entry in enumerate(entries(settings.checkpoint), 1):
        notes = []
        if entry.engine_id is not None and entry.engine_id != engine_id:
            notes.append("other engine")
        if good_at and entry.written_at == good_at:
            notes.append("good")
        if restored_at and entry.written_at == restored_at:
            notes.append("rolled back to")
        if entry.error:
            notes.append("unreadable")
        rows.append(Kept(back, entry, ", ".join(notes)))
    return settings.checkpoint, rows


def checkpoint_history(name: str) -> list[Kept]:
    """``sona-shm checkpoints``: engine ``name``'s kept checkpoints, newest first (nothing locked or written)."""
    segment = Segment.open(name, writable=False)
    try:
        return engine_history(segment)[1]
    finally:
        segment.close()


def resolve_back(segment: Segment, back: int, argument: str = "--back") -> str:
    """The file of ``rollback --back K``: the K-th newest kept checkpoint of the engine (1: the newest); errors name
    ``argument``."""
    check_int(argument, back, 1, MAX_KEEP + 1)
    path, rows = engine_history(segment)
    if not path:
        raise InvalidInputError(
            f"{argument}: engine {segment.name!r} keeps no checkpoints (its flusher runs without --checkpoint PATH "
            "--checkpoint-keep K); name one with --to FILE"
        )
    if back > len(rows):
        raise InvalidInputError(
            f"{argument}: expected K in [1, {len(rows)}] (the checkpoints kept of {path}: `sona-shm checkpoints --name "
            f"{segment.name}` lists them), got {back}"
        )
    return rows[back - 1].entry.path


def _same(st: os.stat_result, other: str) -> bool:
    try:
        o = os.stat(other)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (o.st_dev, o.st_ino)


def _entry(path: str) -> Entry:
    try:
        meta = read_metadata(path)
    except CheckpointError as exc:
        return Entry(path, None, None, None, None, None, None, None, error=str(exc))

    return Entry(
        path,
        _float(meta, "written_at"),
        _int(meta, "generation"),
        _int(meta, "trajectories_processed"),
        _int(meta, "signals_accumulated"),
        _float(meta, "moving_reward"),
        _int(meta, "paused"),
        _int(meta, "engine_id", 16),
    )


def _float(meta: dict[str, str], key: str) -> float | None:
    try:
        value = float(meta[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _int(meta: dict[str, str], key: str, base: int = 10) -> int | None:
    try:
        return int(meta[key], base)
    except (KeyError, ValueError):
        return None


def read_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file at ``path``, reading its header only; :class:`CheckpointError`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8, MAX_CHECKPOINT_BYTES):
                raise CheckpointError(f"checkpoint {path}: not a safetensors file (header size {n} in {size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: its header is not JSON ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: no metadata; not a sona_shm checkpoint")
    return {str(k): str(v) for k, v in meta.items()}


__all__ = [
    "MAX_KEEP",
    "Entry",
    "Kept",
    "checkpoint_history",
    "engine_history",
    "entries",
    "find",
    "kept",
    "kept_path",
    "prune",
    "read_metadata",
    "resolve_back",
    "stamp",
    "write",
]
