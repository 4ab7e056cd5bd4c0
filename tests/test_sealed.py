"""Sealed windows: their bytes, their checks, and the arithmetic every replica applies them with."""

from __future__ import annotations

import numpy as np
import pytest

from sona_shm.fleet.window import BadWindow, _write_sums, apply_sealed, max_window_bytes, read_window, window_length, write_window
from sona_shm.learn.learner import DeltaWindow, Learner, Window
from sona_shm.shm.layout import WINDOW_HEAD_BYTES

H, R, K = 16, 2, 4
NO_TABLE = np.zeros((0, H), np.float32), np.zeros(0, np.float32)


def encode(window: Window | DeltaWindow, *, cum: int | None = None, seq: int = 1) -> bytes:
    out = np.zeros(max_window_bytes(H, R, K, routing=True) + 8 * H * R, np.uint8)
    size = write_window(out, window, rank=R, seq=seq, cum=window.n if cum is None else cum, sealed_at=12.5)
    assert window_length(out) == size
    return out[:size].tobytes()


def test_a_window_reads_back_as_written_and_identical_rows_are_written_once():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(H)
    raw = encode(Window(np.stack([row, row]), 5))
    assert len(raw) == WINDOW_HEAD_BYTES + 8 * H  # the reference rule's rows are one signal sum
    w = read_window(raw, hidden_dim=H, rank=R, routing=False)
    assert (w.seq, w.n, w.cum, w.sealed_at) == (1, 5, 5, 12.5) and w.window.grad_up.shape == (1, H)
    assert w.window.grad_up.tobytes() == row.tobytes()


def test_a_routing_window_carries_its_deltas_and_only_the_rows_it_touched():
    rng = np.random.default_rng(4)
    f32 = np.float32
    rows = np.array([0, 3], np.int64)
    delta = DeltaWindow(None, None, rng.standard_normal(K).astype(f32), rows, rng.standard_normal((2, H)).astype(f32), 7)
    raw = encode(delta)
    assert len(raw) == WINDOW_HEAD_BYTES + 4 * K + 4 + 4 * 2 * H  # no adapter, 4 biases, 2 row numbers (4 bytes), 2 rows
    w = read_window(raw, hidden_dim=H, rank=R, routing=True, max_routes=K).window
    assert w.up is None and w.rows.tolist() == [0, 3] and w.bias.tobytes() == delta.bias.tobytes()
    assert w.vectors.tobytes() == delta.vectors.tobytes() and w.n == 7
    adapter = DeltaWindow(*(rng.standard_normal((R, H)).astype(f32) for _ in range(2)), delta.bias, rows[:0], np.zeros((0, H), f32), 1)
    w = read_window(encode(adapter), hidden_dim=H, rank=R, routing=True, max_routes=K).window
    assert w.up.tobytes() == adapter.up.tobytes() and w.down.tobytes() == adapter.down.tobytes() and len(w.rows) == 0
    assert max_window_bytes(H, R, K, routing=True) == WINDOW_HEAD_BYTES + 4 * H * (2 * R + K) + 4 * K + 8


def test_rows_equal_but_for_the_sign_of_a_zero_are_kept_apart():
    """0.0 and -0.0 compare equal but are other bits: one row for both would change the sum's bits."""
    a = np.zeros((R, H))
    a[1, 3] = -0.0
    assert read_window(encode(Window(a, 5)), hidden_dim=H, rank=R, routing=False).window.grad_up.shape == (R, H)


def test_applying_a_window_is_the_learners_flush_bit_for_bit():
    """Both rules, also where float32 saturates: the same arithmetic, element by element."""
    rng = np.random.default_rng(2)
    unit = np.eye(K, H, dtype=np.float32)
    for n, scale in ((1, 1.0), (7, 1e3), (100, 1e40)):
        learner = Learner(H, R, 0.37, 100, unit=unit)
        learner.up[...] = rng.standard_normal((R, H)).astype(np.float32) * np.float32(1e38)
        grad_up = rng.standard_normal((R, H)) * scale
        grad_up[1] = grad_up[0]
        up, down = learner.up.copy(), learner.down.copy()
        learner.grad_up[...], learner.pending = grad_up, n
        window = learner.close_window()
        learner.apply(window)
        apply_sealed(up, down, *NO_TABLE, read_window(encode(window), hidden_dim=H, rank=R, routing=False), 0.37)
        assert up.tobytes() == learner.up.tobytes() and np.isfinite(up).all()

        routing = Learner(H, R, 1.0, 100, rule="routing", unit=unit, adapter_lr=0.1)
        routing.route_vectors[1] *= np.float32(3e38)
        state = [routing.up.copy(), routing.down.copy(), routing.route_vectors.copy(), routing.route_bias.copy()]
        routing.work_vectors[1] += np.float32(3e38) * np.float32(scale > 1)  # saturates where scale is large
        routing.work_vectors[2] += rng.standard_normal(H).astype(np.float32)
        routing.work_bias[:K] += rng.standard_normal(K).astype(np.float32)
        routing.work_up += rng.standard_normal((R, H)).astype(np.float32)
        routing.pending = n
        window = routing.close_window()
        routing.apply(window)
        apply_sealed(*state, read_window(encode(window), hidden_dim=H, rank=R, routing=True, max_routes=K), 1.0)
        for got, name in zip(state, ("up", "down", "route_vectors", "route_bias")):
            assert got.tobytes() == getattr(routing, name).tobytes(), name
            assert np.isfinite(got).all()


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[:10], "at least 64 bytes"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + (17).to_bytes(4, "little") + b[8:], "shape"),
        (lambda b: b + b"\0" * 8, "its header says"),
        (lambda b: b[:24] + (0).to_bytes(8, "little") + b[32:], "n 0"),
        (lambda b: b[:32] + (2).to_bytes(8, "little") + b[40:], "cum 2"),
        (lambda b: b[:-8] + np.float64("nan").tobytes(), "not finite"),
    ],
)
def test_what_is_not_a_window_of_this_fleet_is_refused(damage, why):
    raw = encode(Window(np.ones((R, H)), 5))
    with pytest.raises(BadWindow, match=why):
        read_window(damage(raw), hidden_dim=H, rank=R, routing=False)
    with pytest.raises(BadWindow, match="magic"):
        read_window(raw, hidden_dim=H, rank=R, routing=True, max_routes=K)  # the other rule's window


@pytest.mark.parametrize(
    "rows, routes, max_routes, why",
    [
        ([1, 0], K, K, "ascending"),
        ([2, 2], K, K, "ascending"),
        ([K], K + 1, K, "shape"),  # more routes than the engine has
        ([0], K, K - 1, "shape"),
    ],
)
def test_a_routing_window_with_rows_out_of_order_or_too_many_routes_is_refused(rows, routes, max_routes, why):
    f32 = np.float32
    window = DeltaWindow(None, None, np.zeros(routes, f32), np.array(rows, np.int64), np.ones((len(rows), H), f32), 1)
    with pytest.raises(BadWindow, match=why):
        read_window(encode(window), hidden_dim=H, rank=R, routing=True, max_routes=max_routes)


def test_the_c_and_numpy_encoders_write_the_same_bytes():
    from sona_shm.native import speedups as _speedups

    if _speedups is None:
        pytest.skip("the C fast paths are not built")
    rng = np.random.default_rng(3)
    same = np.stack([rng.standard_normal(H)] * R)
    signed = np.zeros((R, H))
    signed[1, 5] = -0.0
    for grad_up in (same, signed, rng.standard_normal((R, H))):
        a, b = np.full(WINDOW_HEAD_BYTES + 8 * H * 4, 7, np.uint8), np.full(WINDOW_HEAD_BYTES + 8 * H * 4, 7, np.uint8)
        kw = dict(seq=2**40, n=77, cum=2**50, sealed_at=1.5e9)
        assert _speedups.write_window(a, grad_up, *kw.values()) == _write_sums(b, grad_up, **kw)
        assert a.tobytes() == b.tobytes()
