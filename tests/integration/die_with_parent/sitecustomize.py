"""Test-only: with SONA_SHM_TEST_DIE_WITH_PARENT=1, every Python interpreter started with this directory on
PYTHONPATH asks Linux for SIGKILL when its parent dies (PR_SET_PDEATHSIG).

tests/integration/test_asgi_servers.py puts it on the servers' PYTHONPATH so that uvicorn's
spawned workers die with their master, which dies with the test (forked gunicorn workers
get the same through die_with_master_conf.py's post_fork, since a fork clears the setting).
"""

import os

if os.environ.get("SONA_SHM_TEST_DIE_WITH_PARENT") == "1":
    parent = os.getppid()

    from sona_shm.supervise import die_with_parent

    die_with_parent(parent=parent)  # SIGKILL; at once if the parent died before the request
