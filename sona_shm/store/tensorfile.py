"""Encode and decode the safetensors file format, and write files atomically, without dependencies.

The format (https://github.com/huggingface/safetensors)::

    8 bytes   N, little-endian u64: the size of the header
    N bytes   UTF-8 JSON object: {"__metadata__": {str: str, ...},
                                  NAME: {"dtype": "F32", "shape": [d0, d1, ...],
                                         "data_offsets": [begin, end]}, ...}
    the rest  the byte buffer; each tensor C-ordered, little-endian, at [begin, end)
              relative to the start of the buffer

Like the reference writer, :func:`encode` pads the header with spaces to a multiple of
8 bytes (so every tensor is aligned in a mapped file), stores tensors in the reverse of
the reference's dtype order and then by name, and packs them with no gap: its bytes are
those ``safetensors.numpy.save`` produces (up to the order of metadata keys, which the
reference takes from a hash map). Like the reference reader,
:func:`decode` refuses a header over 100 MB, anything but a JSON object, duplicate
keys, unknown dtypes, offsets that leave holes, overlap or disagree with shape and
dtype, and a buffer that does not end exactly at the file's end. Values are not
checked here (NaN is a valid float32); callers check what they need.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from typing import Any

import numpy as np

from ..errors import CheckpointError

#: The reference implementation's limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype names and their numpy equivalents (little-endian), in the order of the
#: reference's ``Dtype`` enum (without the 8-bit and bfloat16 floats numpy lacks).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("BOOL", "?"),
        ("U8", "u1"),
        ("I8", "i1"),
        ("I16", "<i2"),
        ("U16", "<u2"),
        ("F16", "<f2"),
        ("I32", "<i4"),
        ("U32", "<u4"),
        ("F32", "<f4"),
        ("F64", "<f8"),
        ("I64", "<i8"),
        ("U64", "<u8"),
    )
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: The reference's ``Dtype`` enum order (increasing alignment); the writer stores tensors in reverse.
_RANK = {name: i for i, name in enumerate(DTYPES)}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` (numpy arrays of a :data:`DTYPES` dtype) and ``metadata``."""
    arrays = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dtype not in _NAMES or name == "__metadata__":
            raise ValueError(f"tensor {name!r}: cannot store dtype {arr.dtype} under that name")
        arrays[name] = np.asarray(arr, dtype=dtype.newbyteorder("<"), order="C")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata: expected str keys and str values")
    order = sorted(arrays, key=lambda n: (-_RANK[_NAMES[arrays[n].dtype]], n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text] + [arrays[n].tobytes() for n in order])


def decode(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of safetensors bytes, or :class:`CheckpointError` naming ``where``."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: not a valid safetensors file: {why}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes is shorter than the 8-byte header size (truncated?)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise bad(f"header size {n} exceeds {MAX_HEADER_BYTES} bytes")
    if 8 + n > len(data):
        raise bad(f"header size {n} runs past the end of the {len(data)}-byte file (truncated?)")
    try:
        text = data[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"header is not UTF-8 ({exc})") from None
    if not text.startswith("{"):
        raise bad("header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ValueError as exc:
        raise bad(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
            raise bad(f"tensor {name!r}: expected exactly the keys dtype, shape, data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise bad(f"tensor {name!r}: unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"tensor {name!r}: shape must be a list of integers >= 0, got {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise bad(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    buffer = memoryview(data)[8 + n :]
    tensors = {}
    at = 0
    for begin, end, name, dtype, shape in entries:
        if begin != at or end < begin:
            raise bad(f"tensor {name!r}: data_offsets [{begin}, {end}] leave a hole or overlap (expected to begin at {at})")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {_NAMES[dtype]}")
        if end > len(buffer):
            raise bad(f"tensor {name!r}: data ends at {end}, past the {len(buffer)}-byte buffer (truncated?)")
        tensors[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape).copy()
        at = end
    if at != len(buffer):
        raise bad(f"{len(buffer) - at} bytes after the last tensor")
    return tensors, metadata


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_file(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``), or :class:`CheckpointError`."""
    try:
        # O_NONBLOCK: opening a FIFO put in the file's place must not hang the flusher's start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise CheckpointError(f"{path}: {st.st_size} bytes is larger than any checkpoint of this engine ({max_bytes} bytes at most)")
        chunks: list[bytes] = []
        while chunk := os.read(fd, max_bytes + 1 - sum(map(len, chunks))):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` by ``data`` so that a crash at any instant leaves the old or the new file.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path``
    and fsyncs the directory (so the rename itself survives a power cut). The file gets
    exactly ``mode``. On failure the temporary file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
