"""The router app, attaching at import: under ``preload_app`` that happens in the gunicorn master."""

from __future__ import annotations

from router_app import app  # noqa: F401 - what gunicorn serves

import sona_shm.gunicorn

CLIENT = sona_shm.gunicorn.client()  # attached in the master, before any worker is forked
