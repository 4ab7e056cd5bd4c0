"""A WSGI app with metrics of its own in prometheus_client's multiprocess mode, plus the engine's (EngineCollector).

``GET /`` counts a request and records one trajectory; ``GET /metrics`` merges the
workers' own metrics (MultiProcessCollector) with the engine's, as the README shows.
PROMETHEUS_MULTIPROC_DIR must be set before this module is imported.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess

import sona_shm
import sona_shm.gunicorn
from sona_shm.prometheus import CONTENT_TYPE, EngineCollector

REQUESTS = Counter("app_requests", "Requests this app served.")
WORKERS = Gauge("app_workers", "Worker processes serving.", multiprocess_mode="livesum")
WORKERS.set(1)  # imported in each worker (no preload): one per live worker


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/metrics":
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # the workers' own metrics, merged from their files
        registry.register(EngineCollector(sona_shm.gunicorn.engine_name()))  # the engine's, read from shared memory
        body = generate_latest(registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [body]
    client = sona_shm.gunicorn.client()
    accepted = client.record(sona_shm.Trajectory(np.ones(client.hidden_dim, np.float32), [], 1.0))
    REQUESTS.inc()
    body = b'{"accepted": true}' if accepted else b'{"accepted": false}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
