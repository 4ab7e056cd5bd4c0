"""The binary layout: offsets as documented, headers validated, sizes honest."""

from __future__ import annotations

import struct

import pytest

from sona_shm import InvalidInputError, LayoutMismatchError
from sona_shm.config import DEFAULT_LR
from sona_shm.shm.layout import HEADER_FORMAT, LAYOUT_VERSION, MAGIC, PAGE, EngineConfig, Layout


def test_documented_slot_offsets():
    layout = Layout(EngineConfig(hidden_dim=256, max_steps=8, attention_dim=64))
    d = layout.slot_dtype
    fields = ("seq", "traj_id", "latency_us", "quality", "n_steps", "route_len", "route_index", "best_index", "meta")
    assert [d.fields[f][1] for f in fields] == [0, 8, 16, 24, 28, 30, 32, 34, 40]
    assert d.fields["route"][1] == 40 + 8 * 8
    assert d.fields["query"][1] == layout.payload_offset == 192
    assert d.fields["steps"][1] == 192 + 4 * 256
    assert layout.step_bytes == 4 * (256 + 64)
    # big slots are page-aligned so a short trajectory touches only its first page
    assert layout.slot_bytes == 3 * PAGE and layout.prefix_bytes(1) <= PAGE
    assert layout.slots_offset % PAGE == 0 and layout.buffer_offset % PAGE == 0


def test_small_slots_are_line_aligned():
    layout = Layout(EngineConfig(hidden_dim=8, max_steps=2, attention_dim=2))
    assert layout.slot_bytes % 64 == 0 and layout.slot_bytes < PAGE


def test_ledger_fields_are_aligned():
    layout = Layout(EngineConfig(hidden_dim=5, rank=1, lanes=3))
    for name, (dtype, offset) in layout.ledger_dtype.fields.items():
        assert offset % dtype.base.itemsize == 0, name
    assert layout.ledger_bytes % 64 == 0


def header(layout: Layout, **changes) -> bytes:
    raw = bytearray(layout.pack_header())
    raw[:8] = MAGIC
    for offset, fmt, value in changes.values():
        struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(hidden_dim=64, rank=1, lr=0.01, flush_threshold=7, lanes=3),
        EngineConfig(hidden_dim=64, rank=2, flush_threshold=7, lanes=3, rule="routing", routes=5, temperature=4.5),
    ],
)
def test_header_round_trip(config):
    layout = Layout(config)
    again = Layout.from_header(header(layout), "x", layout.total_bytes)
    assert again.config == layout.config and again.total_bytes == layout.total_bytes


def test_route_table_region_sits_between_ledger_and_lanes():
    layout = Layout(EngineConfig(hidden_dim=10, routes=3, lanes=2))
    assert layout.max_routes == 19  # 3 routes and room for 16 more (config.default_max_routes)
    assert layout.routes_offset == layout.ledger_offset + 2 * layout.ledger_bytes
    assert layout.routes_bytes >= 19 * 10 * 4 and layout.routes_bytes % 64 == 0
    assert layout.admin_offset == layout.routes_offset + layout.routes_bytes and layout.admin_bytes >= 8640 + 4 * 10
    assert layout.lanes_offset == layout.admin_offset + layout.admin_bytes
    assert layout.ledger_dtype["route_chosen"].shape == (19,) and layout.ledger_dtype["route_vectors"].shape == (19, 10)
    assert layout.ledger_dtype["work_vectors"].shape == (0, 10)  # the reference rule has no working copy
    routing = Layout(EngineConfig(hidden_dim=10, routes=3, lanes=2, rule="routing", max_routes=5))
    assert routing.ledger_dtype["work_vectors"].shape == (5, 10) and routing.ledger_dtype["route_centre"].shape == (10,)
    none = Layout(EngineConfig(hidden_dim=10, lanes=2))
    assert none.routes_bytes == 0 and none.ledger_dtype["route_reward"].shape == (0,)
    assert none.admin_bytes == layout.admin_bytes  # every engine has the admin mailbox: pause, resume, rollback


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(magic=(0, "8s", b"NOTSONA!")), "not a sona_shm segment"),
        (dict(version=(8, "I", LAYOUT_VERSION + 1)), f"layout version {LAYOUT_VERSION + 1}"),
        (dict(rule=(112, "I", 7)), "corrupt header"),
        (dict(rank=(28, "I", 3)), "corrupt header"),
        (dict(slots=(88, "Q", 12345)), "disagree with its dimensions"),
    ],
)
def test_bad_headers_are_refused_with_the_fix(change, fragment):
    layout = Layout(EngineConfig(hidden_dim=16, lanes=2))
    with pytest.raises(LayoutMismatchError, match=fragment):
        Layout.from_header(header(layout, **change), "x", layout.total_bytes)


def test_truncated_segment_is_refused():
    layout = Layout(EngineConfig(hidden_dim=16, lanes=2))
    with pytest.raises(LayoutMismatchError, match="truncated"):
        Layout.from_header(header(layout), "x", layout.total_bytes - PAGE)
    assert struct.calcsize(HEADER_FORMAT) < 1024  # control lines start at 1024


@pytest.mark.parametrize(
    "field, value",
    [("lanes", 0), ("max_steps", -1), ("lane_slots", 0), ("attention_dim", 1.5), ("rule", "sgd"), ("routes", 1), ("routes", 257)]
    + [("temperature", v) for v in (0, -1.0, float("nan"), float("inf"), 1e4, 10**400)]
    + [("lr", v) for v in (0, -0.1, float("nan"), True, 10**400, "0.1")],
)
def test_bad_engine_config(field, value):
    with pytest.raises(InvalidInputError, match=field):
        EngineConfig(**{field: value})


def test_routing_rule_needs_routes_and_defaults_its_own_lr():
    with pytest.raises(InvalidInputError, match="routes: the routing rule"):
        EngineConfig(rule="routing")
    assert EngineConfig(rule="routing", routes=4).lr == DEFAULT_LR["routing"] != DEFAULT_LR["reference"] == EngineConfig().lr == 0.002
    assert EngineConfig(rule="routing", routes=4, lr=0.5).lr == 0.5


def test_differences_name_each_field():
    layout = Layout(EngineConfig(hidden_dim=16))
    assert layout.differences({"hidden_dim": 32, "rank": 1, "lr": 0.002}) == [
        "hidden_dim: segment has 16, requested 32",
        "rank: segment has 2, requested 1",
    ]
