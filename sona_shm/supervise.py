"""Start a flusher as a child process and stop it the way a supervisor would."""

from __future__ import annotations

import signal
import subprocess
import sys


def start_flusher(name: str, *options: str, **popen_kwargs) -> subprocess.Popen:
    """``sona-shm flusher --name NAME OPTIONS…`` as a child of this interpreter."""
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
