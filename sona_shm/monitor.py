"""The monitor: an engine's counters, read without taking a lock or writing a byte.

Totals are sums of one-writer words (the pattern of prometheus_client's multiprocess
mode); the flusher's figures come from one consistent ledger read. Liveness comes from
the kernel's lock table (who holds the flusher lock and each lane lock), so a pid
recycled by the OS never looks alive.
"""

from __future__ import annotations

import time
from typing import Any

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
from .segment import Segment

METRICS = ("trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied")


def collect_stats(segment: Segment, ledger: Ledger) -> dict[str, Any]:
    """Everything a user asks about an engine, as plain JSON-able values."""
    layout = segment.layout
    u64, f64 = segment.u64, segment.f64
    fields = METRICS + ("pending", "generation", "buffer_head", "buffer_dropped", "last_flush_at", "lane_tail")
    # The tail before the head: the tail never passes the head, so len is never negative.
    buffer_tail = u64[(CONSUMER_LINE + CONS_TAIL) // 8]
    values = dict(zip(fields, ledger.read(*fields)))
    tails = values.pop("lane_tail")
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
            "segment_bytes": layout.total_bytes,
        },
        **{m: values[m] for m in METRICS},
        "pending_signals": values["pending"],
        "weights_generation": values["generation"],
        "last_flush_at": values["last_flush_at"] or None,
        "recorded": recorded,
        "lane_dropped": dropped,
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


def format_table(stats: dict[str, Any]) -> str:
    """A plain-text rendering of :func:`collect_stats` for terminals."""
    now = time.time()
    fl = stats["flusher"]
    buf = stats["buffer"]

    def age(t: float | None) -> str:
        return "-" if not t else f"{now - t:.1f}s ago"

    lines = [
        f"engine {stats['name']!r}  (hidden {stats['config']['hidden_dim']}, rank {stats['config']['rank']}, "
        f"lr {stats['config']['lr']}, flush every {stats['config']['flush_threshold']})",
        "",
        f"  trajectories_processed {stats['trajectories_processed']:>12}   recorded       {stats['recorded']:>12}",
        f"  signals_accumulated    {stats['signals_accumulated']:>12}   lane drops     {stats['lane_dropped']:>12}",
        f"  flushes_performed      {stats['flushes_performed']:>12}   pending        {stats['pending_signals']:>12}",
        f"  updates_applied        {stats['updates_applied']:>12}   weights gen    {stats['weights_generation']:>12}",
        f"  buffer len {buf['len']} / {buf['capacity']}, dropped {buf['dropped']}, success rate {buf['success_rate']:.4f}, "
        f"drained {buf['drained']} (last {age(buf['drained_at'])})",
        "",
        f"  flusher pid {fl['pid']}  {'alive' if fl['alive'] else 'NOT RUNNING'}  heartbeat {age(fl['heartbeat_at'])}"
        f"  last flush {age(stats['last_flush_at'])}",
        "",
        f"  {'lane':>4} {'pid':>8} {'alive':>5} {'records':>10} {'learned':>10} {'drops':>8}  last record",
    ]
    for lane in stats["lanes"]:
        lines.append(
            f"  {lane['lane']:>4} {lane['pid']:>8} {('yes' if lane['alive'] else 'no'):>5} {lane['records']:>10} "
            f"{lane['learned']:>10} {lane['drops']:>8}  {age(lane['last_record_at'])}"
        )
    return "\n".join(lines)
