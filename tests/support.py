"""Helpers shared by the tests and the producer processes they start."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sona_shm import Step, Trajectory, TrajectoryBatch
from sona_shm.supervise import child_setup

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "data" / "vectors-public.json.gz"
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))  # scripts/children.py: forked workers and gunicorn, shared with the scripts


def load_vectors() -> dict[str, Any]:
    with gzip.open(VECTORS, "rt") as f:
        return json.load(f)


def scenario_config(scenario: dict[str, Any]) -> tuple[int, int, float]:
    """``(hidden_dim, rank, lr)`` of a reference scenario (SEMANTICS.md: vectors-public.json)."""
    cfg = scenario["config"]
    if cfg is None:
        return scenario["hidden_dim"], 2, 0.002
    return cfg["hiddenDim"], cfg.get("microLoraRank", 1), cfg.get("microLoraLr", 0.001)


def scenario_trajectory(op: dict[str, Any]) -> Trajectory:
    return Trajectory(op["query"], [Step(s["act"], s["att"], s["reward"]) for s in op["steps"]], op["quality"])


def make_trajectories(seed: int, count: int, hidden_dim: int, *, max_steps: int = 4, attention_dim: int = 8) -> list[Trajectory]:
    """Deterministic synthetic trajectories: 0..max_steps steps, short activations included."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(0, max_steps + 1))
        steps = []
        for _ in range(n):
            width = hidden_dim if rng.random() < 0.8 else int(rng.integers(1, hidden_dim + 1))
            steps.append(
                Step(
                    rng.standard_normal(width).astype(np.float32),
                    rng.random(int(rng.integers(0, attention_dim + 1))).astype(np.float32),
                    float(rng.standard_normal()),
                )
            )
        out.append(Trajectory(rng.standard_normal(hidden_dim).astype(np.float32), steps, float(rng.random() * 2 - 0.5)))
    return out


#: The route names the example apps' tests use.
ROUTE_NAMES = ("code", "math", "chat", "search")


def route_table(hidden_dim: int, seed: int = 20240611):
    """A fixed table of 4 named unit routes (``sona_shm.learn.routes.RouteTable``)."""
    from sona_shm.learn.routes import RouteTable

    raw = np.random.default_rng(seed).standard_normal((len(ROUTE_NAMES), hidden_dim))
    return RouteTable.build((raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32), ROUTE_NAMES)


def write_routes(path: Any, hidden_dim: int) -> str:
    """:func:`route_table` as a routes file for ``sona-shm flusher --routes``; returns the path."""
    table = route_table(hidden_dim)
    np.savez(path, vectors=table.vectors, names=np.array(table.names))
    return str(path)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy (returning its value) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(SCRIPTS), e.get("PYTHONPATH", "")])
    return e


def run(cmd: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` for tests: output captured as text, the test's environment, and a
    child that dies with the test process and is ended after ``timeout`` seconds."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("env", env())
    return subprocess.run(cmd, timeout=timeout, preexec_fn=child_setup(deadline=timeout + 10), **kwargs)


def popen(cmd: list[str], *, deadline: float, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` for tests: a child that dies with the test process and is ended after ``deadline`` seconds."""
    kwargs.setdefault("env", env())
    return subprocess.Popen(cmd, preexec_fn=child_setup(deadline=deadline), **kwargs)


def batch_from_trajectories(trajs: list[Trajectory], layout: Any) -> TrajectoryBatch:
    """Trajectory objects (as ``drain_n`` returns them) in the array form of ``drain_arrays``."""
    k, S, h, A = len(trajs), layout.max_steps, layout.hidden_dim, layout.attention_dim
    batch = TrajectoryBatch(
        traj_id=np.array([t.id for t in trajs], np.uint64),
        query=np.zeros((k, h), np.float32),
        quality=np.array([t.quality for t in trajs], np.float32),
        latency_us=np.array([t.latency_us for t in trajs], np.uint64),
        route=np.array([t.route or "" for t in trajs], "<U64"),
        n_steps=np.array([len(t.steps) for t in trajs], np.int32),
        rewards=np.zeros((k, S), np.float32),
        act_len=np.zeros((k, S), np.int32),
        activations=np.zeros((k, S, h), np.float32),
        att_len=np.zeros((k, S), np.int32),
        attention=np.zeros((k, S, A), np.float32),
        route_index=np.array([-1 if t.route_index is None else t.route_index for t in trajs], np.int32),
        best_index=np.array([-1 if t.best_index is None else t.best_index for t in trajs], np.int32),
        probability=np.array([np.nan if t.probability is None else t.probability for t in trajs], np.float32),
    )
    for i, t in enumerate(trajs):
        batch.query[i] = t.query
        for s, step in enumerate(t.steps):
            act = np.asarray(step.activations, np.float32)
            att = np.asarray(() if step.attention is None else step.attention, np.float32)
            batch.rewards[i, s] = step.reward
            batch.act_len[i, s], batch.att_len[i, s] = len(act), len(att)
            batch.activations[i, s, : len(act)] = act
            batch.attention[i, s, : len(att)] = att
    return batch


def concatenate(batches: list[TrajectoryBatch], layout: Any) -> TrajectoryBatch:
    """One batch holding all of ``batches`` in order (an empty one if there are none)."""
    parts = [batch_from_trajectories([], layout), *batches]
    return TrajectoryBatch(**{key: np.concatenate([b.arrays()[key] for b in parts]) for key in parts[0].arrays()})


def assert_same_trajectory(got: Trajectory, expected: Trajectory) -> None:
    """``got`` (drained) equals ``expected`` (recorded) exactly, numbers as float32."""
    f32 = np.float32
    assert np.array_equal(got.query, np.asarray(expected.query, f32))
    assert got.quality == f32(expected.quality) and got.latency_us == expected.latency_us and got.route == (expected.route or None)
    if expected.id is not None:
        assert got.id == expected.id
    assert (got.route_index, got.best_index) == (expected.route_index, expected.best_index)
    assert len(got.steps) == len(expected.steps)
    for g, e in zip(got.steps, expected.steps):
        assert g.reward == f32(e.reward)
        assert np.array_equal(g.activations, np.asarray(e.activations, f32))
        assert np.array_equal(g.attention, np.asarray(() if e.attention is None else e.attention, f32))


def app_feedback(hidden_dim: int, **changes: object) -> dict:
    """A valid ``POST /feedback`` body for the example apps (router_app, fastapi_app), with ``changes`` on top."""
    body = {
        "embedding": list(np.linspace(-1, 1, hidden_dim)),
        "steps": [{"activations": [0.5] * hidden_dim, "attention": [0.25] * 4, "reward": 0.8}],
        "quality": 0.9,
        "route": "code",
        "latency_us": 1500,
    }
    body.update(changes)
    return body


def app_feedback_body(i: int, hidden_dim: int, good: np.ndarray, shuffle: bool = False) -> bytes:
    """Feedback ``i`` as JSON bytes: a good step along ``good`` and a bad one against it (in random order if ``shuffle``)."""
    rng = np.random.default_rng(i)
    ok = {
        "activations": (good + 0.3 * rng.standard_normal(hidden_dim)).tolist(),
        "attention": rng.random(8).tolist(),
        "reward": 1 + rng.random(),
    }
    bad = {"activations": (-good + 0.3 * rng.standard_normal(hidden_dim)).tolist(), "reward": float(rng.random()) - 1}
    steps = [bad, ok] if shuffle and rng.random() >= 0.5 else [ok, bad]
    body = {"embedding": rng.standard_normal(hidden_dim).tolist(), "steps": steps, "quality": 0.5 + rng.random() / 2, "route": "code"}
    return json.dumps(body).encode()


def fan_out(request: Callable[[int], str], count: int, *, threads: int, start: int = 0) -> Counter:
    """Requests ``start .. start + count - 1`` spread over ``threads`` client threads: ``request(i)`` makes request ``i``,
    asserts its answer and returns what to count it as. Any failure fails the caller; returns the counts."""
    totals: Counter = Counter()
    failures: list[str] = []
    guard = threading.Lock()

    def work(k: int) -> None:
        mine: Counter = Counter()
        try:
            for i in range(start + k, start + count, threads):
                mine[request(i)] += 1
        except Exception as exc:  # reported by the main thread
            failures.append(f"client thread {k}: {exc!r}")
        with guard:
            totals.update(mine)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(600)
    assert not failures, failures[:3]
    assert sum(totals.values()) == count
    return totals
