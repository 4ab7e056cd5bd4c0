"""The C twin of the hot paths (``sona_shm._speedups``), loaded in this one place.

``speedups`` is the module, or None when it was not built (no C compiler at install time:
``setup.py`` makes it optional) or when ``SONA_SHM_PURE_PYTHON=1`` asks for the
pure-Python paths. Both give the same results: byte-identical slots, the same route
choices, learners equal to float32 rounding (``tests/test_speedups.py``). Its interface
is declared in ``_speedups.pyi`` (checked against the built module by ``mypy.stubtest``
in CI) and its layout constants are compared with :mod:`sona_shm.shm.layout` by
``tests/test_speedups.py``.

Every caller asks ``native.speedups is not None`` and otherwise runs the Python twin;
nothing else imports ``_speedups``.
"""

from __future__ import annotations

import os

from .trajectory import RouteChoice, Step, Trajectory

#: What the hot paths run on: ``"C"`` or ``"Python"`` (and why), for ``--version``, stats and logs.
IMPLEMENTATION = "Python (SONA_SHM_PURE_PYTHON=1)"

if os.environ.get("SONA_SHM_PURE_PYTHON"):
    speedups = None
else:
    try:
        from . import _speedups as speedups
    except ImportError:  # pragma: no cover - depends on the build
        speedups = None  # type: ignore[assignment]
        IMPLEMENTATION = "Python (the C extension was not built: no C compiler at install time)"
    else:
        speedups.set_types(Trajectory, Step, RouteChoice)  # the classes the C paths build and recognise
        IMPLEMENTATION = "C"
