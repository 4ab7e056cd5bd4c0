"""examples/fastapi_app.py in-process (Starlette's TestClient runs its lifespan): the answers and errors of router_app.py."""

from __future__ import annotations

import io
import json
import math
import os
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import sona_shm.gunicorn as hooks
from sona_shm.prometheus import CONTENT_TYPE

from support import ROOT, app_feedback, route_table

sys.path.insert(0, str(ROOT / "examples"))
import fastapi_app  # noqa: E402 - examples/ is not a package
import router_app  # noqa: E402

H = 16


@pytest.fixture
def served(engine, name, monkeypatch):
    """The FastAPI app, started (lifespan) on an engine driven in-process; router_app beside it for comparison."""
    flusher = engine(hidden_dim=H, flush_threshold=2, lane_slots=4, routes=route_table(H))
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0")
    monkeypatch.setattr(fastapi_app, "_metrics", None)
    with TestClient(fastapi_app.app) as client:
        yield flusher, client
    hooks.close()


def wsgi(method: str, path: str, raw: bytes) -> tuple[int, dict]:
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(raw)), "wsgi.input": io.BytesIO(raw)}
    seen = {}
    payload = b"".join(router_app.app(environ, lambda status, headers: seen.update(status=status)))
    return int(seen["status"].split()[0]), json.loads(payload)


def feedback(**changes: object) -> dict:
    return app_feedback(H, **changes)


def test_route_and_feedback_answer_like_router_app(served):
    flusher, http = served
    probe = np.linspace(-1, 1, H).astype(np.float32)
    body = json.dumps({"embedding": probe.tolist()}).encode()
    answer = http.post("/route", content=body)
    assert answer.status_code == 200 and answer.json() == wsgi("POST", "/route", body)[1]
    assert answer.json()["embedding"] == probe.tolist()  # nothing learned yet
    for _ in range(2):
        assert http.post("/feedback", content=json.dumps(feedback())).json() == {"accepted": True}
    flusher.scan()  # two signals: one flush
    changed = http.post("/route", content=body).json()
    assert changed["embedding"] != probe.tolist()
    assert changed == wsgi("POST", "/route", body)[1]  # the same adapter through both apps
    stats = http.get("/stats").json()
    assert stats["trajectories_processed"] == 2 and stats["recorded"] == 2


@pytest.mark.guarantee("finite-in-finite-out-the-same-on-both-paths")
def test_route_answers_finite_strict_json_like_router_app(served):
    """A huge embedding: finite numbers (no null, no NaN), the same answer as router_app's; a zero one: the same 400."""
    flusher, http = served
    for _ in range(2):
        assert http.post("/feedback", content=json.dumps(feedback())).json() == {"accepted": True}
    flusher.scan()
    for probe in (np.full(H, 3.4e38), np.full(H, -3.4e38), np.zeros(H)):
        body = json.dumps({"embedding": probe.astype(np.float32).tolist()}).encode()
        answer = http.post("/route", content=body)
        status, expected = wsgi("POST", "/route", body)
        assert answer.status_code == status and json.loads(answer.text, parse_constant=float) == expected
        if status == 200:
            assert all(v is not None and math.isfinite(v) for v in [*expected["scores"].values(), *expected["embedding"]])
        else:
            assert status == 400 and expected["error"].startswith("embedding: expected a vector with a direction")


def test_a_full_lane_answers_accepted_false_and_counts_it(served):
    _, http = served
    answers = [http.post("/feedback", content=json.dumps(feedback())).json()["accepted"] for _ in range(6)]
    assert answers == [True] * 4 + [False] * 2
    assert http.get("/stats").json()["lane_dropped"] == 2


def test_healthz_and_metrics(served, name):
    _, http = served
    health = http.get("/healthz").json()
    assert health["engine"] == name and health["pid"] == os.getpid() and health["hidden_dim"] == H and health["lane"] >= 0
    answer = http.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"] == CONTENT_TYPE
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    assert families["sona_shm_engine_up"].samples[0].value == 1 and families["sona_shm_lanes_live"].samples[0].value >= 1


@pytest.mark.parametrize(
    "path, body",
    [
        ("/route", b""),
        ("/route", b"{"),
        ("/route", b"\xff\xfe"),
        ("/route", b'{"embedding": [NaN]}'),
        ("/route", b"[1, 2]"),
        ("/route", b"{}"),
        ("/route", json.dumps({"embedding": [1.0] * H, "x": 1}).encode()),
        ("/route", json.dumps({"embedding": [1.0] * 3}).encode()),
        ("/route", json.dumps({"embedding": [1e300] * H}).encode()),
        ("/feedback", json.dumps(feedback(steps={})).encode()),
        ("/feedback", json.dumps(feedback(steps=[3])).encode()),
        ("/feedback", json.dumps(feedback(steps=[{"reward": 1}])).encode()),
        ("/feedback", json.dumps(feedback(steps=[{"activations": [1], "reward": "x"}])).encode()),
        ("/feedback", json.dumps(feedback(steps=[{"activations": [1] * (H + 1), "reward": 1}])).encode()),
        ("/feedback", json.dumps(feedback(quality=None)).encode()),
        ("/feedback", json.dumps(feedback(route="r" * 65)).encode()),
        ("/feedback", json.dumps(feedback(latency_us=-1)).encode()),
        ("/feedback", json.dumps(feedback(qualty=1)).encode()),
        ("/feedback", json.dumps({"embedding": [1.0] * H}).encode()),
        ("/feedback", json.dumps({"embedding": [1.0] * H, "route": "nope", "reward": 1}).encode()),
        ("/feedback", json.dumps({"embedding": [1.0] * H, "best": 9}).encode()),
        ("/route", json.dumps({"embedding": [1.0] * H, "explore": -1}).encode()),
    ],
)
def test_bad_requests_get_the_same_400_as_router_app_and_change_nothing(served, path, body):
    flusher, http = served
    answer = http.post(path, content=body)
    status, expected = wsgi("POST", path, body)
    assert answer.status_code == status == 400 and answer.json() == expected
    assert answer.json()["error"].split(":")[0] in (
        "body",
        "embedding",
        "steps",
        "steps[0]",
        "steps[0].reward",
        "steps[0].activations",
        "quality",
        "route",
        "latency_us",
        "best",
        "explore",
    )
    flusher.scan()
    assert http.get("/stats").json()["recorded"] == 0


def test_wrong_path_method_and_size(served):
    _, http = served
    assert http.get("/nope").status_code == 404 and "path: expected one of /route" in http.get("/nope").json()["error"]
    answer = http.get("/route")
    assert answer.status_code == 405 and answer.json()["error"] == "/route expects another method, got GET"
    big = http.post("/route", content=b"x", headers={"content-length": str(4 << 20 | 1)})
    assert big.status_code == 413 and "body: expected at most" in big.json()["error"]


def test_a_missing_engine_fails_the_startup(name, monkeypatch):
    monkeypatch.setenv(hooks.ENV_NAME, name)
    monkeypatch.setenv(hooks.ENV_ATTACH_TIMEOUT, "0")
    with pytest.raises(Exception, match=f"segment {name!r} does not exist"):
        with TestClient(fastapi_app.app):
            pass
