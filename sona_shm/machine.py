"""Which machines sona_shm runs on: x86-64 with a 64-bit Python, decided here, once, at import.

Every hand-over between processes in sona_shm is a plain store that publishes earlier
stores, read by another process with plain loads:

- a producer's slot payload, then its ``seq`` stamp, then the lane head (the flusher
  reads the head, then the slot);
- the flusher's ledger copy, then the ``commit`` word (readers read ``commit``, the copy,
  ``commit`` again); the flusher's loads of the slots it learned must also complete
  before that commit frees them for the producer;
- buffer slots, then ``buffer_head`` (in the ledger);
- a consumer's copies out of the buffer, then ``buffer_tail`` (after which the flusher
  may overwrite those slots);
- ``flush_request`` / ``flush_ack``;
- the header, then the ``magic`` that makes a segment attachable.

x86-64 keeps each of these in order by itself (total store order: stores become visible
in program order, and no load is reordered with an earlier load or with a later store),
and a C call into numpy or a memoryview is a compiler barrier. A weakly ordered CPU
(aarch64, POWER, RISC-V) may make the head visible before the payload, or let the
flusher overwrite a buffer slot a consumer is still reading; making that correct needs
acquire/release on every load and store above, which the pure-Python paths cannot
express. So sona_shm refuses to import anywhere else rather than lose or corrupt
trajectories silently. A 32-bit Python is refused too: its 8-byte stores through a
memoryview are not single instructions, so a reader could see half of one.
"""

from __future__ import annotations

import platform
import struct

#: ``platform.machine()`` names of x86-64 (Linux, BSD and Windows spellings).
X86_64 = frozenset({"x86_64", "amd64", "x64"})


def check_machine(machine: str, pointer_bits: int) -> None:
    """Raise :class:`ImportError` unless ``machine`` is x86-64 and Python is 64-bit (see the module docstring)."""
    if machine.lower() not in X86_64:
        raise ImportError(
            f"sona_shm runs only on x86-64, this machine is {machine or 'unknown'!r}: its processes hand trajectories "
            "and weights to each other with plain stores whose order only x86-64 guarantees (total store order); "
            "on this CPU they could be seen out of order, and trajectories lost or learned half-written"
        )
    if pointer_bits != 64:
        raise ImportError(
            f"sona_shm needs a 64-bit Python, this one is {pointer_bits}-bit: its 8-byte words must be stored in one "
            "instruction, or another process could read half of one"
        )


check_machine(platform.machine(), struct.calcsize("P") * 8)
