"""Sealed windows: their bytes, their checks, and the arithmetic every replica applies them with."""

from __future__ import annotations

import numpy as np
import pytest

from sona_shm.fleet.window import BadWindow, apply_window, read_window, window_length, write_window
from sona_shm.learn.learner import Learner
from sona_shm.shm.layout import WINDOW_HEAD_BYTES

H, R = 16, 2


def encode(grad_up: np.ndarray, grad_down: np.ndarray | None, *, n: int = 5, cum: int = 5, seq: int = 1) -> bytes:
    out = np.zeros(WINDOW_HEAD_BYTES + 8 * H * 4, np.uint8)
    size = write_window(out, seq=seq, n=n, cum=cum, sealed_at=12.5, grad_up=grad_up, grad_down=grad_down)
    assert window_length(out) == size
    return out[:size].tobytes()


def test_a_window_reads_back_as_written_and_identical_rows_are_written_once():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(H)
    same = np.stack([row, row])
    raw = encode(same, None)
    assert len(raw) == WINDOW_HEAD_BYTES + 8 * H  # the reference rule's rows are one signal sum
    w = read_window(raw, hidden_dim=H, rank=R, routing=False)
    assert (w.seq, w.n, w.cum, w.sealed_at) == (1, 5, 5, 12.5) and w.grad_up.shape == (1, H) and w.grad_down is None
    assert w.grad_up.tobytes() == row.tobytes()
    both = rng.standard_normal((R, H)), rng.standard_normal((R, H))
    w = read_window(encode(*both), hidden_dim=H, rank=R, routing=True)
    assert w.grad_up.tobytes() == both[0].tobytes() and w.grad_down.tobytes() == both[1].tobytes()


def test_rows_equal_but_for_the_sign_of_a_zero_are_kept_apart():
    """0.0 and -0.0 compare equal but are other bits: one row for both would change the sum's bits."""
    a = np.zeros((R, H))
    a[1, 3] = -0.0
    assert read_window(encode(a, None), hidden_dim=H, rank=R, routing=False).grad_up.shape == (R, H)


@pytest.mark.parametrize("rule", ["reference", "routing"])
def test_applying_a_window_is_learner_flush_bit_for_bit(rule):
    """Also where float32 saturates: the same arithmetic, element by element."""
    rng = np.random.default_rng(2)
    for n, scale in ((1, 1.0), (7, 1e3), (100, 1e40)):
        learner = Learner(H, R, 0.37, 100, rule=rule, unit=np.eye(4, H, dtype=np.float32))
        learner.up[...] = rng.standard_normal((R, H)).astype(np.float32) * np.float32(1e38)
        grad_up, grad_down = rng.standard_normal((R, H)) * scale, rng.standard_normal((R, H)) * scale
        if rule == "reference":
            grad_up[1] = grad_up[0]
        up, down = learner.up.copy(), learner.down.copy()
        learner.grad_up[...], learner.grad_down[...], learner.pending = grad_up, grad_down, n
        learner.flush()
        window = read_window(
            encode(grad_up, grad_down if rule == "routing" else None, n=n, cum=n), hidden_dim=H, rank=R, routing=rule == "routing"
        )
        apply_window(up, down, window, 0.37)
        assert up.tobytes() == learner.up.tobytes() and down.tobytes() == learner.down.tobytes()
        assert np.isfinite(up).all()


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
    raw = encode(np.ones((R, H)), None)
    with pytest.raises(BadWindow, match=why):
        read_window(damage(raw), hidden_dim=H, rank=R, routing=False)
    with pytest.raises(BadWindow, match="shape"):
        read_window(raw, hidden_dim=H, rank=R, routing=True)  # a routing fleet needs grad_down


def test_the_c_and_numpy_encoders_write_the_same_bytes():
    from sona_shm.fleet.window import _write_window
    from sona_shm.shm.lane import _speedups

    if _speedups is None:
        pytest.skip("the C fast paths are not built")
    rng = np.random.default_rng(3)
    same = np.stack([rng.standard_normal(H)] * R)
    signed = np.zeros((R, H))
    signed[1, 5] = -0.0
    for grad_up, grad_down in ((same, None), (signed, None), (rng.standard_normal((R, H)), rng.standard_normal((R, H)))):
        a, b = np.full(WINDOW_HEAD_BYTES + 8 * H * 4, 7, np.uint8), np.full(WINDOW_HEAD_BYTES + 8 * H * 4, 7, np.uint8)
        kw = dict(seq=2**40, n=77, cum=2**50, sealed_at=1.5e9)
        assert _speedups.write_window(a, grad_up, grad_down, *kw.values()) == _write_window(b, grad_up=grad_up, grad_down=grad_down, **kw)
        assert a.tobytes() == b.tobytes()
