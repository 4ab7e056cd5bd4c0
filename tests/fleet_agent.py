"""A process in a testbed host that records, flushes and reads an engine there, for the test or script that drives it.

    python tests/fleet_agent.py            (reads one JSON request a line on stdin, answers one JSON line on stdout)

A testbed host has its own /dev/shm, which only processes in its mount namespace see; one agent per host serves every
request of a test, instead of a Python start-up per look. Requests: ``{"op": "record", "name", "seed", "count"}`` ->
``{"accepted"}``; ``{"op": "flush", "name", "timeout"}`` -> ``{"ok"}`` or ``{"error"}``; ``{"op": "fleet", "name"}`` ->
the engine's fleet stats, its trajectories processed and a digest of its adapter's bytes (``{"missing": true}`` while
the segment is not there yet). For the benchmark (every time is CLOCK_MONOTONIC, which every host shares):
``{"op": "timed", "name", "count", "spacing"}`` -> ``{"times"}`` (one record every ``spacing`` seconds, the time each
returned); ``{"op": "watch", "name", "changes", "timeout"}`` -> ``{"times"}`` (when the k-th signal since the request was
applied from the stream, k = 1..changes);
``{"op": "paced", "name", "rate", "seconds", "seed", "hidden"?}`` -> ``{"accepted"}``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sona_shm import stats
from sona_shm.engine.client import attach
from sona_shm.errors import SonaShmError

from support import env, make_trajectories

HIDDEN_DIM = 16
#: The engine's name on every host (each host's /dev/shm is its own).
ENGINE = "fleet"


class FleetHost:
    """A testbed host running one flusher of the fleet and an agent (tests/fleet_agent.py) that records and reads there."""

    def __init__(self, host: Any, log_dir: Any, *flusher_args: str) -> None:
        self.host = host
        self.name = host.name
        self.log = open(log_dir / f"{host.name}.log", "w")  # noqa: SIM115 - closed by close()
        self.flusher = host.run(
            [sys.executable, "-m", "sona_shm", "flusher", "--name", ENGINE, "--quiet", "--host-id", host.name, *flusher_args],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        self.agent = host.run(
            [sys.executable, str(Path(__file__).resolve())], env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, **request: Any) -> dict:
        self.agent.stdin.write(json.dumps(request) + "\n")
        self.agent.stdin.flush()
        return json.loads(self.agent.stdout.readline())

    def fleet(self) -> dict | None:
        answer = self.ask(op="fleet", name=ENGINE)
        return None if answer.get("missing") else answer

    def joined(self) -> bool:
        view = self.fleet()
        return bool(view and view["fleet"]["epoch"])

    def record(self, seed: int, count: int) -> int:
        return self.ask(op="record", name=ENGINE, seed=seed, count=count)["accepted"]

    def flush(self, timeout: float = 60.0) -> None:
        answer = self.ask(op="flush", name=ENGINE, timeout=timeout)
        assert answer.get("ok"), answer

    def close(self) -> None:
        if self.agent.poll() is None:
            self.agent.stdin.close()
            self.agent.wait(30)
        self.agent.stdout.close()
        self.log.close()


def watch(name: str, changes: int, timeout: float) -> list[float]:
    """When the k-th signal after the call was applied from the fleet's stream, for k = 1..``changes`` (or until
    ``timeout`` seconds passed). Signals applied together (a loaded reader hands over two entries at once) share the
    time they were seen, so each record is paired with its own application, not with the next change of generation."""
    from sona_shm.errors import TornRead
    from sona_shm.shm.ledger import Ledger
    from sona_shm.shm.segment import Segment

    seg = Segment.open(name, writable=False)
    ledger = Ledger(seg)

    def applied() -> int | None:
        try:
            return int(ledger.read("fleet_signals")[0])
        except TornRead:
            return None  # the flusher outran this read: look again

    try:
        times: list[float] = []
        base = None
        while base is None:
            base = applied()
        deadline = time.monotonic() + timeout
        while len(times) < changes and time.monotonic() < deadline:
            now = applied()
            seen = time.monotonic()
            if now is not None and now - base > len(times):
                times.extend([seen] * (min(now - base, changes) - len(times)))
            else:
                time.sleep(0.0001)
        return times
    finally:
        ledger.close()
        seg.close()


def main() -> int:
    clients: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        op, name = request["op"], request.get("name", "")
        try:
            if op == "record":
                client = clients.get(name) or clients.setdefault(name, attach(name, timeout=30))
                trajectories = make_trajectories(request["seed"], request["count"], HIDDEN_DIM, max_steps=4, attention_dim=8)
                answer: dict[str, Any] = {"accepted": sum(bool(client.record(t)) for t in trajectories)}
            elif op == "flush":
                client = clients.get(name) or clients.setdefault(name, attach(name, timeout=30))
                client.flush(timeout=request.get("timeout", 30.0))
                answer = {"ok": True}
            elif op == "fleet":
                s = stats.read(name)
                digest = hashlib.sha256(s.adapter.up.tobytes() + s.adapter.down.tobytes()).hexdigest()
                answer = {"fleet": s.fleet.__dict__ if s.fleet else None, "processed": s.trajectories_processed, "adapter": digest}
            elif op == "timed":
                client = clients.get(name) or clients.setdefault(name, attach(name, timeout=30))
                pool = make_trajectories(request.get("seed", 7), 16, HIDDEN_DIM, max_steps=4, attention_dim=8)
                times = []
                start = time.monotonic()
                for k in range(request["count"]):
                    delay = start + k * request["spacing"] - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    client.record(pool[k % len(pool)])
                    times.append(time.monotonic())
                answer = {"times": times}
            elif op == "watch":
                answer = {"times": watch(name, request["changes"], request["timeout"])}
            elif op == "paced":
                client = clients.get(name) or clients.setdefault(name, attach(name, timeout=30))
                pool = make_trajectories(request.get("seed", 1), 64, request.get("hidden", HIDDEN_DIM), max_steps=4, attention_dim=8)
                start, accepted, k = time.monotonic(), 0, 0
                while time.monotonic() < start + request["seconds"]:
                    delay = start + k / request["rate"] - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    accepted += bool(client.record(pool[k % len(pool)]))
                    k += 1
                answer = {"accepted": accepted}
            else:
                answer = {"error": f"unknown op {op!r}"}
        except SonaShmError as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}", "missing": True}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for client in clients.values():
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
