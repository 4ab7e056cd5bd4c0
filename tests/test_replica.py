"""The replica without Redis: the outbox, applying the stream in order, what it refuses, snapshots."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sona_shm.fleet.replica import NeedResync, Replica, Snapshot, StreamEntry, host_key
from sona_shm.fleet.window import BadWindow, apply_sealed, read_window, write_window
from sona_shm.learn.learner import DeltaWindow, Window, initial_down
from sona_shm.learn.routes import RouteTable
from sona_shm.shm.layout import MAX_FLEET_HOSTS, EngineConfig, Layout

H, R, LR = 16, 2, 0.5
LAYOUT = Layout(
    EngineConfig(
        hidden_dim=H, rank=R, lr=LR, flush_threshold=10, capacity=4, max_steps=2, attention_dim=4, lanes=2, lane_slots=4, fleet_outbox=4
    )
)


class Registered(Replica):
    """A replica to which every host of the entries it applies is registered first, as its ``hello`` entry in the stream
    would register it (the tests of registration itself use a plain Replica)."""

    def apply(self, entries):
        for e in entries:
            if e.host and host_key(e.host) not in self._rows:
                self._new_row(host_key(e.host))
        return super().apply(entries)


def replica(host: str = "me", epoch: int = 7, registered: bool = True) -> Replica:
    state = np.zeros(1, LAYOUT.ledger_dtype)
    state[0]["down"] = initial_down(H, R)
    state[0]["fleet_epoch"] = epoch
    outbox = np.zeros((LAYOUT.fleet_outbox, LAYOUT.entry_bytes), np.uint8)
    return (Registered if registered else Replica)(LAYOUT, state, outbox, host, None)


def window(seq: int, n: int = 3, cum: int | None = None, value: float = 1.0) -> bytes:
    out = np.zeros(LAYOUT.entry_bytes, np.uint8)
    size = write_window(out, sums(value * seq, n), rank=R, seq=seq, cum=n * seq if cum is None else cum, sealed_at=1.0)
    return out[:size].tobytes()


def sums(value: float, n: int) -> Window:
    """A reference-rule window of ``n`` signals whose gradient sums are all ``value``."""
    return Window(np.full((R, H), float(value)), n)


NO_TABLE = np.zeros((0, H), np.float32), np.zeros(0, np.float32)


def apply_to(up: np.ndarray, down: np.ndarray, raw: bytes) -> None:
    apply_sealed(up, down, *NO_TABLE, read_window(raw, hidden_dim=H, rank=R, routing=False), LR)


def entry(ms: int, host: str, seq: int, prev: int | None = None, **kw) -> StreamEntry:
    return StreamEntry((ms, 0), host, seq, seq - 1 if prev is None else prev, window(seq, **kw), seq)


def test_sealing_fills_the_outbox_and_applying_own_windows_back_retires_them():
    r = replica()
    for k in range(4):
        r.seal(sums(k + 1, 3))
    assert (r.head, r.tail, r.outstanding) == (4, 0, 4)
    with pytest.raises(Exception, match="outbox is full"):
        r.seal(sums(1, 1))
    assert read_window(r.window_bytes(2), hidden_dim=H, rank=R, routing=False).cum == 6
    assert r.oldest_outstanding_at() is not None
    applied, foreign = r.apply([StreamEntry((1, i), "me", s, s - 1, r.window_bytes(s), s) for i, s in enumerate((1, 2))])
    assert (applied, foreign, r.tail, r.outstanding, r.cursor) == (2, False, 2, 2, (1, 1))
    r.seal(sums(1, 1))  # the freed entry is used again
    assert (r.head, r.outstanding) == (5, 3)


def test_entries_apply_in_order_once_and_the_table_follows_every_host():
    r = replica()
    expected_up = np.zeros((R, H), np.float32)
    expected_down = initial_down(H, R)
    entries = [entry(1, "a", 1), entry(2, "b", 1), entry(3, "a", 2), entry(4, "a", 2), entry(5, "b", 2)]
    for e in entries[:4]:
        if e.id != (4, 0):
            apply_to(expected_up, expected_down, e.windows)
    assert r.apply(entries[:4]) == (3, True)  # ("a", 2) twice: the second is skipped
    assert r.apply(entries[:4]) == (0, False)  # read twice: nothing
    assert r.st["up"].tobytes() == expected_up.tobytes()
    assert r.table() == {host_key("a"): (2, 6), host_key("b"): (1, 3)} and r.hosts == 2
    assert (int(r.st["fleet_entries"]), int(r.st["fleet_signals"]), r.cursor) == (3, 9, (4, 0))


def test_an_entry_that_does_not_follow_asks_for_a_resync():
    r = replica()
    r.apply([entry(1, "a", 1), entry(2, "a", 2)])
    with pytest.raises(NeedResync, match="missing here"):
        r.apply([entry(3, "a", 4, prev=3)])  # seq 3 of "a" was trimmed away before this replica read it
    with pytest.raises(NeedResync, match="Redis lost writes"):
        r.apply([entry(3, "a", 3, prev=1)])  # the stream holds "a" only up to 1: this replica applied a lost window


def test_a_gap_a_failover_left_is_counted_alike_everywhere():
    r = replica()
    r.apply([entry(1, "a", 1)])  # cum 3
    r.apply([entry(2, "a", 5, prev=1, cum=20)])  # windows 2..4 lost; 20 - 3 (this one) - 3 (up to 1) signals
    assert (int(r.st["fleet_lost_entries"]), int(r.st["fleet_lost_signals"])) == (3, 14)
    assert r.table()[host_key("a")] == (5, 20)


def group(ms: int, host: str, seqs: range, prev: int | None = None) -> StreamEntry:
    """One entry carrying windows ``seqs`` (consecutive) back to back, as the publish script writes them."""
    return StreamEntry((ms, 0), host, seqs[0], seqs[0] - 1 if prev is None else prev, b"".join(window(s) for s in seqs), seqs[-1])


def test_an_entry_of_many_windows_applies_them_in_order_like_one_entry_each():
    one_each, grouped = replica(), replica()
    one_each.apply([entry(i + 1, "a", s) for i, s in enumerate(range(1, 6))] + [entry(9, "b", 1)])
    assert grouped.apply([group(1, "a", range(1, 4)), group(2, "a", range(4, 6)), group(9, "b", range(1, 2))]) == (6, True)
    assert grouped.st["up"].tobytes() == one_each.st["up"].tobytes()
    assert grouped.table() == one_each.table() == {host_key("a"): (5, 15), host_key("b"): (1, 3)}
    assert (int(grouped.st["fleet_entries"]), int(grouped.st["fleet_signals"])) == (6, 18)
    assert grouped.apply([group(3, "a", range(1, 6))]) == (0, False)  # a repeat of windows applied already: skipped


def test_own_windows_in_one_entry_retire_together():
    r = replica()
    for k in range(3):
        r.seal(sums(k + 1, 2))
    raw = b"".join(r.window_bytes(s) for s in (1, 2, 3))
    assert r.apply([StreamEntry((1, 0), "me", 1, 0, raw, 3)]) == (3, False)
    assert (r.tail, r.outstanding) == (3, 0)


def test_own_windows_in_an_entry_counted_bad_are_retired_not_left_outstanding():
    """Every replica moves past a bad entry; the windows in it will never come back, so they leave the outbox."""
    r = replica()
    for k in range(3):
        r.seal(sums(k + 1, 2))
    raw = r.window_bytes(1) + r.window_bytes(2)[:-8] + np.float64("nan").tobytes() + r.window_bytes(3)  # window 2: a NaN
    assert r.apply([StreamEntry((1, 0), "me", 1, 0, raw, 3)]) == (1, False)
    assert int(r.st["fleet_bad_entries"]) == 1 and r.table()[host_key("me")][0] == 3
    assert (r.tail, r.outstanding) == (3, 0)


def test_an_entry_whose_windows_do_not_match_it_is_bad_alike_everywhere():
    r = replica()
    two = b"".join(window(s) for s in (1, 2))
    cases = [
        StreamEntry((1, 0), "a", 1, 0, two, 3),  # says three windows, carries two
        StreamEntry((2, 0), "b", 1, 0, two + b"x", 2),  # bytes past the last window
        StreamEntry((3, 0), "c", 1, 0, window(1) + window(3), 2),  # the second is not seq 2
    ]
    assert r.apply(cases) == (1, True)  # c's first window applies; the rest of each entry is bad
    assert int(r.st["fleet_bad_entries"]) == 3
    assert r.table() == {host_key("a"): (3, 0), host_key("b"): (2, 0), host_key("c"): (2, 3)}  # every seq moves past its entry


def test_a_window_that_is_not_the_seq_its_entry_says_changes_no_weight():
    """Counted bad from the first window that fails: that window is not applied either (it was, with nothing in
    ``applied`` or ``foreign`` to say the adapter changed, so the flusher did not bump the generation)."""
    r, expected = replica(), replica()
    expected.apply([entry(1, "c", 1)])
    assert r.apply([StreamEntry((1, 0), "c", 1, 0, window(1) + window(3), 2), StreamEntry((2, 0), "d", 1, 0, window(2), 1)]) == (1, True)
    assert int(r.st["fleet_bad_entries"]) == 2
    assert r.st["up"].tobytes() == expected.st["up"].tobytes()


def test_what_is_not_an_entry_is_counted_and_passed():
    r = replica()
    bad = StreamEntry((1, 0), "a", 1, 0, b"junk", 1)
    foreign = StreamEntry((2, 0), "", 0, 0, b"", 0)
    assert r.apply([bad, foreign, entry(3, "a", 2)]) == (1, True)
    assert int(r.st["fleet_bad_entries"]) == 2 and r.cursor == (3, 0) and r.table()[host_key("a")] == (2, 6)


def test_seqs_a_u64_cannot_hold_are_not_an_entry_of_ours_counted_bad_never_a_crash():
    """A writer outside sona_shm may put any integer in s, e and p: the table holds u64 (an ``e`` of 2**64 raised
    OverflowError out of apply, stopping every flusher), and a ``p`` beyond it must not make every replica resync forever."""
    from sona_shm.fleet.stream import _entries

    def row(ms: int, s: int, e: int, p: int) -> tuple:
        return (f"{ms}-0".encode(), {b"h": b"a", b"s": str(s).encode(), b"e": str(e).encode(), b"p": str(p).encode(), b"w": window(1)})

    rows = [row(1, 1, 2**64, 0), row(2, 1, 1, 2**64), row(3, 1, 1, -1), row(4, -1, 1, 0), row(5, 1, 1, 0)]
    r = replica()
    assert r.apply(_entries(rows)) == (1, True)
    assert int(r.st["fleet_bad_entries"]) == 4 and r.cursor == (5, 0) and r.table() == {host_key("a"): (1, 3)}


def hello(ms: int, host: str, registered: bool = True) -> StreamEntry:
    return StreamEntry((ms, 0), host, 0, 0, b"", 0, kind="hello" if registered else "bye")


def test_more_hosts_than_the_table_holds_are_bad_entries_alike_everywhere():
    r = replica(registered=False)
    r.apply([hello(i + 1, f"h{i}") for i in range(MAX_FLEET_HOSTS + 1)])
    assert r.hosts == MAX_FLEET_HOSTS and int(r.st["fleet_bad_entries"]) == 1


def test_only_registered_hosts_get_a_row_so_ghost_hosts_lock_no_one_out():
    """Entries of hosts that never registered (a writer outside sona_shm: 70 made-up host ids) are counted bad and take
    no row of the applied table; a host that registers later gets its row and its windows apply."""
    r = replica(registered=False)
    assert r.apply([entry(i + 1, f"ghost{i}", 1) for i in range(70)]) == (0, False)
    assert r.hosts == 0 and int(r.st["fleet_bad_entries"]) == 70
    assert r.apply([hello(100, "real"), entry(101, "real", 1)]) == (1, True)
    assert r.table() == {host_key("real"): (1, 3)}
    r.apply([hello(102, "real")])  # registered again (Redis lost its host list): keeps its row and seq
    assert r.table() == {host_key("real"): (1, 3)}
    r.apply([hello(103, "real", registered=False)])  # `sona-shm fleet remove-host`: the row is free again
    assert r.hosts == 0 and int(r.st["fleet_bad_entries"]) == 70


def test_a_gap_entry_and_given_up_windows_are_counted_lost_alike_everywhere():
    r = replica()
    r.apply([entry(1, "a", 1)])  # cum 3
    gap = StreamEntry((2, 0), "a", 5, 1, b"", 4, kind="gap", cum=30)  # windows 2..4 lost, a's total 30 at 4
    r.apply([gap, entry(3, "a", 5, cum=33)])
    assert (int(r.st["fleet_lost_entries"]), int(r.st["fleet_lost_signals"])) == (3, 27)
    assert r.table()[host_key("a")] == (5, 33) and int(r.st["fleet_signals"]) == 6
    given = StreamEntry((4, 0), "a", 2, 0, b"", 0, kind="given", cum=11)  # 2 windows, 11 signals given up
    r.apply([given])
    assert (int(r.st["fleet_lost_entries"]), int(r.st["fleet_lost_signals"])) == (5, 38)
    assert r.table()[host_key("a")] == (5, 33)  # the seq of the host id is the new owner's: unchanged


def test_a_snapshot_carries_the_fleet_state_and_loading_it_retires_own_windows():
    r = replica("me")
    for k in range(3):
        r.seal(sums(k + 1, 2))
    r.apply([StreamEntry((5, 0), "me", 1, 0, r.window_bytes(1), 1), entry(6, "a", 1)])
    snap = Snapshot.from_fields({k.encode(): v for k, v in r.snapshot(now=3.0).to_fields().items()})
    assert snap.cursor == (6, 0) and snap.entries == 2 and snap.table == r.table() and snap.epoch == 7
    # Another segment of the same host (here: the same outbox, one more window applied elsewhere).
    other = replica("me", epoch=0)
    other.rebase(0)
    for k in range(3):
        other.seal(sums(k + 1, 2))
    other.load(snap)
    assert other.st["up"].tobytes() == r.st["up"].tobytes() and other.cursor == (6, 0) and other.tail == 1
    assert int(other.st["fleet_resyncs"]) == 0  # joining is not a resync
    other.load(snap)
    assert int(other.st["fleet_resyncs"]) == 1


def test_speculated_weights_are_the_fleet_adapter_with_own_outstanding_windows():
    r = replica()
    r.seal(sums(1.0, 2))
    r.seal(sums(3.0, 4))
    up, down, vectors, bias = r.speculate()
    want_up, want_down = r.st["up"].copy(), r.st["down"].copy()
    for seq in (1, 2):
        apply_to(want_up, want_down, r.window_bytes(seq))
    assert up.tobytes() == want_up.tobytes() and down.tobytes() == want_down.tobytes()
    assert vectors.shape == (0, H) and bias.shape == (0,)


def test_the_c_and_numpy_appliers_agree_on_every_bit_and_on_what_is_not_a_window():
    from sona_shm.native import speedups as _speedups

    if _speedups is None:
        pytest.skip("the C fast paths are not built")
    rng = np.random.default_rng(5)
    for n, scale in ((1, 1.0), (3, 1e38), (9, 1e-3)):
        out = np.zeros(LAYOUT.entry_bytes, np.uint8)
        size = write_window(out, Window(rng.standard_normal((R, H)) * scale, n), rank=R, seq=4, cum=9, sealed_at=2.0)
        raw = out[:size].tobytes()
        start = (rng.standard_normal((R, H)) * 1e37).astype(np.float32)
        c, py = start.copy(), start.copy()
        assert _speedups.apply_window(c, raw, 0.7, H, R) == (4, n, 9, 2.0)
        sealed = read_window(raw, hidden_dim=H, rank=R, routing=False)
        apply_sealed(py, np.zeros_like(py), *NO_TABLE, sealed, 0.7)
        assert c.tobytes() == py.tobytes()
        for bad in (raw[:-8], raw[:64] + np.full(size // 8 - 8, np.nan).tobytes(), b"SFW2" + raw[4:]):
            assert _speedups.apply_window(c, bad, 0.7, H, R) is None
            with pytest.raises(BadWindow):
                read_window(bad, hidden_dim=H, rank=R, routing=False)


# ----------------------------------------------------------------- the routing rule's windows (SFW2)

K, KM = 3, 5
ROUTING = Layout(
    EngineConfig(
        hidden_dim=H,
        rank=R,
        lr=LR,
        flush_threshold=10,
        capacity=0,
        max_steps=1,
        attention_dim=0,
        lanes=2,
        lane_slots=4,
        fleet_outbox=4,
        rule="routing",
        routes=K,
        max_routes=KM,
    )
)
TABLE = RouteTable.build(np.random.default_rng(1).standard_normal((K, H)).astype(np.float32), ["a", "b", "c"])


def routing_replica(host: str = "me", epoch: int = 7) -> Replica:
    state = np.zeros(1, ROUTING.ledger_dtype)
    st = state[0]
    st["down"] = initial_down(H, R)
    st["route_vectors"][:K] = TABLE.unit
    st["route_state"][:K] = 1
    st["routes_used"] = K
    st["fleet_epoch"] = epoch
    outbox = np.zeros((ROUTING.fleet_outbox, ROUTING.entry_bytes), np.uint8)
    return Registered(ROUTING, state, outbox, host, TABLE)


def deltas(seed: int, rows: list[int], n: int = 2, adapter: bool = False) -> DeltaWindow:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    up, down = (rng.standard_normal((R, H)).astype(f32), rng.standard_normal((R, H)).astype(f32)) if adapter else (None, None)
    return DeltaWindow(
        up, down, rng.standard_normal(K).astype(f32), np.array(rows, np.int64), rng.standard_normal((len(rows), H)).astype(f32), n
    )


def test_a_routing_window_carries_the_rows_it_touched_and_every_replica_applies_it_alike():
    mine, other = routing_replica("me"), routing_replica("other")
    before = other.st["route_vectors"].copy()
    mine.seal(deltas(1, [0, 2]))
    mine.seal(deltas(2, [1], adapter=True))
    sealed = read_window(mine.window_bytes(1), hidden_dim=H, rank=R, routing=True, max_routes=K)
    assert sealed.window.rows.tolist() == [0, 2] and sealed.window.up is None and sealed.cum == 2
    entries = [StreamEntry((1, i), "me", s, s - 1, mine.window_bytes(s), s) for i, s in enumerate((1, 2))]
    assert mine.apply(entries) == (2, False) and other.apply(entries) == (2, True)
    assert (mine.tail, mine.outstanding) == (2, 0)
    for name in ("up", "down", "route_vectors", "route_bias"):
        assert mine.st[name].tobytes() == other.st[name].tobytes(), name
    assert (other.st["route_vectors"][K:] == before[K:]).all()  # rows no route uses stay as they were
    w = deltas(1, [0, 2])
    want = before[0].astype(np.float64) + w.vectors[0].astype(np.float64)
    assert other.st["route_vectors"][0].tobytes() == want.astype(np.float32).tobytes()


def test_a_routing_window_of_more_routes_than_the_engine_has_is_bad():
    big = Layout(dataclasses.replace(ROUTING.config, max_routes=KM))
    r = routing_replica()
    out = np.zeros(big.entry_bytes, np.uint8)
    w = deltas(3, [0])
    wide = DeltaWindow(None, None, np.zeros(K + 1, np.float32), w.rows, w.vectors, 2)
    size = write_window(out, wide, rank=R, seq=1, cum=2, sealed_at=1.0)
    assert r.apply([StreamEntry((1, 0), "x", 1, 0, out[:size].tobytes(), 1)]) == (0, False)
    assert int(r.st["fleet_bad_entries"]) == 1


def test_routing_speculation_and_snapshots_carry_the_learned_route_table():
    r = routing_replica()
    r.apply([StreamEntry((1, 0), "x", 1, 0, _routing_bytes(deltas(4, [1]), 1), 1)])
    r.seal(deltas(5, [0, 1], adapter=True))
    up, down, vectors, bias = r.speculate()
    want = routing_replica()
    want.apply(
        [StreamEntry((1, 0), "x", 1, 0, _routing_bytes(deltas(4, [1]), 1), 1), StreamEntry((2, 0), "me", 1, 0, r.window_bytes(1), 1)]
    )
    for got, name in ((up, "up"), (down, "down"), (vectors, "route_vectors"), (bias, "route_bias")):
        assert got.tobytes() == want.st[name][: len(got)].tobytes(), name
    snap = Snapshot.from_fields({k.encode(): v for k, v in r.snapshot(now=3.0).to_fields().items()})
    fresh = routing_replica("new", epoch=0)
    fresh.load(snap)
    for name in ("up", "down", "route_vectors", "route_bias"):
        assert fresh.st[name].tobytes() == r.st[name].tobytes(), name


def _routing_bytes(window: DeltaWindow, seq: int) -> bytes:
    out = np.zeros(ROUTING.entry_bytes, np.uint8)
    return out[: write_window(out, window, rank=R, seq=seq, cum=seq * window.n, sealed_at=1.0)].tobytes()


@pytest.mark.parametrize(
    "change",
    [
        {"table": {f"{host_key('a'):016x}": [2**64, 1]}},  # a seq the applied table (u64) cannot hold
        {"table": {f"{host_key('a'):016x}": [1, -1]}},
        {"table": {f"{host_key('a'):016x}": [1.5, 1]}},
        {"table": {"zz": [1, 1]}},
        {"table": {f"{host_key('a'):016x}": [1]}},
        {"table": []},
        {"entries": 2**64},
        {"signals": True},
        {"lost_signals": "3"},
    ],
)
def test_a_hostile_snapshot_is_a_bad_snapshot_never_a_crash(change):
    import json

    from sona_shm.fleet.replica import BadSnapshot

    good = {k.encode(): v for k, v in replica().snapshot(now=1.0).to_fields().items()}
    state = json.loads(good[b"state"])
    state.update(change)
    with pytest.raises(BadSnapshot):
        Snapshot.from_fields({**good, b"state": json.dumps(state).encode()})
    for field, value in (
        (b"epoch", str(2**64).encode()),
        (b"epoch", b"0"),
        (b"id", b"1-2-3"),
        (b"id", f"{2**64}-0".encode()),
        (b"state", b"{"),
    ):
        with pytest.raises(BadSnapshot):
            Snapshot.from_fields({**good, field: value})
    Snapshot.from_fields(good)  # the unchanged one reads


def test_the_c_and_numpy_appliers_of_routing_windows_agree_on_every_bit_and_on_what_is_not_a_window():
    from sona_shm.native import speedups as _speedups

    if _speedups is None:
        pytest.skip("the C fast paths are not built")
    rng = np.random.default_rng(9)
    f32 = np.float32
    for adapter, rows, scale in ((False, [0, 2], 1.0), (True, [1], 1e38), (True, [], 1e-3), (False, [0, 1, 2], 1e38)):
        up, down = (
            ((np.clip(rng.standard_normal((R, H)), -3, 3) * scale).astype(f32), rng.standard_normal((R, H)).astype(f32))
            if adapter
            else (None, None)
        )
        window = DeltaWindow(
            up,
            down,
            rng.standard_normal(K).astype(f32),
            np.array(rows, np.int64),
            (np.clip(rng.standard_normal((len(rows), H)), -3, 3) * scale).astype(f32),  # finite in float32
            3,
        )
        raw = _routing_bytes(window, 4)
        big = float(np.finfo(f32).max)  # starts near the float32 limit: the sums saturate, alike on both paths
        start = [
            np.clip(rng.standard_normal((R, H)) * 2e38, -big, big).astype(f32),
            rng.standard_normal((R, H)).astype(f32),
            np.clip(rng.standard_normal((KM, H)) * 3e38, -big, big).astype(f32),
            rng.standard_normal(KM).astype(f32),
        ]
        c, py = [a.copy() for a in start], [a.copy() for a in start]
        assert _speedups.apply_deltas_window(*c, raw, H, R, K) == (4, 3, 12, 1.0)
        apply_sealed(*py, read_window(raw, hidden_dim=H, rank=R, routing=True, max_routes=K), LR)
        for a, b in zip(c, py):
            assert a.tobytes() == b.tobytes()
        nan = bytearray(raw)
        nan[-4:] = np.float32("nan").tobytes()
        swapped = bytearray(raw)
        if len(rows) > 1:  # rows out of order
            at = 64 + (2 * R * H * 4 if adapter else 0) + 4 * K
            swapped[at : at + 4] = np.array(rows[:2][::-1], "<u2").tobytes()
        for bad, max_routes in ((raw[:-4], K), (bytes(nan), K), (b"SFW1" + raw[4:], K), (raw, K - 1), (bytes(swapped), K)):
            if bad is raw and max_routes == K:
                continue
            if bytes(bad) == raw and max_routes == K:
                continue  # nothing swapped: one row
            before = [a.copy() for a in c]
            assert _speedups.apply_deltas_window(*c, bad, H, R, max_routes) is None
            with pytest.raises(BadWindow):
                read_window(bad, hidden_dim=H, rank=R, routing=True, max_routes=max_routes)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(c, before))  # nothing changed
