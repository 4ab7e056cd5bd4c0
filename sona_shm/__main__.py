"""``python -m sona_shm`` and the ``sona-shm`` command.

An interrupt (Ctrl-C, SIGINT) before the command is ready — while numpy and the rest are
imported — is a quiet exit 130, not a traceback: the handler is in place before anything
heavy is imported, and the command's own handling takes over once it runs.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    raise SystemExit(130)


def run() -> int:
    """The ``sona-shm`` entry point."""
    previous = signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        if os.environ.get("SONA_SHM_TEST_PAUSE") == "start":  # test-only: stop here, so a test can interrupt the start
            os.kill(os.getpid(), signal.SIGSTOP)
        from .cli import main
    finally:
        signal.signal(signal.SIGINT, previous)
    return main()


if __name__ == "__main__":
    sys.exit(run())
