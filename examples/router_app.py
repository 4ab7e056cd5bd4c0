"""An adaptive query router as a plain WSGI app: routes with the shared adapter, learns from feedback.

Run it under gunicorn next to a flusher (see the README)::

    sona-shm flusher --name router --flush-interval 1 &
    SONA_SHM_NAME=router gunicorn -c python:sona_shm.gunicorn --workers 4 --chdir examples router_app:app

Endpoints (JSON in, JSON out; ``h`` is the engine's hidden_dim)::

    POST /route     {"embedding": [h numbers]}
                    -> {"route": "code", "score": 0.71, "scores": {"code": 0.71, ...}, "embedding": [h adapted numbers]}
    POST /feedback  {"embedding": [h numbers], "quality": 0.8,
                     "steps": [{"activations": [<= h numbers], "attention": [numbers], "reward": 0.5}],
                     "route": "code", "latency_us": 1200}          (attention, route, latency_us optional)
                    -> {"accepted": true}    false: this worker's lane was full; dropped and counted
    GET  /healthz   -> {"ok": true, "engine": "router", "pid": 123, "lane": 4, "hidden_dim": h}
    GET  /stats     -> the monitor's stats, as ``sona-shm stats --json`` prints them
    GET  /metrics   -> the engine's metrics (sona_shm.prometheus.EngineCollector), for a scrape

A malformed request (bad JSON, NaN, a missing or unknown field, a vector of the wrong
length) gets a 400 whose ``error`` names the field, what was expected and what was got.
An engine that is not there (no flusher ever created it, every lane taken) gets a 503.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

import sona_shm.gunicorn
from sona_shm import InvalidInputError, SonaShmError, Step, Trajectory
from sona_shm.prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from sona_shm.prometheus import EngineCollector
from sona_shm.trajectory import as_vector

#: The fixed destinations a query can be routed to; their vectors are fixed per hidden_dim.
ROUTES = ("code", "math", "chat", "search")
#: Largest request body accepted (8 steps of 256 + 64 numbers as JSON is ~60 KB).
MAX_BODY = 4 << 20

_route_vectors: dict[int, np.ndarray] = {}


class HTTPError(Exception):
    """An answer other than 200: ``status`` line and a message for the ``error`` field."""

    def __init__(self, status: str, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def route_vectors(hidden_dim: int) -> np.ndarray:
    """``float32[len(ROUTES), hidden_dim]``, unit rows, the same in every worker (fixed seed)."""
    vectors = _route_vectors.get(hidden_dim)
    if vectors is None:
        raw = np.random.default_rng(20240611).standard_normal((len(ROUTES), hidden_dim))
        vectors = _route_vectors[hidden_dim] = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    return vectors


# ----------------------------------------------------------------- request parsing


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def read_json(environ: dict[str, Any]) -> dict[str, Any]:
    """The request body as a JSON object, or an HTTPError saying what is wrong with it."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HTTPError("400 Bad Request", f"Content-Length: expected an integer, got {environ.get('CONTENT_LENGTH')!r}") from None
    if length > MAX_BODY:
        raise HTTPError("413 Content Too Large", f"body: expected at most {MAX_BODY} bytes, got {length}")
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    if not body:
        raise HTTPError("400 Bad Request", "body: expected a JSON object, got an empty body")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise HTTPError("400 Bad Request", f"body: expected UTF-8 JSON, got undecodable bytes ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise HTTPError("400 Bad Request", f"body: expected valid JSON, got {exc}") from None
    return _object(value, "body")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HTTPError("400 Bad Request", f"{where}: expected a JSON object, got {_json_type(value)}")
    return value


def _fields(obj: dict[str, Any], where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in required if k not in obj]
    if missing:
        raise HTTPError("400 Bad Request", f"{where}: missing field {missing[0]!r} (expected {', '.join(required)})")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise HTTPError("400 Bad Request", f"{where}: unknown field {unknown[0]!r} (expected {', '.join(required + optional)})")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _embedding(body: dict[str, Any], hidden_dim: int) -> np.ndarray:
    return as_vector(body["embedding"], "embedding", length=hidden_dim, what="hidden_dim", where=" of this engine")


# ----------------------------------------------------------------- endpoints


def route(environ: dict[str, Any]) -> dict[str, Any]:
    body = read_json(environ)
    _fields(body, "body", ("embedding",))
    client = sona_shm.gunicorn.client()
    adapted = client.forward(_embedding(body, client.hidden_dim))
    vectors = route_vectors(client.hidden_dim)
    norm = float(np.linalg.norm(adapted))
    scores = (vectors @ adapted) / norm if norm > 0 else np.zeros(len(ROUTES), np.float32)
    best = int(np.argmax(scores))
    return {
        "route": ROUTES[best],
        "score": float(scores[best]),
        "scores": {name: float(s) for name, s in zip(ROUTES, scores)},
        "embedding": adapted.tolist(),
    }


def feedback(environ: dict[str, Any]) -> dict[str, Any]:
    body = read_json(environ)
    _fields(body, "body", ("embedding", "steps", "quality"), ("route", "latency_us"))
    client = sona_shm.gunicorn.client()
    query = _embedding(body, client.hidden_dim)
    raw_steps = body["steps"]
    if not isinstance(raw_steps, list):
        raise HTTPError("400 Bad Request", f"steps: expected an array of step objects, got {_json_type(raw_steps)}")
    steps = []
    for i, raw in enumerate(raw_steps):
        where = f"steps[{i}]"
        step = _object(raw, where)
        _fields(step, where, ("activations", "reward"), ("attention",))
        steps.append(Step(step["activations"], step.get("attention"), step["reward"]))
    latency = body.get("latency_us", 0)
    trajectory = Trajectory(query, steps, body["quality"], latency_us=latency, route=body.get("route"))
    return {"accepted": client.record(trajectory)}


def healthz(environ: dict[str, Any]) -> dict[str, Any]:
    client = sona_shm.gunicorn.client()
    return {"ok": True, "engine": client.name, "pid": os.getpid(), "lane": client.lane, "hidden_dim": client.hidden_dim}


def stats(environ: dict[str, Any]) -> dict[str, Any]:
    return sona_shm.gunicorn.client().stats()


#: This worker's metrics registry per engine: the engine's EngineCollector (add the app's own metrics to it).
_registries: dict[str, CollectorRegistry] = {}


def metrics(environ: dict[str, Any]) -> str:
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
            raise HTTPError("404 Not Found", f"path: expected one of {', '.join(ENDPOINTS)}, got {path!r}")
        method, handler = endpoint
        if environ.get("REQUEST_METHOD") != method:
            raise HTTPError("405 Method Not Allowed", f"{path} expects {method}, got {environ.get('REQUEST_METHOD')}", [("Allow", method)])
        result = handler(environ)
        status = "200 OK"
        if isinstance(result, str):
            payload, content_type = result.encode("utf-8"), PROMETHEUS_CONTENT_TYPE
        else:
            payload, content_type = json.dumps(result).encode("utf-8"), "application/json"
    except HTTPError as exc:
        status, payload, content_type, headers = exc.status, _error(str(exc)), "application/json", exc.headers
    except InvalidInputError as exc:  # bad input the library refused before writing anything
        status, payload, content_type = "400 Bad Request", _error(str(exc)), "application/json"
    except SonaShmError as exc:  # no engine, no free lane: the service, not the request, is at fault
        status, payload, content_type = "503 Service Unavailable", _error(str(exc)), "application/json"
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(payload))), *headers])
    return [payload]


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")
