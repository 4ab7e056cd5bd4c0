#!/usr/bin/env python3
"""The sona_shm monitor as a script: exactly ``sona-shm stats``, with the same options and exit codes.

    python scripts/monitor.py --name NAME [--json | --prometheus | --watch [SECONDS] [--count N]]

Reads the engine without taking a lock or writing a byte. Exit codes: 0 ok, 2 bad
arguments, 3 no such segment, 6 no flusher running (the output is still printed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout too

from sona_shm.cli import main  # noqa: E402 - after the path is set

if __name__ == "__main__":
    sys.exit(main(["stats", *sys.argv[1:]]))
