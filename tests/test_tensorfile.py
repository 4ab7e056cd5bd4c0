"""The safetensors codec and the atomic writer, checked against the real ``safetensors`` package."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save

from sona_shm.errors import CheckpointError
from sona_shm.store.tensorfile import decode, encode, read_file, write_atomic

TENSORS = {
    "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.linspace(-1, 1, 5),
    "empty": np.zeros((0, 4), np.int32),
    "scalar": np.array(7, np.uint8),
    "mask": np.array([True, False, True]),
    "big": np.arange(4, dtype=np.uint64) * (2**63 // 3),
    "half": np.array([0.5, -2], np.float16),
}


def test_bytes_equal_the_reference_writer():
    # With one metadata key: the reference orders several by a hash map, so only their set is fixed.
    assert encode(TENSORS, {"k": "ü"}) == save(TENSORS, metadata={"k": "ü"})
    assert encode({}, {}) == save({})


def test_each_reads_what_the_other_wrote():
    ours = load(encode(TENSORS, {"m": "1"}))
    tensors, metadata = decode(save(TENSORS, metadata={"m": "1"}), "x")
    assert metadata == {"m": "1"}
    for name, value in TENSORS.items():
        for got in (ours[name], tensors[name]):
            assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)


def test_header_is_padded_to_eight_bytes_and_tensors_are_packed():
    data = encode({"x": np.ones(3, np.float32), "y": np.ones(1, np.float64)}, {"a": "b"})
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert n % 8 == 0 and header["y"]["data_offsets"] == [0, 8] and header["x"]["data_offsets"] == [8, 20]
    assert len(data) == 8 + n + 20


def test_big_endian_and_strided_input_is_stored_little_endian_and_packed():
    data = encode({"x": np.arange(6, dtype=">i4").reshape(2, 3).T}, {})
    assert np.array_equal(load(data)["x"], np.arange(6).reshape(2, 3).T)


def _valid() -> bytes:
    return save({"w": np.arange(4, dtype=np.float32), "v": np.ones(2)}, metadata={"k": "v"})


def _with_header(header: object, buffer: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + buffer


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "shorter than the 8-byte header size"),
        ((10**9).to_bytes(8, "little"), "exceeds 100000000 bytes"),
        ((50).to_bytes(8, "little") + b"{}", "runs past the end"),
        (_with_header(None, raw=b"\xff\xfe"), "not UTF-8"),
        (_with_header(None, raw=b"[1, 2]"), "not a JSON object"),
        (_with_header(None, raw=b"{nope"), "not valid JSON"),
        (_with_header(None, raw=b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'), "not valid JSON"),
        (_with_header(None, raw=b'{"__metadata__": {}, "__metadata__": {}}'), "not valid JSON (duplicate keys"),
        (_with_header({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
        (_with_header({"w": {"dtype": "F32", "shape": [1]}}), "expected exactly the keys"),
        (_with_header({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype 'Q7'"),
        (_with_header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape must be a list"),
        (_with_header({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "shape must be a list"),
        (_with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "data_offsets must be"),
        (_with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "leave a hole"),
        (_with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "do not hold shape [2]"),
        (
            _with_header(
                {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                b"\0" * 4,
            ),
            "overlap",
        ),
        (_with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "past the 4-byte buffer"),
        (_with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6), "2 bytes after the last tensor"),
    ],
)
def test_malformed_files_are_refused_with_the_reason(data, fragment):
    with pytest.raises(CheckpointError, match="^here: not a valid safetensors file: ") as info:
        decode(data, "here")
    assert fragment in str(info.value)


def test_every_truncation_is_refused():
    data = _valid()
    for cut in range(len(data)):
        with pytest.raises(CheckpointError):
            decode(data[:cut], "x")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_bytes_never_raise_anything_but_checkpoint_error(data):
    raw = bytearray(_valid())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        tensors, _ = decode(bytes(raw), "x")
    except CheckpointError:
        return
    # A change that keeps the file valid (in the data, a name, a metadata value) decodes within bounds.
    assert sum(t.nbytes for t in tensors.values()) <= len(raw) - 8


def test_write_atomic_replaces_with_exact_mode(tmp_path):
    path = tmp_path / "a.safetensors"
    old = os.umask(0o077)
    try:
        write_atomic(str(path), b"one", 0o640)
        write_atomic(str(path), b"two", 0o600)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(str(path), b"new" * 1000, 0o600)
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.safetensors"]


def test_read_file_refuses_what_is_not_a_small_regular_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read it"):
        read_file(str(tmp_path / "missing"), 100)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_file(str(tmp_path), 100)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="not a regular file"):  # and does not hang
        read_file(str(tmp_path / "fifo"), 100)
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(CheckpointError, match="101 bytes is larger than any checkpoint"):
        read_file(str(tmp_path / "big"), 100)
