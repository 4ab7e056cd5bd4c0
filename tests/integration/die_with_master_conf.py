"""Test-only gunicorn configuration: every worker gets SIGKILL when the master dies (PR_SET_PDEATHSIG after the fork)."""

from sona_shm.supervise import die_with_parent


def post_fork(server, worker):
    die_with_parent(parent=server.pid)  # SIGKILL; at once if the master died before the request
