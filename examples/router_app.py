"""An adaptive query router as a plain WSGI app: routes among the engine's routes with the shared adapter, learns from feedback.

Run it under gunicorn next to a flusher whose engine has a route table (see
docs/how-to/gunicorn.md and docs/which-rule.md)::

    sona-shm flusher --name router --rule routing --routes routes.npz --flush-interval 1 &
    SONA_SHM_NAME=router gunicorn -c python:sona_shm.gunicorn --workers 4 --chdir examples router_app:app

Endpoints (JSON in, JSON out; ``h`` is the engine's hidden_dim; the request formats are
in ``router_requests.py``, which ``fastapi_app.py`` shares)::

    POST /route     {"embedding": [h numbers], "explore": 0.1?}
                    -> {"route": "code", "index": 0, "score": 0.71, "scores": {"code": 0.71, ...},
                        "explored": false, "embedding": [h adapted numbers]}
    POST /feedback  {"embedding", "route", "reward"}  |  {"embedding", "best", "route"?}
                    |  {"embedding", "steps", "quality", "route"?, "latency_us"?}
                    -> {"accepted": true}    false: this worker's lane was full; dropped and counted
    GET  /healthz   -> {"ok": true, "engine": "router", "pid": 123, "lane": 4, "hidden_dim": h,
                        "rule": "routing", "routes": ["code", ...]}
    GET  /stats     -> the monitor's stats, as ``sona-shm stats --json`` prints them
    GET  /metrics   -> the engine's metrics (sona_shm.prometheus.EngineCollector), for a scrape; needs the
                       prometheus extra (without it, a 501 that says what to install)

A malformed request (bad JSON, NaN, a missing or unknown field, a vector of the wrong
length, an unknown route) gets a 400 whose ``error`` names the field, what was expected
and what was got. An engine that is not there (no flusher ever created it, every lane
taken) or has no route table gets a 503.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import router_requests
from router_requests import HTTPProblem

import sona_shm.gunicorn
from sona_shm import InvalidInputError, SonaShmError

try:  # /metrics only: the app serves without the prometheus extra (pip install '.[gunicorn]' is enough)
    from prometheus_client import CollectorRegistry, generate_latest

    from sona_shm.prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
    from sona_shm.prometheus import EngineCollector
except ImportError as exc:
    _NO_METRICS: str | None = router_requests.no_metrics(exc)
else:
    _NO_METRICS = None

_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}


def _body(environ: dict[str, Any]) -> bytes:
    return router_requests.read_wsgi_body(environ)  # Content-Length or chunked, never more than MAX_BODY read


# ----------------------------------------------------------------- endpoints


def route(environ: dict[str, Any]) -> dict[str, Any]:
    return router_requests.route(sona_shm.gunicorn.client(), _body(environ))


def feedback(environ: dict[str, Any]) -> dict[str, Any]:
    return router_requests.feedback(sona_shm.gunicorn.client(), _body(environ))


def healthz(environ: dict[str, Any]) -> dict[str, Any]:
    return router_requests.health(sona_shm.gunicorn.client())


def stats(environ: dict[str, Any]) -> dict[str, Any]:
    return sona_shm.gunicorn.client().stats()


#: This worker's metrics registry per engine: the engine's EngineCollector (add the app's own metrics to it).
_registries: dict[str, Any] = {}


def metrics(environ: dict[str, Any]) -> str:
    if _NO_METRICS is not None:
        raise HTTPProblem(_NO_METRICS, 501)
    name = sona_shm.gunicorn.client().name  # a 503 when the engine is not there
    registry = _registries.get(name)
    if registry is None:
        registry = _registries[name] = CollectorRegistry()
        registry.register(EngineCollector(name))
    return generate_latest(registry).decode("utf-8")


ENDPOINTS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "/route": ("POST", route),
    "/feedback": ("POST", feedback),
    "/healthz": ("GET", healthz),
    "/stats": ("GET", stats),
    "/metrics": ("GET", metrics),
}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI entry point."""
    path = environ.get("PATH_INFO", "")
    headers: list[tuple[str, str]] = []
    try:
        endpoint = ENDPOINTS.get(path)
        if endpoint is None:
            raise HTTPProblem(f"path: expected one of {', '.join(ENDPOINTS)}, got {path!r}", 404)
        method, handler = endpoint
        if environ.get("REQUEST_METHOD") != method:
            headers = [("Allow", method)]
            raise HTTPProblem(f"{path} expects {method}, got {environ.get('REQUEST_METHOD')}", 405)
        result = handler(environ)
        status = "200 OK"
        if isinstance(result, str):
            payload, content_type = result.encode("utf-8"), PROMETHEUS_CONTENT_TYPE
        else:
            payload, content_type = json.dumps(result, allow_nan=False).encode("utf-8"), "application/json"  # strict JSON: no NaN
    except HTTPProblem as exc:
        status, payload, content_type = f"{exc.status} {_REASONS[exc.status]}", _error(str(exc)), "application/json"
    except InvalidInputError as exc:  # bad input the library refused before writing anything
        status, payload, content_type = "400 Bad Request", _error(str(exc)), "application/json"
    except SonaShmError as exc:  # no engine, no free lane: the service, not the request, is at fault
        status, payload, content_type = "503 Service Unavailable", _error(str(exc)), "application/json"
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(payload))), *headers])
    return [payload]


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")
