"""gunicorn configuration of the router example: the pattern to copy into your own gunicorn.conf.py.

    sona-shm flusher --name router --flush-interval 1 &
    gunicorn -c examples/gunicorn.conf.py router_app:app

Command-line options (``--bind``, ``--workers``, ``-e SONA_SHM_NAME=...``) override
what is set here.
"""

import os

import sona_shm.gunicorn

# These three hooks are used as they are; gunicorn reads them from this module.
from sona_shm.gunicorn import child_exit, when_ready, worker_exit  # noqa: F401

# The engine's name, unless the environment already says (gunicorn forks after this runs).
os.environ.setdefault(sona_shm.gunicorn.ENV_NAME, "router")

pythonpath = os.path.dirname(os.path.abspath(__file__))  # so "router_app:app" imports
bind = "127.0.0.1:8000"
workers = 4
worker_class = "gthread"
threads = 4
# Recycling workers is safe: a worker's lane is free the moment it exits and is reused.
max_requests = 10_000
max_requests_jitter = 1_000


def post_fork(server, worker):
    """A hook of your own must call ours: it attaches this worker and claims its lane."""
    sona_shm.gunicorn.post_fork(server, worker)
    # ... your own per-worker set-up (model loading, connections) goes here.
