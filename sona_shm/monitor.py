"""The monitor: an engine's counters, read without taking a lock or writing a byte.

Totals are sums of one-writer words (the pattern of prometheus_client's multiprocess
mode); the flusher's figures come from one consistent ledger read. Liveness comes from
the kernel's lock table (who holds the flusher lock and each lane lock), so a pid
recycled by the OS never looks alive.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .cli import EXIT_NOT_FOUND, EXIT_NOT_RUNNING
from .errors import SegmentNotFoundError
from .layout import (
    CONS_DRAINED_AT,
    CONS_PID,
    CONS_TAIL,
    CONSUMER_LINE,
    FL_HEARTBEAT,
    FL_IDLE,
    FL_PID,
    FL_SCANS,
    FL_STARTED_AT,
    FLUSHER_LINE,
    LANE_CLAIMS,
    LANE_DROPS,
    LANE_HEAD,
    LANE_LAST_AT,
    LANE_OWNER_PID,
    LOCK_FLUSHER,
    LOCK_LANE_BASE,
)
from .ledger import Ledger
from .routes import read_route_names
from .segment import Segment

METRICS = ("trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied")


def collect_stats(segment: Segment, ledger: Ledger) -> dict[str, Any]:
    """Everything a user asks about an engine, as plain JSON-able values."""
    layout = segment.layout
    u64, f64 = segment.u64, segment.f64
    fields = METRICS + ("pending", "generation", "buffer_head", "buffer_dropped", "last_flush_at", "corrupt", "lane_tail")
    fields += ("route_chosen", "route_best", "route_reward")
    # The tail before the head: the tail never passes the head, so len is never negative.
    buffer_tail = u64[(CONSUMER_LINE + CONS_TAIL) // 8]
    values = dict(zip(fields, ledger.read(*fields)))
    tails = values.pop("lane_tail")
    chosen, best, reward = (values.pop(f).tolist() for f in ("route_chosen", "route_best", "route_reward"))
    routes = [
        {"name": n, "chosen": c, "best": b, "reward_sum": r, "mean_reward": r / c if c else None}
        for n, c, b, r in zip(read_route_names(segment), chosen, best, reward)
    ]
    held = segment.held_locks([LOCK_FLUSHER] + [LOCK_LANE_BASE + i for i in range(layout.lanes)])
    now = time.time()

    lanes = []
    recorded = dropped = 0
    for lane in range(layout.lanes):
        ctl = layout.lane_control(lane) // 8
        claims = u64[ctl + LANE_CLAIMS // 8]
        if not claims:
            continue
        head = u64[ctl + LANE_HEAD // 8]
        drops = u64[ctl + LANE_DROPS // 8]
        last = f64[ctl + LANE_LAST_AT // 8]
        recorded += head
        dropped += drops
        lanes.append(
            {
                "lane": lane,
                "pid": u64[ctl + LANE_OWNER_PID // 8],
                "alive": held[1 + lane],
                "records": head,
                "learned": int(tails[lane]),
                "backlog": head - int(tails[lane]),
                "drops": drops,
                "claims": claims,
                "last_record_at": last or None,
            }
        )

    fl = FLUSHER_LINE // 8
    heartbeat = f64[fl + FL_HEARTBEAT // 8]
    seen = values["trajectories_processed"]
    buffer_len = values["buffer_head"] - buffer_tail
    cfg = layout.config
    return {
        "name": segment.name,
        "observed_at": now,
        "config": {
            "hidden_dim": cfg.hidden_dim,
            "rank": cfg.rank,
            "lr": cfg.lr,
            "flush_threshold": cfg.flush_threshold,
            "capacity": cfg.capacity,
            "max_steps": cfg.max_steps,
            "attention_dim": cfg.attention_dim,
            "lanes": cfg.lanes,
            "lane_slots": cfg.lane_slots,
            "rule": cfg.rule,
            "routes": cfg.routes,
            "temperature": cfg.temperature,
            "segment_bytes": layout.total_bytes,
        },
        "corrupt": values["corrupt"],
        "routes": routes,
        **{m: values[m] for m in METRICS},
        "pending_signals": values["pending"],
        "weights_generation": values["generation"],
        "last_flush_at": values["last_flush_at"] or None,
        "recorded": recorded,
        "lane_dropped": dropped,
        "backlog": sum(lane["backlog"] for lane in lanes),
        "lanes_live": sum(1 for lane in lanes if lane["alive"]),
        "buffer": {
            "len": buffer_len,
            "dropped": values["buffer_dropped"],
            "success_rate": 1.0 if seen == 0 else (seen - values["buffer_dropped"]) / seen,
            "capacity": cfg.capacity,
            "drained": buffer_tail,
            "drained_at": f64[(CONSUMER_LINE + CONS_DRAINED_AT) // 8] or None,
            "consumer_pid": u64[(CONSUMER_LINE + CONS_PID) // 8] or None,
        },
        "flusher": {
            "pid": u64[fl + FL_PID // 8],
            "alive": held[0],
            "heartbeat_at": heartbeat or None,
            "heartbeat_age_s": (now - heartbeat) if heartbeat else None,
            "started_at": f64[fl + FL_STARTED_AT // 8] or None,
            "idle": bool(u64[fl + FL_IDLE // 8]),
            "scans": u64[fl + FL_SCANS // 8],
        },
        "lanes": lanes,
    }


def read_stats(name: str) -> dict[str, Any]:
    """Open engine ``name`` read-only, collect its stats, close."""
    segment = Segment.open(name, writable=False)
    try:
        ledger = Ledger(segment)
        try:
            return collect_stats(segment, ledger)
        finally:
            ledger.close()
    finally:
        segment.close()


# ----------------------------------------------------------------- the table


def _count(n: int) -> str:
    return f"{n:,}"


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    age = max(0.0, now - t)
    if age < 60:
        return f"{age:.1f}s ago"
    if age < 3600:
        return f"{int(age // 60)}m {int(age % 60)}s ago"
    return f"{int(age // 3600)}h {int(age % 3600 // 60)}m ago"


#: A flusher that holds its lock but has not looped for this long is shown as stalled
#: (it wakes at least every 50 ms; one scan learns at most lanes x lane_slots slots).
STALLED_AFTER_S = 5.0


@dataclass
class View:
    """What the table shows, once, for both renderers (plain text and rich)."""

    title: str
    config: str
    alive: bool
    status: str
    sections: list[tuple[str, list[tuple[str, str]]]]
    lane_columns: tuple[str, ...]
    lane_rows: list[tuple[str, ...]]
    notes: list[str] = field(default_factory=list)


def build_view(stats: dict[str, Any]) -> View:
    """The table's content from :func:`collect_stats`: totals, flusher, one row per live lane."""
    now = stats.get("observed_at") or time.time()
    cfg, fl, buf = stats["config"], stats["flusher"], stats["buffer"]
    alive = bool(fl["alive"])
    age = fl["heartbeat_age_s"]
    if not alive:
        status = "NOT RUNNING"
    elif age is not None and age > STALLED_AFTER_S:
        status = f"alive, STALLED? no heartbeat for {age:.0f}s"
    else:
        status = "alive"
    notes: list[str] = []
    sections = [
        (
            "learning",
            [
                ("trajectories_processed", _count(stats["trajectories_processed"])),
                ("signals_accumulated", _count(stats["signals_accumulated"])),
                ("flushes_performed", _count(stats["flushes_performed"])),
                ("updates_applied", _count(stats["updates_applied"])),
            ],
        ),
        (
            "producers",
            [
                ("recorded", _count(stats["recorded"])),
                ("not yet learned", _count(stats["backlog"])),
                ("lane drops (lane full)", _count(stats["lane_dropped"])),
                ("live lanes", f"{stats['lanes_live']} / {cfg['lanes']}"),
            ],
        ),
        (
            "buffer",
            [
                ("len", f"{_count(buf['len'])} / {_count(buf['capacity'])}"),
                ("dropped", _count(buf["dropped"])),
                ("success rate", f"{buf['success_rate']:.4f}"),
                ("drained", _count(buf["drained"])),
            ],
        ),
        (
            "flusher",
            [
                ("pid", str(fl["pid"] or "-")),
                ("state", status),
                ("heartbeat", _ago(fl["heartbeat_at"], now)),
                ("last flush", _ago(stats["last_flush_at"], now)),
                ("pending signals", _count(stats["pending_signals"])),
                ("weights generation", _count(stats["weights_generation"])),
            ],
        ),
    ]
    routes = stats.get("routes") or []
    if routes:
        taken = sum(r["chosen"] for r in routes) or 1
        sections.append(
            (
                f"routes ({cfg['rule']} rule; feedback counts since creation)",
                [
                    (
                        r["name"],
                        f"taken {_count(r['chosen'])} ({r['chosen'] / taken:.0%}), "
                        f"reward {'-' if r['mean_reward'] is None else format(r['mean_reward'], '.3f')}, best {_count(r['best'])}",
                    )
                    for r in routes
                ],
            )
        )
    if stats.get("corrupt"):
        notes.append(f"{_count(stats['corrupt'])} published slots failed validation and were not learned (memory corruption?)")
    live = [lane for lane in stats["lanes"] if lane["alive"]]
    rows = [
        (
            str(lane["lane"]),
            str(lane["pid"]),
            _count(lane["records"]),
            _count(lane["backlog"]),
            _count(lane["drops"]),
            str(lane["claims"]),
            _ago(lane["last_record_at"], now),
        )
        for lane in live
    ]
    if not alive:
        notes.append(f"no flusher is running: nothing is learned until `sona-shm flusher --name {stats['name']}` starts")
    free = [lane for lane in stats["lanes"] if not lane["alive"]]
    if free:
        notes.append(
            f"{len(free)} more lane(s) free again (their owners exited): {_count(sum(lane['records'] for lane in free))} records, "
            f"{_count(sum(lane['backlog'] for lane in free))} not yet learned"
        )
    return View(
        title=f"sona-shm engine {stats['name']!r}: flusher {status}",
        config=(
            f"{cfg.get('rule', 'reference')} rule, hidden {cfg['hidden_dim']}, rank {cfg['rank']}, lr {cfg['lr']}, "
            f"flush every {cfg['flush_threshold']} signals, "
            f"{cfg['lanes']} lanes x {cfg['lane_slots']} slots, buffer {cfg['capacity']}, {cfg['segment_bytes'] / 2**20:.1f} MiB"
        ),
        alive=alive,
        status=status,
        sections=sections,
        lane_columns=("lane", "pid", "records", "not learned", "drops", "claims", "last record"),
        lane_rows=rows,
        notes=notes,
    )


def format_table(stats: dict[str, Any]) -> str:
    """A plain-text rendering of :func:`collect_stats` for terminals and logs."""
    view = build_view(stats)
    lines = [view.title, f"  {view.config}", ""]
    width = max(len(label) for _, pairs in view.sections for label, _ in pairs)
    vwidth = max(len(value) for _, pairs in view.sections for _, value in pairs)
    # Sections two by two, side by side: learning | producers, buffer | flusher.
    for left, right in zip(view.sections[0::2], view.sections[1::2] + [("", [])]):
        lines.append(f"  {left[0]:<{width + vwidth + 6}}{right[0]}")
        for i in range(max(len(left[1]), len(right[1]))):
            cells = [f"{p[0]:<{width}}  {p[1]:>{vwidth}}" if p else " " * (width + vwidth + 2) for p in (_at(left[1], i), _at(right[1], i))]
            lines.append(f"    {cells[0]}    {cells[1]}".rstrip())
        lines.append("")
    lines.append("  live lanes (records, drops: lane totals since the engine was created)")
    cols = [view.lane_columns, *view.lane_rows]
    widths = [max(len(row[c]) for row in cols) for c in range(len(view.lane_columns))]
    for row in cols:
        lines.append("    " + "  ".join(cell.rjust(w) if c < len(row) - 1 else cell for c, (cell, w) in enumerate(zip(row, widths))))
    if not view.lane_rows:
        lines.append("    (none: no producer is attached)")
    lines += [f"  {note}" for note in view.notes]
    return "\n".join(lines)


def _at(pairs: list[tuple[str, str]], i: int) -> tuple[str, str] | None:
    return pairs[i] if i < len(pairs) else None


def render_rich(stats: dict[str, Any]) -> Any:
    """The same view as :func:`format_table` as a ``rich`` renderable (needs the ``monitor`` extra)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    view = build_view(stats)
    title = Text(view.title, style="bold green" if view.status == "alive" else "bold red")
    grid = Table.grid(padding=(0, 4))
    for _ in view.sections[:2]:
        grid.add_column()
    blocks = []
    for name, pairs in view.sections:
        block = Table(title=name, title_justify="left", show_header=False, box=None, padding=(0, 1))
        block.add_column(style="dim")
        block.add_column(justify="right")
        for label, value in pairs:
            style = "bold red" if value.startswith(("NOT RUNNING", "alive, STALLED")) else None
            block.add_row(label, Text(value, style=style or ""))
        blocks.append(block)
    for i in range(0, len(blocks), 2):
        grid.add_row(*blocks[i : i + 2])
    lanes = Table(title="live lanes (records, drops: lane totals)", title_justify="left")
    for i, column in enumerate(view.lane_columns):
        lanes.add_column(column, justify="left" if i == len(view.lane_columns) - 1 else "right")
    for row in view.lane_rows:
        lanes.add_row(*row)
    notes = [Text(note, style="yellow") for note in view.notes]
    return Group(title, Text(view.config, style="dim"), Text(""), grid, lanes, *notes)


# ----------------------------------------------------------------- Prometheus

#: The content type of the Prometheus text exposition format this module prints.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def format_prometheus(stats: dict[str, Any]) -> str:
    """:func:`collect_stats` in the Prometheus text exposition format (version 0.0.4).

    Every series carries the engine name as label ``engine``; per-lane series (live lanes
    only) also ``lane`` and ``pid``. Counters end in ``_total``; timestamps are unix
    seconds, 0 meaning never.
    """
    engine = {"engine": stats["name"]}
    cfg, fl, buf = stats["config"], stats["flusher"], stats["buffer"]
    live = [lane for lane in stats["lanes"] if lane["alive"]]

    def lane_samples(key: str) -> list[tuple[dict[str, str], float]]:
        return [({**engine, "lane": str(lane["lane"]), "pid": str(lane["pid"])}, lane[key] or 0) for lane in live]

    families: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = [
        ("trajectories_processed_total", "counter", "Trajectories learned by the flusher.", [(engine, stats["trajectories_processed"])]),
        ("signals_accumulated_total", "counter", "Learning signals accumulated.", [(engine, stats["signals_accumulated"])]),
        ("flushes_performed_total", "counter", "Flushes that applied accumulated gradients.", [(engine, stats["flushes_performed"])]),
        ("updates_applied_total", "counter", "Signals applied to the adapter weights by flushes.", [(engine, stats["updates_applied"])]),
        ("recorded_total", "counter", "Trajectories producers committed to their lanes.", [(engine, stats["recorded"])]),
        ("lane_dropped_total", "counter", "Trajectories refused because a producer's lane was full.", [(engine, stats["lane_dropped"])]),
        ("backlog", "gauge", "Trajectories committed to lanes and not yet learned.", [(engine, stats["backlog"])]),
        ("pending_signals", "gauge", "Signals accumulated since the last flush.", [(engine, stats["pending_signals"])]),
        ("weights_generation", "gauge", "Generation of the published adapter weights.", [(engine, stats["weights_generation"])]),
        ("last_flush_timestamp_seconds", "gauge", "When a flush last changed weights (0: never).", [(engine, stats["last_flush_at"] or 0)]),
        ("buffer_len", "gauge", "Learned trajectories held in the buffer for drain.", [(engine, buf["len"])]),
        ("buffer_capacity", "gauge", "Slots of the learned-trajectory buffer.", [(engine, buf["capacity"])]),
        ("buffer_dropped_total", "counter", "Learned trajectories not kept because the buffer was full.", [(engine, buf["dropped"])]),
        ("buffer_drained_total", "counter", "Buffered trajectories handed to consumers.", [(engine, buf["drained"])]),
        ("buffer_success_rate", "gauge", "Share of learned trajectories kept in the buffer.", [(engine, buf["success_rate"])]),
        ("lanes", "gauge", "Producer lanes of the engine.", [(engine, cfg["lanes"])]),
        ("lanes_live", "gauge", "Lanes held by a live producer process.", [(engine, stats["lanes_live"])]),
        ("segment_bytes", "gauge", "Size of the shared-memory segment.", [(engine, cfg["segment_bytes"])]),
        ("flusher_up", "gauge", "1 if a flusher holds the engine's flusher lock.", [({**engine, "pid": str(fl["pid"])}, int(fl["alive"]))]),
        ("flusher_heartbeat_timestamp_seconds", "gauge", "When the flusher last looped (0: never).", [(engine, fl["heartbeat_at"] or 0)]),
        ("flusher_start_time_seconds", "gauge", "When the current or last flusher started (0: never).", [(engine, fl["started_at"] or 0)]),
        ("flusher_scans_total", "counter", "Passes of the flusher over the lanes.", [(engine, fl["scans"])]),
        ("lane_records_total", "counter", "Trajectories committed to a live lane, by all its owners.", lane_samples("records")),
        ("lane_drops_total", "counter", "Trajectories refused by a live lane, by all its owners.", lane_samples("drops")),
        ("lane_backlog", "gauge", "Trajectories of a live lane not yet learned.", lane_samples("backlog")),
        ("lane_last_record_timestamp_seconds", "gauge", "When a live lane last committed (0: never).", lane_samples("last_record_at")),
    ]
    out = []
    for name, kind, text, samples in families:
        metric = "sona_shm_" + name
        out.append(f"# HELP {metric} {_escape_help(text)}")
        out.append(f"# TYPE {metric} {kind}")
        for labels, value in samples:
            rendered = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
            out.append(f"{metric}{{{rendered}}} {_number(value)}")
    return "\n".join(out) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


# ----------------------------------------------------------------- watching


def watch(name: str, interval: float, *, count: int | None = None, out: TextIO | None = None, renderer: str = "auto") -> int:
    """Redraw the table every ``interval`` seconds, ``count`` times (None: until Ctrl-C).

    ``renderer``: ``"rich"``, ``"plain"`` (clear the screen with ANSI codes and print
    the table; on a non-terminal just print one table after the other) or ``"auto"``
    (rich if it is installed and ``out`` is a terminal). Returns the exit status of the
    last frame: 0, or the CLI's code for no segment / no flusher running. A segment
    missing at the first frame raises :class:`SegmentNotFoundError`.
    """
    out = out or sys.stdout
    if renderer == "auto":
        renderer = "rich" if out.isatty() and importlib.util.find_spec("rich") is not None else "plain"
    frames = itertools.count() if count is None else range(count)
    code = 0
    live = None
    try:
        if renderer == "rich":
            from rich.console import Console
            from rich.live import Live

            live = Live(console=Console(file=out, force_terminal=True), auto_refresh=False)
            live.start()
        for frame in frames:
            if frame:
                time.sleep(interval)  # the refresh period of a display, not a synchronisation
            try:
                stats = read_stats(name)
            except SegmentNotFoundError as exc:
                if frame == 0:
                    raise
                stats, code = None, EXIT_NOT_FOUND
                message = f"{exc}\n(waiting for it to come back; Ctrl-C to stop)"
            else:
                code = 0 if stats["flusher"]["alive"] else EXIT_NOT_RUNNING
            if live is not None:
                from rich.text import Text

                live.update(render_rich(stats) if stats else Text(message, style="bold red"), refresh=True)
            else:
                text = format_table(stats) if stats else message
                out.write(("\x1b[H\x1b[2J" if out.isatty() else ("\n" if frame else "")) + text + "\n")
                out.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    finally:
        if live is not None:
            live.stop()
    return code
