"""Test-only gunicorn configuration: the README's sona_shm hooks (the worker attaches in post_fork) beside an app whose
ASGI lifespan attaches too, and every worker SIGKILLed when the master dies (as die_with_master_conf.py)."""

from sona_shm.gunicorn import child_exit, when_ready, worker_exit  # noqa: F401 - gunicorn reads the hooks by name
from sona_shm.gunicorn import post_fork as attach_in_post_fork
from sona_shm.supervise import die_with_parent


def post_fork(server, worker):
    die_with_parent(parent=server.pid)  # SIGKILL; at once if the master died before the request
    attach_in_post_fork(server, worker)
