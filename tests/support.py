"""Helpers shared by the tests and the producer processes they start."""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sona_shm import Step, Trajectory

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "data" / "vectors-public.json.gz"


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
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    return e
