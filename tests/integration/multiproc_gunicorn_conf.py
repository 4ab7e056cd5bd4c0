"""gunicorn configuration combining sona_shm's hooks with prometheus_client's multiprocess mode (the README's)."""

from prometheus_client import multiprocess

import sona_shm.gunicorn
from sona_shm.gunicorn import post_fork, when_ready, worker_exit  # noqa: F401 - gunicorn reads them from here


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)  # drops the dead worker's live* gauge files
    sona_shm.gunicorn.child_exit(server, worker)
