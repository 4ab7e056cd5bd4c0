"""A process in a testbed host that records, flushes and reads an engine there, for the test or script that drives it.

    python tests/fleet_agent.py            (reads one JSON request a line on stdin, answers one JSON line on stdout)

A testbed host has its own /dev/shm, which only processes in its mount namespace see; one agent per host serves every
request of a test, instead of a Python start-up per look. Requests: ``{"op": "record", "name", "seed", "count"}`` ->
``{"accepted"}``; ``{"op": "flush", "name", "timeout"}`` -> ``{"ok"}`` or ``{"error"}``; ``{"op": "fleet", "name"}`` ->
the engine's fleet stats, its trajectories processed and a digest of its adapter's bytes (``{"missing": true}`` while
the segment is not there yet).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from sona_shm import stats
from sona_shm.engine.client import attach
from sona_shm.errors import SonaShmError

from support import make_trajectories

HIDDEN_DIM = 16


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
