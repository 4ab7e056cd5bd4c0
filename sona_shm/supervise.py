"""Start a flusher as a child process, stop it the way a supervisor would, and tie children to their parent.

What the library itself starts (``sona-shm demo``) lives here; helpers only the tests
and scripts use (forked workers, gunicorn) are in ``scripts/children.py`` and build on
:func:`die_with_parent`.

Every child started through here dies with its parent: Linux delivers a chosen signal
to a process whose parent exits (``prctl(PR_SET_PDEATHSIG)``), however the parent
exits, SIGKILL included. The setting survives ``execve`` and is not inherited by the
child's own children, so each generation sets it for itself. It fires when the
*thread* that forked the child ends, so children are started from the main thread.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

#: ``prctl`` option: signal this process when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1

# Resolved once in the parent, so that a child between fork() and exec() only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


def die_with_parent(sig: int = signal.SIGKILL, *, parent: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits.

    ``parent``: the pid the caller expects as its parent. If the parent already exited
    before this call (the child is then re-parented and would never get the signal),
    the process sends ``sig`` to itself at once.
    """
    if _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def set_deadline(seconds: float | None) -> None:
    """Have the kernel end this process with SIGALRM after ``seconds`` (kept across ``execve``).

    The last resort for a child that hangs: a process that installs no SIGALRM
    handler (none of ours does) is terminated by it.
    """
    if seconds is not None:
        signal.alarm(max(1, math.ceil(seconds)))


def child_setup(*, deadline: float | None = None, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when this process
    exits and SIGALRM after ``deadline`` seconds (if given)."""
    parent = os.getpid()

    def setup() -> None:
        die_with_parent(sig, parent=parent)
        set_deadline(deadline)

    return setup


def start_flusher(name: str, *options: str, deadline: float | None = None, **popen_kwargs: Any) -> subprocess.Popen:
    """``sona-shm flusher --name NAME OPTIONS…`` as a child of this interpreter.

    The flusher gets SIGTERM (it then drains, flushes and exits 0) when this process
    exits, and SIGALRM after ``deadline`` seconds if it is still running then.
    """
    popen_kwargs.setdefault("preexec_fn", child_setup(deadline=deadline, sig=signal.SIGTERM))
    return subprocess.Popen([sys.executable, "-m", "sona_shm", "flusher", "--name", name, *options], **popen_kwargs)


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (the flusher then drains, flushes and exits 0); SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
