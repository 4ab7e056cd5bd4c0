"""The C twin of the hot paths (``sona_shm._speedups``), loaded in this one place.

``speedups`` is the module, or None when it was not built (no C compiler at install time:
``setup.py`` makes it optional) or when ``SONA_SHM_PURE_PYTHON=1`` asks for the
pure-Python paths. Both give the same results: byte-identical slots, the same route
choices, learners equal to float32 rounding (``tests/test_speedups.py``). Its interface
is declared in ``_speedups.pyi`` (checked against the built module by ``mypy.stubtest``
in CI) and its layout constants are compared with :mod:`sona_shm.shm.layout` by
``tests/test_speedups.py``.

Every caller asks ``speedups is not None`` and otherwise runs the Python twin; nothing
else imports ``_speedups``. (Modules bind it as their own ``_speedups`` so that a test can
switch one path to Python without the others.)
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

from .trajectory import RouteChoice, Step, Trajectory

#: The interface of ``_speedups`` these sources call (``INTERFACE`` in ``_speedups.c``).
INTERFACE = 2


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("SONA_SHM_PURE_PYTHON"):
        return None, "Python (SONA_SHM_PURE_PYTHON=1)"
    try:
        from . import _speedups
    except ImportError:  # pragma: no cover - depends on the build
        return None, "Python (the C extension was not built: no C compiler at install time)"
    built = getattr(_speedups, "INTERFACE", 0)
    if built != INTERFACE:  # an editable install keeps the module it built from older sources
        stale = f"interface {built}, these sources call {INTERFACE}"
        return None, f"Python (the C extension is out of date: {stale}; pip install -e . rebuilds it)"
    _speedups.set_types(Trajectory, Step, RouteChoice)  # the classes the C paths build and recognise
    return _speedups, "C"


_loaded, _implementation = _load()
#: What the hot paths run on: ``"C"``, or ``"Python (why)"``; for ``--version``, stats and the flusher's log.
IMPLEMENTATION: str = _implementation

if TYPE_CHECKING:
    from . import _speedups as speedups  # typed by _speedups.pyi; None at run time without the C module
else:
    speedups = _loaded
