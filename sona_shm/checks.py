"""Argument checks shared by every module: integers in a range and seconds that bound a wait.

The lowest layer next to :mod:`sona_shm.errors` (it imports nothing else of sona_shm), so
any module may use it. Each check returns the value as the type the caller stores, or
raises :class:`~sona_shm.errors.InvalidInputError` naming the argument, what was
expected and what was got.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .errors import InvalidInputError


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[low, high]``, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidInputError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")
    return int(value)


def check_timeout(timeout: object, name: str = "timeout", *, positive: bool = False) -> float:
    """``timeout`` as float seconds if it is a finite real number >= 0 (> 0 with ``positive``), else raise naming ``name``.

    The one validator of seconds in sona_shm: every wait is bounded by such a number,
    and NaN or infinity would unbound it. Booleans and strings are refused.
    """
    seconds = float(timeout) if isinstance(timeout, numbers.Real) and not isinstance(timeout, bool) else math.nan
    if not (0 < seconds < math.inf if positive else 0 <= seconds < math.inf):
        bound = "> 0" if positive else ">= 0"
        raise InvalidInputError(f"{name}: expected a finite number of seconds {bound}, got {timeout!r}")
    return seconds


__all__ = ["check_int", "check_timeout"]
