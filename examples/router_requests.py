"""The router examples' requests, checked once: JSON in, sona_shm calls out, or an error naming the field.

``examples/router_app.py`` (plain WSGI) and ``examples/fastapi_app.py`` both serve
with this module, so they answer alike. The engine must have a route table
(``sona-shm flusher --routes FILE``); the router routes among its routes and learns
from feedback::

    POST /route     {"embedding": [h numbers], "explore": 0.1?}
                    -> {"route": "code", "index": 0, "score": 0.71, "scores": {"code": 0.71, ...},
                        "explored": false, "embedding": [h adapted numbers]}
    POST /feedback  one of
                    {"embedding", "route", "reward"}           bandit: how well the route served (in [0, 1]
                                                               under the routing rule)
                    {"embedding", "best", "route"?}            full information: the route that was right
                    {"embedding", "steps": [{"activations", "attention"?, "reward"}], "quality",
                     "route"?, "latency_us"?}                  any trajectory (Loop A's reference encoding)
                    -> {"accepted": true}   false: this worker's lane was full; dropped and counted

Routes are named or given by index. ``explore``: the probability of serving a random
route instead of the best one (epsilon-greedy), so that bandit feedback reaches routes
the router does not pick yet; send the feedback for the route the answer names.

Every check raises :class:`HTTPProblem` (or sona_shm's
:class:`~sona_shm.InvalidInputError`, a 400) with a message that names the field, what
was expected and what was got.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from sona_shm import Client, InvalidInputError, Step, Trajectory
from sona_shm.trajectory import as_vector

#: Largest request body accepted (8 steps of 256 + 64 numbers as JSON is ~60 KB).
MAX_BODY = 4 << 20
#: Bytes asked for in one read of a body of unknown length (chunked).
READ_STEP = 64 << 10


class HTTPProblem(Exception):
    """A request the app refuses: ``status`` (400, 413; 501: /metrics without prometheus_client; 503: the engine cannot serve it)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_length(content_length: str | None) -> None:
    """Refuse a body whose Content-Length is larger than :data:`MAX_BODY` before reading it."""
    try:
        length = int(content_length or 0)
    except ValueError:
        raise HTTPProblem(f"Content-Length: expected an integer, got {content_length!r}") from None
    if length > MAX_BODY:
        raise HTTPProblem(f"body: expected at most {MAX_BODY} bytes, got {length}", 413)


class BodyBuffer:
    """A request body gathered as it arrives, refused (413) the moment it passes :data:`MAX_BODY`.

    For bodies of unknown length (``Transfer-Encoding: chunked``): ``Content-Length``
    cannot be checked before reading, so reading stops at the limit instead, and the
    rest of an oversized body is never read (nor held in memory).
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            raise HTTPProblem(f"body: expected at most {MAX_BODY} bytes, got more (a chunked body, not read past the limit)", 413)
        self.parts.append(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


def read_wsgi_body(environ: dict[str, Any]) -> bytes:
    """The body of a WSGI request, at most :data:`MAX_BODY` bytes read whatever the client sends (else a 413).

    With ``Content-Length``, exactly that many bytes (refused before reading if it is
    too large). Without it, a chunked body (or any body the server marks as terminated,
    PEP 3333's ``wsgi.input_terminated``) is read up to the limit and one byte more;
    otherwise there is no body.
    """
    stream = environ["wsgi.input"]
    content_length = environ.get("CONTENT_LENGTH")
    if content_length:
        check_length(content_length)
        length = int(content_length)
        return stream.read(length) if length > 0 else b""
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not (chunked or environ.get("wsgi.input_terminated")):
        return b""  # no length and no end marker: reading could wait for bytes that never come
    body = BodyBuffer()
    while data := stream.read(min(READ_STEP, MAX_BODY + 1 - body.size)):
        body.add(data)  # raises at MAX_BODY + 1 bytes read: the rest stays unread
    return body.value()


def no_metrics(exc: ImportError) -> str:
    """The answer to ``GET /metrics`` in a server installed without the prometheus extra."""
    return (
        f"metrics: prometheus_client is not installed in this server's environment ({exc}); "
        "pip install 'sona-shm[prometheus]' (from a clone: pip install '.[prometheus]') and restart the server"
    )


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity refused)."""
    if len(body) > MAX_BODY:
        raise HTTPProblem(f"body: expected at most {MAX_BODY} bytes, got {len(body)}", 413)
    if not body:
        raise HTTPProblem("body: expected a JSON object, got an empty body")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise HTTPProblem(f"body: expected UTF-8 JSON, got undecodable bytes ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise HTTPProblem(f"body: expected valid JSON, got {exc}") from None
    return json_object(value, "body")


def json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HTTPProblem(f"{where}: expected a JSON object, got {json_type(value)}")
    return value


def require_fields(obj: dict[str, Any], where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in required if k not in obj]
    if missing:
        raise HTTPProblem(f"{where}: missing field {missing[0]!r} (expected {', '.join(required)})")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise HTTPProblem(f"{where}: unknown field {unknown[0]!r} (expected {', '.join(required + optional)})")


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def embedding(body: dict[str, Any], hidden_dim: int) -> np.ndarray:
    return as_vector(body["embedding"], "embedding", length=hidden_dim, what="hidden_dim", where=" of this engine")


def _routes_of(client: Client) -> None:
    if client.routes is None:
        raise HTTPProblem(
            f"engine {client.name!r} has no route table: start its flusher with --routes FILE (see docs/how-to/routes.md)", 503
        )


def route(client: Client, body: bytes) -> dict[str, Any]:
    """``POST /route``: choose a route with the shared adapter."""
    obj = parse_body(body)
    require_fields(obj, "body", ("embedding",), ("explore",))
    query = embedding(obj, client.hidden_dim)
    if not query.any():
        raise InvalidInputError("embedding: expected a vector with a direction, got all zeros (it is closest to no route)")
    _routes_of(client)
    choice = client.route(query, explore=obj.get("explore", 0.0))
    # Every number is finite (a huge embedding saturates at the float32 limit); a retired route scores -inf, which
    # JSON cannot say: null. Strict JSON either way (the app serialises with allow_nan=False).
    return {
        "route": choice.name,
        "index": choice.index,
        "score": float(choice.scores[choice.index]),
        "scores": {name: s if math.isfinite(s) else None for name, s in zip(client.routes.names, choice.scores.tolist())},
        "explored": choice.explored,
        "embedding": choice.adapted.tolist(),
    }


def health(client: Client) -> dict[str, Any]:
    """``GET /healthz``: this worker's engine, lane, width, rule and routes."""
    return {
        "ok": True,
        "engine": client.name,
        "pid": os.getpid(),
        "lane": client.lane,
        "hidden_dim": client.hidden_dim,
        "rule": client.rule,
        "routes": list(client.routes.names) if client.routes is not None else [],
    }


def feedback(client: Client, body: bytes) -> dict[str, Any]:
    """``POST /feedback``: record a bandit or full-information feedback, or a whole trajectory."""
    obj = parse_body(body)
    if "steps" in obj or "quality" in obj:
        require_fields(obj, "body", ("embedding", "steps", "quality"), ("route", "latency_us"))
        return {"accepted": client.record(trajectory(obj, client.hidden_dim))}
    if "best" in obj:
        require_fields(obj, "body", ("embedding", "best"), ("route",))
        query = embedding(obj, client.hidden_dim)
        _routes_of(client)
        return {"accepted": client.feedback(query, best=obj["best"], route=obj.get("route"))}
    if "reward" in obj or "route" in obj:
        require_fields(obj, "body", ("embedding", "route", "reward"))
        query = embedding(obj, client.hidden_dim)
        _routes_of(client)
        return {"accepted": client.feedback(query, route=obj["route"], reward=obj["reward"])}
    raise HTTPProblem(
        "body: expected route and reward (a bandit feedback), best (the right route), or steps and quality (a trajectory), "
        f"got the fields {sorted(obj)}"
    )


def trajectory(obj: dict[str, Any], hidden_dim: int) -> Trajectory:
    query = embedding(obj, hidden_dim)
    raw_steps = obj["steps"]
    if not isinstance(raw_steps, list):
        raise HTTPProblem(f"steps: expected an array of step objects, got {json_type(raw_steps)}")
    steps = []
    for i, raw in enumerate(raw_steps):
        where = f"steps[{i}]"
        step = json_object(raw, where)
        require_fields(step, where, ("activations", "reward"), ("attention",))
        steps.append(Step(step["activations"], step.get("attention"), step["reward"]))
    return Trajectory(query, steps, obj["quality"], latency_us=obj.get("latency_us", 0), route=obj.get("route"))
