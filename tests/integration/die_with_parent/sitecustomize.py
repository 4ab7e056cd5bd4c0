"""Test-only: with SONA_SHM_TEST_DIE_WITH_PARENT=1, every Python interpreter started with this directory on
PYTHONPATH asks Linux for SIGKILL when its parent dies (PR_SET_PDEATHSIG).

tests/integration/test_asgi_servers.py puts it on the servers' PYTHONPATH so that uvicorn's
spawned workers die with their master, which dies with the test (forked gunicorn workers
get the same through die_with_master_conf.py's post_fork, since a fork clears the setting).
"""

import ctypes
import os
import signal

if os.environ.get("SONA_SHM_TEST_DIE_WITH_PARENT") == "1":
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request: nobody will signal us
        os._exit(1)
