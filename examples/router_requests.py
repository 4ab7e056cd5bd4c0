"""The router examples' request format, checked once: JSON bodies in, sona_shm objects out, or a 400 naming the field.

``examples/fastapi_app.py`` parses its requests with this module; its answers are the
ones ``examples/router_app.py`` (plain WSGI) gives. Every check raises
:class:`BadRequest` (or sona_shm's :class:`~sona_shm.InvalidInputError`) with a message
that names the field, what was expected and what was got.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sona_shm import Step, Trajectory
from sona_shm.trajectory import as_vector

#: The fixed destinations a query can be routed to; their vectors are fixed per hidden_dim
#: (the same seed as router_app.py, so both apps route alike).
ROUTES = ("code", "math", "chat", "search")
#: Largest request body accepted (8 steps of 256 + 64 numbers as JSON is ~60 KB).
MAX_BODY = 4 << 20

_route_vectors: dict[int, np.ndarray] = {}


class BadRequest(Exception):
    """A request the app refuses: ``status`` (400, 413) and a message for the ``error`` field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def route_vectors(hidden_dim: int) -> np.ndarray:
    """``float32[len(ROUTES), hidden_dim]``, unit rows, the same in every worker (fixed seed)."""
    vectors = _route_vectors.get(hidden_dim)
    if vectors is None:
        raw = np.random.default_rng(20240611).standard_normal((len(ROUTES), hidden_dim))
        vectors = _route_vectors[hidden_dim] = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    return vectors


def check_length(content_length: str | None) -> None:
    """Refuse a body larger than :data:`MAX_BODY` before reading it."""
    try:
        length = int(content_length or 0)
    except ValueError:
        raise BadRequest(f"Content-Length: expected an integer, got {content_length!r}") from None
    if length > MAX_BODY:
        raise BadRequest(f"body: expected at most {MAX_BODY} bytes, got {length}", 413)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity refused)."""
    if len(body) > MAX_BODY:
        raise BadRequest(f"body: expected at most {MAX_BODY} bytes, got {len(body)}", 413)
    if not body:
        raise BadRequest("body: expected a JSON object, got an empty body")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body: expected UTF-8 JSON, got undecodable bytes ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body: expected valid JSON, got {exc}") from None
    return json_object(value, "body")


def json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: expected a JSON object, got {json_type(value)}")
    return value


def require_fields(obj: dict[str, Any], where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in required if k not in obj]
    if missing:
        raise BadRequest(f"{where}: missing field {missing[0]!r} (expected {', '.join(required)})")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise BadRequest(f"{where}: unknown field {unknown[0]!r} (expected {', '.join(required + optional)})")


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def embedding(body: dict[str, Any], hidden_dim: int) -> np.ndarray:
    return as_vector(body["embedding"], "embedding", length=hidden_dim, what="hidden_dim", where=" of this engine")


def route_query(body: bytes, hidden_dim: int) -> np.ndarray:
    """``POST /route``: ``{"embedding": [h numbers]}`` -> the query vector."""
    obj = parse_body(body)
    require_fields(obj, "body", ("embedding",))
    return embedding(obj, hidden_dim)


def route_answer(adapted: np.ndarray) -> dict[str, Any]:
    """The answer to ``/route`` for an adapted embedding: the best route by cosine, every score, the embedding."""
    vectors = route_vectors(adapted.shape[0])
    norm = float(np.linalg.norm(adapted))
    scores = (vectors @ adapted) / norm if norm > 0 else np.zeros(len(ROUTES), np.float32)
    best = int(np.argmax(scores))
    return {
        "route": ROUTES[best],
        "score": float(scores[best]),
        "scores": {name: float(s) for name, s in zip(ROUTES, scores)},
        "embedding": adapted.tolist(),
    }


def feedback_trajectory(body: bytes, hidden_dim: int) -> Trajectory:
    """``POST /feedback``: ``{"embedding", "steps": [{"activations", "attention"?, "reward"}], "quality", "route"?, "latency_us"?}``."""
    obj = parse_body(body)
    require_fields(obj, "body", ("embedding", "steps", "quality"), ("route", "latency_us"))
    query = embedding(obj, hidden_dim)
    raw_steps = obj["steps"]
    if not isinstance(raw_steps, list):
        raise BadRequest(f"steps: expected an array of step objects, got {json_type(raw_steps)}")
    steps = []
    for i, raw in enumerate(raw_steps):
        where = f"steps[{i}]"
        step = json_object(raw, where)
        require_fields(step, where, ("activations", "reward"), ("attention",))
        steps.append(Step(step["activations"], step.get("attention"), step["reward"]))
    return Trajectory(query, steps, obj["quality"], latency_us=obj.get("latency_us", 0), route=obj.get("route"))
