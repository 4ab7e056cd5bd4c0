"""The monitor: renders :class:`~sona_shm.stats.EngineStats` as a table, plain or with ``rich``, and redraws it.

It reads nothing itself (:mod:`sona_shm.stats` does) and decides no exit code (the
command line does). What it adds to the model is presentation: learning rates between
two redraws, a sparkline of the last ones, how far the adapter moved, and what the
buffer's drops mean.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .errors import SegmentNotFoundError
from .stats import EngineStats, as_model, read

#: How many redraws the ``--watch`` sparkline remembers.
HISTORY = 30
_BARS = "▁▂▃▄▅▆▇█"


def _count(n: int) -> str:
    return f"{n:,}"


def _rate(x: float) -> str:
    return f"{x:,.0f}/s" if x >= 10 else f"{x:,.2f}/s"


def _norm(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    age = max(0.0, now - t)
    if age < 60:
        return f"{age:.1f}s ago"
    if age < 3600:
        return f"{int(age // 60)}m {int(age % 60)}s ago"
    return f"{int(age // 3600)}h {int(age % 3600 // 60)}m ago"


def sparkline(values: Sequence[float]) -> str:
    """One block character per value, scaled to the largest (all low when all are zero)."""
    top = max(values, default=0.0)
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in values)


@dataclass
class Section:
    title: str
    rows: list[tuple[str, str]]
    note: str | None = None  # said right under the section


@dataclass
class View:
    """What the table shows, once, for both renderers (plain text and rich)."""

    title: str
    config: str
    alive: bool
    status: str
    sections: list[Section]
    lane_columns: tuple[str, ...]
    lane_rows: Sequence[tuple[str, ...]]
    route_title: str = ""
    route_rows: Sequence[tuple[str, ...]] = ()  # one per route of the route table
    route_columns: tuple[str, ...] = ("route", "taken", "share", "reward", "share now", "reward now", "right", "drift")
    history: str | None = None
    notes: list[str] = field(default_factory=list)


def _reward(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def buffer_note(stats: EngineStats) -> str | None:
    """What the buffer's figures mean when they could look like a failure (none of them is one), or None."""
    state = stats.buffer.state
    if state == "no buffer":
        return "no buffer (capacity 0): nothing is kept for drain; learning unaffected"
    if state == "nobody drains":
        return "nobody drains: it keeps the oldest it was given; learning unaffected (dropped = learned but not kept for drain)"
    if state == "drained slower than learned":
        return "buffer full: drained slower than learned; learning unaffected (dropped = learned but not kept for drain)"
    return None


def fleet_sections(s: EngineStats, now: float) -> list[Section]:
    """The fleet's two sections: this host's link and outbox, and what this replica applied."""
    f = s.fleet
    assert f is not None
    if not s.flusher.alive:
        link = "- (no flusher)"
    elif f.connected:
        link = "connected"
    else:
        link = f"DISCONNECTED (last answer {_ago(f.contact_at, now)})"
    note = None
    if f.paused:
        note = "learning PAUSED: the outbox is full (or --fleet-lag reached); lanes fill until the stream takes it"
    elif not f.epoch:
        note = "not joined yet: learning waits for the fleet's state"
    return [
        Section(
            "fleet link",
            [
                ("key", f.key or "-"),
                ("host id", f.host_id or "-"),
                ("redis", link),
                ("outbox (not in stream)", f"{_count(f.outbox)} / {_count(f.outbox_capacity)}"),
                ("own not applied back", _count(f.outstanding)),
                ("lag", f"{f.lag_s:.2f}s"),
            ],
            note=note,
        ),
        Section(
            "fleet replica",
            [
                ("applied windows", _count(f.applied_entries)),
                ("applied signals", _count(f.applied_signals)),
                ("hosts", _count(f.hosts)),
                ("last applied id", f.last_applied_id or "-"),
                ("resyncs", _count(f.resyncs)),
                ("lost (entries/signals)", f"{_count(f.lost_entries)} / {_count(f.lost_signals)}"),
            ],
        ),
    ]


def learning_sections(s: EngineStats, now: float) -> list[Section]:
    """Whether the engine learns (pause, rollbacks) and what its feedback's reward does (moving reward, the guard)."""
    g = s.learning
    assert g is not None
    if g.paused:
        state = f"PAUSED by {'the reward guard' if g.paused_by == 'guard' else 'a request'} ({_ago(g.paused_at, now)})"
        note = f"nothing is learned: what arrives is counted and kept, never learned; `sona-shm resume --name {s.name}`"
    else:
        state, note = "learning", None
    moving = (
        f"{g.moving_reward:.4f}" if g.moving_reward is not None else f"- ({_count(g.moving_feedbacks)} / {_count(g.moving_window)} seen)"
    )
    rows = [
        ("state", state),
        ("taken in while paused", _count(g.paused_skipped)),
        ("rollbacks", _count(g.rollbacks)),
        ("signals rolled back", _count(g.rolled_back_signals)),
        ("last rollback", _ago(g.last_rollback_at, now)),
    ]
    guard_rows = [(f"moving reward (last {_count(g.moving_window)})", moving)]
    if g.guard_drop is not None:
        level = "-" if g.guard_level is None else f"{g.guard_level:.4f} - {g.guard_drop:g} = {g.guard_level - g.guard_drop:.4f}"
        guard_rows += [
            ("guard level - DROP", level),
            ("good checkpoint", _ago(g.guard_level_at, now)),
            ("guard trips", _count(g.guard_trips)),
            ("guard rolls back", "yes" if g.guard_rollback else "no"),
        ]
    else:
        guard_rows.append(("reward guard", "off (--guard-reward DROP)"))
    return [Section("learning state", rows, note=note), Section("reward", guard_rows)]


def build_view(stats: EngineStats | Mapping[str, Any], history: Sequence[float] = ()) -> View:
    """The table's content: totals, rates, the adapter, buffer, flusher, one row per live lane.

    ``history``: learned/s of the last redraws, oldest first (the ``--watch`` sparkline).
    """
    s = as_model(stats)
    now = s.observed_at or time.time()
    cfg, fl, buf, rates = s.config, s.flusher, s.buffer, s.rates
    if not fl.alive:
        status = "NOT RUNNING"
    elif fl.stalled:
        status = f"alive, STALLED? no heartbeat for {fl.heartbeat_age_s:.0f}s"
    else:
        status = "alive"
    since = f"over the last {rates.interval_s:.1f}s" if rates else "needs two reads (--watch, --interval)"
    sections = [
        Section(
            "learning",
            [
                ("trajectories_processed", _count(s.trajectories_processed)),
                ("signals_accumulated", _count(s.signals_accumulated)),
                ("flushes_performed", _count(s.flushes_performed)),
                ("updates_applied", _count(s.updates_applied)),
            ],
        ),
        Section(
            "producers",
            [
                ("recorded", _count(s.recorded)),
                ("not yet learned", _count(s.backlog)),
                ("lane drops (lane full)", _count(s.lane_dropped)),
                ("live lanes", f"{s.lanes_live} / {cfg.lanes}"),
            ],
        ),
        Section(
            "rates",
            [
                ("learned", _rate(rates.learned_per_s) if rates else "-"),
                ("recorded", _rate(rates.recorded_per_s) if rates else "-"),
                ("flushes", _rate(rates.flushes_per_s) if rates else "-"),
                ("lane drops", _rate(rates.lane_dropped_per_s) if rates else "-"),
            ],
            note=f"rates {since}",
        ),
        Section(
            "adapter",
            [
                ("‖up‖", _norm(s.adapter.up_norm)),
                ("‖down‖", _norm(s.adapter.down_norm)),
                ("‖Δup‖ since last read", _norm(rates.up_change_norm) if rates else "-"),
                ("weights generation", _count(s.weights_generation)),
            ],
        ),
        Section(
            "buffer",
            [
                ("len", f"{_count(buf.len)} / {_count(buf.capacity)}" if buf.capacity else "no buffer"),
                ("dropped", _count(buf.dropped) + (" (nobody drains)" if buf.state == "nobody drains" else "") if buf.capacity else "-"),
                ("success rate", "no buffer" if buf.success_rate is None else f"{buf.success_rate:.4f}"),
                ("drained", _count(buf.drained)),
            ],
            note=buffer_note(s),
        ),
        Section(
            "flusher",
            [
                ("pid", str(fl.pid or "-")),
                ("state", status),
                ("heartbeat", _ago(fl.heartbeat_at, now)),
                ("last flush", _ago(s.last_flush_at, now)),
                ("pending signals", _count(s.pending_signals)),
            ],
        ),
    ]
    if s.learning is not None:
        sections += learning_sections(s, now)
    if s.fleet is not None:
        sections += fleet_sections(s, now)
    route_rows = []
    if s.routes:
        moving = {r.name: r for r in rates.routes} if rates else {}
        taken = sum(r.chosen for r in s.routes)
        for r in s.routes:
            m = moving.get(r.name)
            route_rows.append(
                (
                    f"{r.name} (retired)" if r.retired else r.name,
                    _count(r.chosen),
                    f"{r.chosen / taken:.0%}" if taken else "-",
                    _reward(r.mean_reward),
                    "-" if m is None or m.chosen_share is None else f"{m.chosen_share:.0%}",
                    _reward(m.mean_reward if m else None),
                    _count(r.best),
                    f"{r.drift:.2f}",
                )
            )
    rows = [
        (
            str(lane.lane),
            str(lane.pid),
            _count(lane.records),
            _count(lane.backlog),
            _count(lane.drops),
            str(lane.claims),
            _ago(lane.last_record_at, now),
        )
        for lane in s.live_lanes
    ]
    notes = []
    if s.corrupt:
        notes.append(f"{_count(s.corrupt)} published slot(s) failed validation and were not learned (memory written outside sona_shm?)")
    if not fl.alive:
        notes.append(f"no flusher is running: nothing is learned until `sona-shm flusher --name {s.name}` starts")
    free = [lane for lane in s.lanes if not lane.alive]
    if free:
        notes.append(
            f"{len(free)} more lane(s) free again (their owners exited): {_count(sum(lane.records for lane in free))} records, "
            f"{_count(sum(lane.backlog for lane in free))} not yet learned"
        )
    spark = None
    if len(history) > 1:
        spark = f"learned/s, last {len(history)} reads: {sparkline(history)}  (max {_rate(max(history))})"
    return View(
        title=f"sona-shm engine {s.name!r}: flusher {status}",
        config=(
            f"{cfg.rule} rule, hidden {cfg.hidden_dim}, rank {cfg.rank}, lr {cfg.lr}, flush every {cfg.flush_threshold} signals, "
            f"{cfg.lanes} lanes x {cfg.lane_slots} slots, buffer {cfg.capacity or 'none'}, {cfg.segment_bytes / 2**20:.1f} MiB"
            + (f"; hot paths here: {s.implementation}" if s.implementation else "")
        ),
        alive=fl.alive,
        status=status,
        sections=sections,
        lane_columns=("lane", "pid", "records", "not learned", "drops", "claims", "last record"),
        lane_rows=rows,
        route_title=f"routes ({cfg.rule} rule): feedback since creation; now: since the last read",
        route_rows=route_rows,
        history=spark,
        notes=notes,
    )


def format_table(stats: EngineStats | Mapping[str, Any], history: Sequence[float] = (), columns: int | None = None) -> str:
    """A plain-text rendering of one observation for terminals and logs.

    ``columns``: the terminal's width; sections go two side by side only if that fits (None: always).
    """
    view = build_view(stats, history)
    lines = [view.title, f"  {view.config}", ""]
    width = max(len(label) for sec in view.sections for label, _ in sec.rows)
    vwidth = max(len(value) for sec in view.sections for _, value in sec.rows)
    # Sections two by two, side by side: learning | producers, rates | adapter, buffer | flusher; one by one when
    # two do not fit the terminal (a wrapped line would split every label of the right-hand section).
    side_by_side = columns is None or 4 + 2 * (width + vwidth + 2) + 4 <= columns
    pairs = (
        zip(view.sections[0::2], view.sections[1::2] + [Section("", [])])
        if side_by_side
        else ((sec, Section("", [])) for sec in view.sections)
    )
    for left, right in pairs:
        lines.append(f"  {left.title:<{width + vwidth + 6}}{right.title}")
        for i in range(max(len(left.rows), len(right.rows))):
            cells = [
                f"{p[0]:<{width}}  {p[1]:>{vwidth}}" if p else " " * (width + vwidth + 2) for p in (_at(left.rows, i), _at(right.rows, i))
            ]
            lines.append(f"    {cells[0]}    {cells[1]}".rstrip())
        lines += [f"    ({sec.title}: {sec.note})" if sec.title != "rates" else f"    ({sec.note})" for sec in (left, right) if sec.note]
        lines.append("")
    if view.history:
        lines += [f"  {view.history}", ""]
    if view.route_rows:
        lines.append(f"  {view.route_title}")
        lines += _columns(view.route_columns, view.route_rows)
        lines.append("")
    lines.append("  live lanes (records, drops: lane totals since the engine was created)")
    if view.lane_rows:
        lines += _columns(view.lane_columns, view.lane_rows)
    else:
        lines.append("    (none: no producer is attached)")
    lines += [f"  {note}" for note in view.notes]
    return "\n".join(lines)


def _columns(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """A small right-aligned table (the last column left-aligned), indented."""
    cols = [header, *rows]
    widths = [max(len(row[c]) for row in cols) for c in range(len(header))]
    return ["    " + "  ".join(cell.rjust(w) if c < len(row) - 1 else cell for c, (cell, w) in enumerate(zip(row, widths))) for row in cols]


def _at(pairs: list[tuple[str, str]], i: int) -> tuple[str, str] | None:
    return pairs[i] if i < len(pairs) else None


def render_rich(stats: EngineStats | Mapping[str, Any], history: Sequence[float] = ()) -> Any:
    """The same view as :func:`format_table` as a ``rich`` renderable (needs the ``monitor`` extra).

    The sections flow side by side, as many as the terminal holds (two at 80 columns, four or
    five at 160); labels and values never wrap, and each section's note is a line of its own under
    them (a caption would be squeezed to the section's width). Tables without rows are not
    drawn: a line says why.
    """
    from rich import box
    from rich.columns import Columns
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    view = build_view(stats, history)
    title = Text(view.title, style="bold green" if view.status == "alive" else "bold red")
    blocks = []
    for sec in view.sections:
        block = Table(title=sec.title, title_justify="left", show_header=False, box=None, padding=(0, 1))
        block.add_column(style="dim", no_wrap=True)
        block.add_column(justify="right", no_wrap=True)
        for label, value in sec.rows:
            style = "bold red" if value.startswith(("NOT RUNNING", "alive, STALLED", "DISCONNECTED")) else None
            block.add_row(label, Text(value, style=style or ""))
        blocks.append(block)
    grid = Columns(blocks, padding=(0, 4))
    section_notes = [
        Text(sec.note if sec.title == "rates" else f"{sec.title}: {sec.note}", style="dim") for sec in view.sections if sec.note
    ]
    extra: list[Any] = [Text(view.history, style="cyan")] if view.history else []
    if view.route_rows:
        routes = Table(title=view.route_title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for i, column in enumerate(view.route_columns):
            routes.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in view.route_rows:
            routes.add_row(*row)
        extra.append(routes)
    if view.lane_rows:
        lanes: Any = Table(
            title="live lanes (records, drops: lane totals)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
        )
        for i, column in enumerate(view.lane_columns):
            lanes.add_column(column, justify="left" if i == len(view.lane_columns) - 1 else "right", no_wrap=True)
        for row in view.lane_rows:
            lanes.add_row(*row)
    else:
        lanes = Text("live lanes: none (no producer is attached)")
    notes = [Text(note, style="yellow") for note in view.notes]
    return Group(title, Text(view.config, style="dim"), Text(""), grid, *section_notes, Text(""), *extra, lanes, *notes)


# ----------------------------------------------------------------- watching

#: What a watch frame saw: an observation, or the error that replaced it.
Frame = EngineStats | SegmentNotFoundError


def watch(
    name: str,
    interval: float,
    *,
    count: int | None = None,
    out: TextIO | None = None,
    renderer: str = "auto",
    reader: Callable[[str], EngineStats] | None = None,
) -> Frame | None:
    """Redraw the table every ``interval`` seconds, ``count`` times (None: until Ctrl-C); return the last frame.

    Each frame after the first carries the rates since the one before, and the table
    a sparkline of learned/s over the last :data:`HISTORY` frames. ``renderer``:
    ``"rich"``, ``"plain"`` (clear the screen with ANSI codes and print the table; on a
    non-terminal just print one table after the other) or ``"auto"`` (rich if it is
    installed and ``out`` is a terminal). A segment missing at the first frame raises
    :class:`SegmentNotFoundError`; later, the frame says so and the watch goes on.
    The caller decides what the last frame means (the CLI: an exit code).
    """
    out = out or sys.stdout
    reader = reader or read
    if renderer == "auto":
        renderer = "rich" if out.isatty() and importlib.util.find_spec("rich") is not None else "plain"
    frames = itertools.count() if count is None else range(count)
    last: Frame | None = None
    previous: EngineStats | None = None
    history: deque[float] = deque(maxlen=HISTORY)
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
                stats = reader(name).since(previous)
            except SegmentNotFoundError as exc:
                if frame == 0:
                    raise
                last, previous = exc, None
                history.clear()
                message = f"{exc}\n(waiting for it to come back; Ctrl-C to stop)"
            else:
                last = previous = stats
                if stats.rates is not None:
                    history.append(stats.rates.learned_per_s)
                elif history:
                    history.clear()  # a recreated engine starts a new history
            if live is not None:
                from rich.text import Text

                live.update(
                    render_rich(last, list(history)) if isinstance(last, EngineStats) else Text(message, style="bold red"), refresh=True
                )
            else:
                columns = shutil.get_terminal_size().columns if out.isatty() else None
                text = format_table(last, list(history), columns) if isinstance(last, EngineStats) else message
                out.write(("\x1b[H\x1b[2J" if out.isatty() else ("\n" if frame else "")) + text + "\n")
                out.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    finally:
        if live is not None:
            live.stop()
    return last
