"""examples/router_app.py called as a WSGI app in-process: answers, and a 400 for every malformed request."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sona_shm.gunicorn as hooks
from sona_shm.prometheus import CONTENT_TYPE

from support import ROOT, app_feedback, route_table

sys.path.insert(0, str(ROOT / "examples"))
import router_app  # noqa: E402 - examples/ is not a package

H = 16
TABLE = route_table(H)


def call(method: str, path: str, body: bytes | str | object = b"") -> tuple[str, dict[str, str], bytes]:
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    raw = body.encode() if isinstance(body, str) else body
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(raw)), "wsgi.input": io.BytesIO(raw)}
    answer = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer["status"], answer["headers"] = status, dict(headers)

    payload = b"".join(router_app.app(environ, start_response))
    assert int(answer["headers"]["Content-Length"]) == len(payload)
    return answer["status"], answer["headers"], payload


@pytest.fixture
def served(engine, name, monkeypatch):
    """An engine with a route table (reference rule) driven in-process, the app attached to it through SONA_SHM_NAME."""
    flusher = engine(hidden_dim=H, flush_threshold=2, lane_slots=4, routes=TABLE)
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0")
    yield flusher
    hooks.close()


def feedback(**changes: object) -> dict:
    return app_feedback(H, **changes)


def test_route_applies_the_adapter_and_picks_the_best_route(served):
    probe = np.linspace(-1, 1, H).astype(np.float32)
    status, headers, payload = call("POST", "/route", {"embedding": probe.tolist()})
    answer = json.loads(payload)
    assert status == "200 OK" and headers["Content-Type"] == "application/json"
    assert answer["embedding"] == probe.tolist()  # nothing learned yet: the adapter is zero
    scores = TABLE.unit @ probe / np.linalg.norm(probe)
    assert answer["route"] == TABLE.names[int(np.argmax(scores))] == TABLE.names[answer["index"]]
    assert answer["scores"] == pytest.approx(dict(zip(TABLE.names, scores.tolist())), abs=1e-6)
    assert answer["score"] == max(answer["scores"].values()) and answer["explored"] is False
    for _ in range(2):
        assert json.loads(call("POST", "/feedback", feedback())[2]) == {"accepted": True}
    served.scan()  # two signals: one flush
    changed = json.loads(call("POST", "/route", {"embedding": probe.tolist()})[2])["embedding"]
    expected = hooks.client().forward(probe)
    assert changed != answer["embedding"] and changed == pytest.approx(expected.tolist(), abs=1e-6)


def test_feedback_is_recorded_with_everything_it_carries(served):
    assert call("POST", "/feedback", feedback())[0] == "200 OK"
    assert call("POST", "/feedback", feedback(steps=[], route=None, latency_us=0))[0] == "200 OK"
    served.scan()
    stats = json.loads(call("GET", "/stats")[2])
    assert stats["trajectories_processed"] == 2 and stats["buffer"]["len"] == 2


def test_bandit_and_full_information_feedback_are_recorded_as_feedback(served):
    x = list(np.linspace(-1, 1, H))
    assert json.loads(call("POST", "/feedback", {"embedding": x, "route": "math", "reward": 0.5})[2]) == {"accepted": True}
    assert json.loads(call("POST", "/feedback", {"embedding": x, "best": 2, "route": "code"})[2]) == {"accepted": True}
    assert json.loads(call("POST", "/feedback", {"embedding": x, "best": "search"})[2]) == {"accepted": True}
    served.scan()
    got = [(t.route, t.route_index, t.best_index, t.quality) for t in hooks.client().drain()]
    assert got == [("math", 1, None, 0.5), ("code", 0, 2, 1.0), ("search", None, 3, 1.0)]
    routes = {r["name"]: r for r in json.loads(call("GET", "/stats")[2])["routes"]}
    assert (routes["math"]["chosen"], routes["code"]["chosen"], routes["chat"]["best"], routes["search"]["best"]) == (1, 1, 1, 1)
    explored = [json.loads(call("POST", "/route", {"embedding": x, "explore": 1.0})[2]) for _ in range(40)]
    assert {a["route"] for a in explored} == set(TABLE.names) and any(a["explored"] for a in explored)


def test_a_routing_engine_learns_through_the_app(engine, name, monkeypatch):
    flusher = engine(hidden_dim=H, flush_threshold=5, lane_slots=64, routes=TABLE, rule="routing", lr=1.0)
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0")
    try:
        probe = TABLE.vectors[0] + 0.1 * TABLE.vectors[1]  # routed to "code" by cosine
        before = json.loads(call("POST", "/route", {"embedding": probe.tolist()})[2])
        assert before["route"] == "code"
        for _ in range(60):  # "it should have been math"
            assert json.loads(call("POST", "/feedback", {"embedding": probe.tolist(), "best": "math"})[2])["accepted"]
            flusher.scan()
        after = json.loads(call("POST", "/route", {"embedding": probe.tolist()})[2])
        assert after["route"] == "math" and json.loads(call("GET", "/healthz")[2])["rule"] == "routing"
    finally:
        hooks.close()


def test_a_full_lane_answers_accepted_false_and_counts_it(served):
    answers = [json.loads(call("POST", "/feedback", feedback())[2])["accepted"] for _ in range(6)]
    assert answers == [True] * 4 + [False] * 2
    assert json.loads(call("GET", "/stats")[2])["lane_dropped"] == 2


def test_healthz_and_metrics(served, name):
    status, _, payload = call("GET", "/healthz")
    health = json.loads(payload)
    assert status == "200 OK" and health["engine"] == name and health["hidden_dim"] == H and health["lane"] >= 0
    status, headers, payload = call("GET", "/metrics")
    assert status == "200 OK" and headers["Content-Type"] == CONTENT_TYPE and CONTENT_TYPE.startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(payload.decode())}
    assert families["sona_shm_flusher_up"].samples[0].labels == {"engine": name}  # the pid is on the info series only
    assert families["sona_shm_flusher_info"].samples[0].labels == {"engine": name, "pid": str(os.getpid())}
    assert families["sona_shm_engine_up"].samples[0].value == 1


@pytest.mark.parametrize(
    "method, path, body, status, fragment",
    [
        ("POST", "/route", b"", "400", "body: expected a JSON object, got an empty body"),
        ("POST", "/route", b"{", "400", "body: expected valid JSON, got Expecting property name"),
        ("POST", "/route", b"\xff\xfe", "400", "body: expected UTF-8 JSON"),
        ("POST", "/route", '{"embedding": [NaN]}', "400", "NaN is not a JSON number"),
        ("POST", "/route", '{"embedding": [Infinity]}', "400", "Infinity is not a JSON number"),
        ("POST", "/route", "[" * 100_000 + "]" * 100_000, "400", "body: expected valid JSON"),
        ("POST", "/route", [1, 2], "400", "body: expected a JSON object, got an array"),
        ("POST", "/route", {}, "400", "body: missing field 'embedding'"),
        ("POST", "/route", {"embedding": [1.0] * H, "x": 1}, "400", "body: unknown field 'x'"),
        ("POST", "/route", {"embedding": [1.0] * 3}, "400", f"embedding: expected {H} values (hidden_dim of this engine), got 3"),
        ("POST", "/route", {"embedding": "abc"}, "400", "embedding: expected a sequence of numbers, got 'abc'"),
        ("POST", "/route", {"embedding": [[1.0] * H]}, "400", "embedding: expected a 1-D sequence of numbers"),
        ("POST", "/route", {"embedding": [1e300] * H}, "400", "embedding: expected finite values within float32 range"),
        ("POST", "/feedback", feedback(steps={}), "400", "steps: expected an array of step objects, got an object"),
        ("POST", "/feedback", feedback(steps=[3]), "400", "steps[0]: expected a JSON object, got a number"),
        ("POST", "/feedback", feedback(steps=[{"reward": 1}]), "400", "steps[0]: missing field 'activations'"),
        ("POST", "/feedback", feedback(steps=[{"activations": [1], "reward": "x"}]), "400", "steps[0].reward: expected a finite number"),
        ("POST", "/feedback", feedback(steps=[{"activations": [1] * (H + 1), "reward": 1}]), "400", "steps[0].activations: expected at"),
        ("POST", "/feedback", feedback(steps=[{"activations": [1], "reward": 1}] * 9), "400", "steps: expected at most 4 steps"),
        ("POST", "/feedback", feedback(quality=None), "400", "quality: expected a finite number, got None"),
        ("POST", "/feedback", feedback(quality=True), "400", "quality: expected a finite number, got True"),
        ("POST", "/feedback", feedback(route="r" * 65), "400", "route: expected at most 64 UTF-8 bytes, got 65"),
        ("POST", "/feedback", feedback(latency_us=-1), "400", "latency_us: expected an integer in [0, 2**64)"),
        ("POST", "/feedback", feedback(qualty=1), "400", "body: unknown field 'qualty'"),
        ("POST", "/feedback", {"embedding": [1.0] * H}, "400", "body: expected route and reward (a bandit feedback), best"),
        ("POST", "/feedback", {"embedding": [1.0] * H, "reward": 1}, "400", "body: missing field 'route'"),
        ("POST", "/feedback", {"embedding": [1.0] * H, "route": "nope", "reward": 1}, "400", "route: expected a route name ('code'"),
        ("POST", "/feedback", {"embedding": [1.0] * H, "route": 0, "reward": "x"}, "400", "reward: expected a finite number"),
        ("POST", "/feedback", {"embedding": [1.0] * H, "best": 9}, "400", "best: expected a route index in [0, 3]"),
        ("POST", "/feedback", {"embedding": [1.0] * H, "best": 0, "reward": 1}, "400", "body: unknown field 'reward'"),
        ("POST", "/feedback", {"embedding": [1.0] * 3, "best": 0}, "400", "embedding: expected 16 values"),
        ("POST", "/route", {"embedding": [1.0] * H, "explore": 2}, "400", "explore: expected a probability in [0, 1]"),
        ("GET", "/route", b"", "405", "/route expects POST, got GET"),
        ("POST", "/healthz", b"", "405", "/healthz expects GET, got POST"),
        ("GET", "/nope", b"", "404", "path: expected one of /route, /feedback"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_change_nothing(served, method, path, body, status, fragment):
    got, headers, payload = call(method, path, body)
    assert got.startswith(status) and headers["Content-Type"] == "application/json"
    assert fragment in json.loads(payload)["error"]
    served.scan()
    stats = hooks.client().stats()
    assert stats["recorded"] == 0 and stats["trajectories_processed"] == 0
    if status == "405":
        assert headers["Allow"] in ("GET", "POST")


def test_a_body_too_large_is_refused_before_it_is_read(served):
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/route",
        "CONTENT_LENGTH": str(router_app.router_requests.MAX_BODY + 1),
        "wsgi.input": None,
    }
    seen = {}
    payload = b"".join(router_app.app(environ, lambda status, headers: seen.update(status=status)))
    assert seen["status"].startswith("413") and "body: expected at most" in json.loads(payload)["error"]


class Endless(io.RawIOBase):
    """A body that never ends (a chunked flood), counting what the app read of it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        assert 0 < size <= 1 << 20, f"read({size}): a body of unknown length must be read in bounded steps"
        self.read_bytes += size
        return b" " * size


def chunked(body: io.RawIOBase) -> dict:
    """The environ of a chunked POST /feedback: no CONTENT_LENGTH (as gunicorn passes it)."""
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/feedback", "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": body}


def test_a_chunked_body_is_read_only_up_to_the_limit(served):
    body = Endless()
    seen = {}
    payload = b"".join(router_app.app(chunked(body), lambda status, headers: seen.update(status=status)))
    assert seen["status"].startswith("413")
    assert json.loads(payload)["error"] == (
        f"body: expected at most {router_app.router_requests.MAX_BODY} bytes, got more (a chunked body, not read past the limit)"
    )
    assert body.read_bytes == router_app.router_requests.MAX_BODY + 1


def test_a_chunked_body_within_the_limit_is_read_to_its_end(served):
    seen = {}
    stream = io.BytesIO(json.dumps(feedback()).encode())
    payload = b"".join(router_app.app(chunked(stream), lambda status, headers: seen.update(status=status)))
    assert seen["status"] == "200 OK" and json.loads(payload) == {"accepted": True}
    environ = {**chunked(io.BytesIO(json.dumps(feedback()).encode())), "HTTP_TRANSFER_ENCODING": ""}
    payload = b"".join(router_app.app(environ, lambda status, headers: seen.update(status=status)))  # no length, no end marker
    assert seen["status"].startswith("400") and json.loads(payload)["error"] == "body: expected a JSON object, got an empty body"
    environ["wsgi.input_terminated"] = True  # PEP 3333: the server marks the end (gunicorn does, for every request)
    payload = b"".join(router_app.app(environ, lambda status, headers: seen.update(status=status)))
    assert seen["status"] == "200 OK" and json.loads(payload) == {"accepted": True}


def test_no_engine_is_a_503_that_says_why(monkeypatch, name):
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0")
    status, _, payload = call("POST", "/route", {"embedding": [1.0] * H})
    assert status.startswith("503") and f"segment {name!r} does not exist" in json.loads(payload)["error"]


def test_an_engine_without_routes_is_a_503_for_routing_only(engine, name, monkeypatch):
    engine(hidden_dim=H)
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0")
    try:
        status, _, payload = call("POST", "/route", {"embedding": [1.0] * H})
        assert status.startswith("503") and "has no route table: start its flusher with --routes FILE" in json.loads(payload)["error"]
        assert call("POST", "/feedback", feedback())[0] == "200 OK"  # trajectories need no route table
    finally:
        hooks.close()
