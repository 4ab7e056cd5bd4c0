"""Test-only gunicorn configuration: every worker gets SIGKILL when the master dies (PR_SET_PDEATHSIG after the fork)."""

import ctypes
import os
import signal


def post_fork(server, worker):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != server.pid:  # the master died before the request
        os._exit(1)
