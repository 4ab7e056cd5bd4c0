"""Room for a segment: is there enough in /dev/shm (and in memory), and what configuration would fit.

tmpfs allocates a page when it is first written, and a write to a page it cannot
allocate (the file system is full) kills the writer with SIGBUS. So a segment is
reserved whole when it is created (``posix_fallocate``, :func:`sona_shm.segment.create_fd`)
and checked here first: a segment that cannot fit is refused before anything is
created, with the size it needs, the room there is, and a configuration of the same
engine that fits — the exact command to run.

The room is the smaller of the free space of the file system under ``/dev/shm`` and
the memory the kernel says is available (``MemAvailable + SwapFree``): tmpfs pages are
memory, and a file system mounted larger than the machine's memory would let a
reservation run the machine out of it.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import NoSpaceError
from .layout import PAGE, EngineConfig, Layout
from .segment import SHM_DIR

#: What the doorbell semaphore's file takes next to the segment (one page).
BELL_BYTES = PAGE
#: A suggested configuration uses at most this share of the room, so others keep some.
SUGGESTION_SHARE = 0.9


def free_bytes(path: str = SHM_DIR) -> int:
    """Bytes an unprivileged writer may still allocate in the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def available_memory() -> int | None:
    """``MemAvailable + SwapFree`` from ``/proc/meminfo`` in bytes, or None if unreadable."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return sum(int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def room() -> tuple[int, str]:
    """The bytes a new segment may take, and what limits them (for messages)."""
    shm = free_bytes()
    memory = available_memory()
    if memory is not None and memory < shm:
        return memory, f"{size_text(memory)} of memory available (MemAvailable + SwapFree; {SHM_DIR} has {size_text(shm)} free)"
    return shm, f"{SHM_DIR} has {size_text(shm)} free"


def size_text(n: int) -> str:
    """``n`` bytes for people: ``309.0 MiB``, ``4.9 TiB``."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def check_room(layout: Layout, name: str, *, group: bool = False, room_bytes: int | None = None, limit: str = "") -> None:
    """Refuse, before anything is created, a segment of ``layout`` that does not fit.

    ``room_bytes``/``limit``: the room and what limits it (default: :func:`room`).
    Raises :class:`NoSpaceError` naming the size needed, the room, the options that
    shrink the engine and a command with a configuration that fits (if any does).
    """
    if room_bytes is None:
        room_bytes, limit = room()
    need = layout.total_bytes + BELL_BYTES
    if need <= room_bytes:
        return
    cfg = layout.config
    outbox = ", --fleet-outbox" if cfg.fleet_outbox else ""
    message = (
        f"segment {name!r} needs {size_text(need)} ({layout.describe_contents()}; reserved whole, so that no writer can die of "
        f"SIGBUS on a full {SHM_DIR}) but {limit}; nothing was created. Shrink it with --lane-slots or --capacity (or --lanes, "
        f"--max-steps, --attention-dim, --hidden-dim{outbox}), or give {SHM_DIR} more room (docker run --shm-size)"
    )
    fitting = fitting_config(cfg, int(room_bytes * SUGGESTION_SHARE) - BELL_BYTES)
    if fitting is None:
        message += "; even one slot per lane and no buffer do not fit: use fewer --lanes or a smaller --max-steps"
    else:
        size = Layout(fitting).total_bytes + BELL_BYTES
        message += f". This fits ({size_text(size)}): `{command(name, fitting, group)}`"
        if fitting.routes:
            message += " (FILE: the route table given)"
    raise NoSpaceError(message)


def fitting_config(config: EngineConfig, budget: int) -> EngineConfig | None:
    """``config`` with ``lane_slots`` and ``capacity`` shrunk in proportion until the segment
    takes at most ``budget`` bytes (``lane_slots`` a power of two, ``capacity`` rounded
    down to two significant digits); None if one slot per lane and no buffer do not fit."""
    base = Layout(dataclasses.replace(config, lane_slots=1, capacity=0))
    slot = base.slot_bytes
    fixed = base.slots_offset + PAGE  # header, ledger, lane control, and page rounding of the buffer
    slots = (budget - fixed) // slot
    if slots < config.lanes:
        return None
    share = slots / (config.lanes * config.lane_slots + config.capacity)
    lane_slots = max(1, min(config.lane_slots, _power_of_two_at_most(int(config.lane_slots * share))))
    capacity = min(config.capacity, _two_digits(slots - config.lanes * lane_slots))
    fitting = dataclasses.replace(config, lane_slots=lane_slots, capacity=capacity)
    while Layout(fitting).total_bytes > budget and fitting.capacity > 0:  # page rounding; rarely taken
        fitting = dataclasses.replace(fitting, capacity=_two_digits(fitting.capacity - 1))
    return fitting if Layout(fitting).total_bytes <= budget else None


def command(name: str, config: EngineConfig, group: bool = False) -> str:
    """``sona-shm flusher --name NAME`` with every option in which ``config`` differs from the defaults of its rule.

    The route table is a file the caller gave: it is written ``--routes FILE``.
    """
    defaults = dataclasses.asdict(EngineConfig(rule=config.rule, routes=config.routes))  # lr's default is the rule's
    defaults["rule"] = EngineConfig().rule
    options = [
        f"--{field.name.replace('_', '-')} {getattr(config, field.name)}"
        for field in dataclasses.fields(config)
        if field.name != "routes" and getattr(config, field.name) != defaults[field.name]
    ]
    routes = ["--routes FILE"] if config.routes else []
    return " ".join(["sona-shm flusher --name", name, *options, *routes, *(["--group"] if group else [])])


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def _two_digits(n: int) -> int:
    """``n`` rounded down to two significant digits (0 for n <= 0)."""
    if n <= 0:
        return 0
    scale = 10 ** max(0, len(str(n)) - 2)
    return n // scale * scale
