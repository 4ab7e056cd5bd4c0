"""The adaptive query router of router_app.py as a FastAPI app: the same JSON, under uvicorn or gunicorn.

Run it next to a flusher (see docs/how-to/fastapi.md)::

    sona-shm flusher --name router --rule routing --routes routes.npz --flush-interval 1 &
    SONA_SHM_NAME=router uvicorn --app-dir examples fastapi_app:app --workers 4
    SONA_SHM_NAME=router gunicorn -k uvicorn.workers.UvicornWorker --workers 4 --chdir examples fastapi_app:app

Endpoints (JSON in, JSON out; the formats are in ``router_requests.py``, shared with
router_app.py)::

    POST /route     {"embedding": [h numbers], "explore": 0.1?}  -> the route chosen, its scores, the adapted embedding
    POST /feedback  {"embedding", "route", "reward"}  |  {"embedding", "best", "route"?}
                    |  {"embedding", "steps", "quality", "route"?, "latency_us"?}  -> {"accepted": true|false}
    POST /flush     -> {"flushed": true} once the flusher learned what is committed (awaits engine.flush())
    GET  /healthz   -> {"ok": true, "engine": "router", "pid": 123, "lane": 4, "hidden_dim": h, "rule": ..., "routes": [...]}
    GET  /stats     -> the engine's stats, as ``sona-shm stats --json`` prints them
    GET  /metrics   -> the engine's metrics (sona_shm.prometheus.EngineCollector), for a scrape; needs the
                       prometheus extra (without it, a 501 that says what to install)

Each worker process attaches in the app's lifespan (``sona_shm.asgi.Engine``): a
missing engine fails the worker's startup with the reason. A malformed request gets a
400 whose ``error`` names the field (parsed by ``router_requests.py``, the same checks
and messages as router_app.py); an engine that went away gets a 503.
"""

from __future__ import annotations

from typing import Any

import router_requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from router_requests import BodyBuffer, HTTPProblem, check_length
from starlette.exceptions import HTTPException

import sona_shm.asgi
from sona_shm import InvalidInputError, SonaShmError

try:  # /metrics only: the app serves without the prometheus extra (pip install '.[fastapi]' is enough)
    from prometheus_client import CollectorRegistry, generate_latest

    from sona_shm.prometheus import CONTENT_TYPE, EngineCollector
except ImportError as exc:
    _NO_METRICS: str | None = router_requests.no_metrics(exc)
else:
    _NO_METRICS = None

engine = sona_shm.asgi.Engine()  # the engine named by SONA_SHM_NAME, attached by the lifespan
app = FastAPI(title="sona_shm router", lifespan=engine.lifespan)

_metrics: Any = None  # this worker's CollectorRegistry, made on the first scrape


async def _body(request: Request) -> bytes:
    """The body, Content-Length or chunked, never more than MAX_BODY read (``request.body()`` would read it all first)."""
    check_length(request.headers.get("content-length"))
    body = BodyBuffer()
    async for data in request.stream():
        body.add(data)  # a 413 the moment it passes the limit: the rest of the body is never read
    return body.value()


@app.post("/route")
async def route(request: Request) -> dict[str, Any]:
    return router_requests.route(engine.client, await _body(request))  # route() takes microseconds and never waits: on the loop


@app.post("/feedback")
async def feedback(request: Request) -> dict[str, Any]:
    return router_requests.feedback(engine.client, await _body(request))  # never waits for another process (timeout 0)


@app.post("/flush")
async def flush() -> dict[str, Any]:
    await engine.flush(timeout=10)  # in an executor thread: the loop keeps serving
    return {"flushed": True}


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return router_requests.health(engine.client)


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return engine.client.stats()


@app.get("/metrics")
async def metrics() -> Response:
    global _metrics
    if _NO_METRICS is not None:
        raise HTTPProblem(_NO_METRICS, 501)
    if _metrics is None:
        _metrics = CollectorRegistry()  # this worker's registry: add the app's own metrics here too
        _metrics.register(EngineCollector(engine.client.name))
    return Response(generate_latest(_metrics), media_type=CONTENT_TYPE)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@app.exception_handler(HTTPProblem)
async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
    return _error(exc.status, str(exc))


@app.exception_handler(InvalidInputError)
async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
    return _error(400, str(exc))  # bad input the library refused before writing anything


@app.exception_handler(SonaShmError)
async def _unavailable(request: Request, exc: SonaShmError) -> JSONResponse:
    return _error(503, str(exc))  # the engine, not the request, is at fault


@app.exception_handler(HTTPException)
async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 405:
        return _error(405, f"{request.url.path} expects another method, got {request.method}", dict(exc.headers or {}))
    if exc.status_code == 404:
        return _error(404, f"path: expected one of /route, /feedback, /flush, /healthz, /stats, /metrics, got {request.url.path!r}")
    return _error(exc.status_code, str(exc.detail))
