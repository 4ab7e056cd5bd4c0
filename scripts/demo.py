#!/usr/bin/env python3
"""The main job: a flusher learning to route, a real gunicorn serving examples/router_app.py, feedback traffic, the monitor.

    ./scripts/demo [--workers 4] [--threads 4] [--seconds 8] [--clients 4] [--name NAME]

1. starts ``sona-shm flusher --rule routing`` on a scratch engine whose route table is
   the six routes of the synthetic router in ``scripts/router_task.py`` (three of its
   eight query clusters are best served by another route than the nearest one);
2. starts gunicorn with ``examples/gunicorn.conf.py`` (the sona_shm hooks) and the
   example router on a free loopback port;
3. measures the router's accuracy on held-out queries (``POST /route``);
4. for ``--seconds``, client threads route queries (``POST /route`` with 10% exploration),
   "serve" them, and send bandit feedback (``POST /feedback``: the route taken and
   reward 1 if it was the right one, else 0) while the monitor redraws live;
5. waits until everything accepted is learned, prints the monitor's table, the held-out
   accuracy before and after, and checks that the flusher learned exactly the feedback
   the server accepted;
6. stops gunicorn, then the flusher (SIGTERM: drain, flush, exit 0), and removes the segment.

Ctrl-C (or SIGTERM) at any point stops everything the same way: no segment and no
process is left behind. Exit status 0 when every count matched.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout too
sys.path.insert(0, str(ROOT / "scripts"))

from router_task import RouterTask  # noqa: E402 - after the path is set

from sona_shm.monitor import format_table, watch  # noqa: E402
from sona_shm.shm import segment  # noqa: E402
from sona_shm.stats import read, read_stats  # noqa: E402
from sona_shm.supervise import start_flusher, stop_process  # noqa: E402

from children import child_pids, listening_socket, start_gunicorn, stop_gunicorn, wait_until_serving  # noqa: E402

HIDDEN_DIM = 64
ROUTE_NAMES = ("code", "math", "chat", "search", "docs", "web")
#: Held-out queries the accuracy is measured on, before and after the traffic.
HELD_OUT = 300
TASK_SEED = 3


class Traffic:
    """Client threads that route queries and send bandit feedback until stopped; they count every answer."""

    def __init__(self, port: int, clients: int, task: RouterTask) -> None:
        self.port = port
        self.task = task
        self.stop = threading.Event()
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self._guard = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, k: int) -> None:
        rng = np.random.default_rng(1000 + k)
        counts: Counter = Counter()
        conn = None
        try:
            for i in itertools.count():
                if self.stop.is_set():
                    break
                if i % 10 == 0:  # a new connection now and then, as users come and go: workers share the load
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                x, y = self.task.sample(1, rng)
                query = x[0].tolist()
                status, answer = _post(conn, "/route", {"embedding": query, "explore": 0.1})
                if status != 200:
                    raise RuntimeError(f"POST /route answered {status}: {answer}")
                counts["routed"] += 1
                counts["explored"] += answer["explored"]
                reward = float(answer["index"] == int(y[0]))  # the route served the query well, or not
                status, answer = _post(conn, "/feedback", {"embedding": query, "route": answer["route"], "reward": reward})
                if status != 200:
                    raise RuntimeError(f"POST /feedback answered {status}: {answer}")
                counts["accepted" if answer["accepted"] else "refused"] += 1
        except (OSError, http.client.HTTPException, RuntimeError) as exc:
            if not self.stop.is_set():
                self.errors.append(f"client {k}: {exc!r}")
        finally:
            if conn is not None:
                conn.close()
            with self._guard:
                self.counts.update(counts)


def held_out_accuracy(port: int, queries: np.ndarray, right: np.ndarray) -> float:
    """The share of ``queries`` the router sends to their right route (no exploration)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hits = 0
        for x, y in zip(queries, right.tolist()):
            status, answer = _post(conn, "/route", {"embedding": x.tolist()})
            if status != 200:
                raise RuntimeError(f"POST /route answered {status}: {answer}")
            hits += answer["index"] == y
        return hits / len(queries)
    finally:
        conn.close()


def _post(conn: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    p.add_argument("--threads", type=int, default=4, help="threads per gthread worker (default 4)")
    p.add_argument("--seconds", type=float, default=8.0, help="how long to send traffic (default 8)")
    p.add_argument("--clients", type=int, default=4, help="client threads sending traffic (default 4)")
    p.add_argument("--name", default=None, help="engine name (default: demo-PID)")
    args = p.parse_args(argv)
    for option in ("workers", "threads", "clients"):
        if getattr(args, option) < 1:
            p.error(f"--{option}: expected an integer >= 1, got {getattr(args, option)}")
    if not args.seconds > 0:
        p.error(f"--seconds: expected a number > 0, got {args.seconds}")
    name = args.name or f"demo-{os.getpid()}"
    segment.check_name(name)
    interrupt = _InterruptOnce()
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)  # SIGTERM cleans up like Ctrl-C

    flusher = server = traffic = None
    with tempfile.TemporaryDirectory(prefix="sona-shm-demo-") as scratch:
        logs = Path(scratch)
        task = RouterTask(TASK_SEED, h=HIDDEN_DIM)
        routes = str(logs / "routes.npz")
        np.savez(routes, vectors=task.routes, names=np.array(ROUTE_NAMES))
        try:
            # Own sessions: Ctrl-C reaches only this script, which stops the children in order.
            # Both get SIGTERM if the demo itself is killed, and end at the latest 5 minutes
            # after the traffic would have.
            child_options = dict(start_new_session=True, deadline=args.seconds + 300)
            with open(logs / "flusher.log", "w") as log:
                flusher = start_flusher(
                    name, "--rule", "routing", "--routes", routes, "--flush-interval", "0.5", stderr=log, **child_options
                )  # hidden_dim comes from the routes file; lr is the routing rule's default
            deadline = time.monotonic() + 30
            while not _flusher_ready(name):
                if flusher.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the flusher did not start:\n{(logs / 'flusher.log').read_text()}")
                time.sleep(0.02)

            sock = listening_socket()
            port = sock.getsockname()[1]
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            environment = {**os.environ, "SONA_SHM_NAME": name, "XDG_RUNTIME_DIR": scratch, "PYTHONPATH": path}
            with open(logs / "gunicorn.log", "w") as log:
                try:
                    server = start_gunicorn(
                        "router_app:app",
                        sock,
                        *("-c", str(ROOT / "examples" / "gunicorn.conf.py")),
                        *("--workers", str(args.workers), "--threads", str(args.threads)),
                        stdout=log,
                        stderr=log,
                        env=environment,
                        **child_options,
                    )
                finally:
                    sock.close()
            try:
                wait_until_serving(port, server, timeout=60)
            except (RuntimeError, TimeoutError) as exc:
                raise DemoError(explain_gunicorn_failure(str(exc), (logs / "gunicorn.log").read_text(errors="replace"))) from None
            deadline = time.monotonic() + 60
            while read_stats(name)["lanes_live"] < args.workers and time.monotonic() < deadline:
                time.sleep(0.05)  # every worker attaches in post_fork; wait for the last to boot
            print(
                f"sona-shm demo: engine {name!r}: flusher pid {flusher.pid}; gunicorn pid {server.pid} with {args.workers} gthread "
                f"workers x {args.threads} threads (pids {', '.join(map(str, sorted(child_pids(server.pid))))}) on http://127.0.0.1:{port}"
            )
            held_x, held_y = task.sample(HELD_OUT, np.random.default_rng(42))
            before = held_out_accuracy(port, held_x, held_y)

            traffic = Traffic(port, args.clients, task)
            first = read(name)  # the final table's rates are measured from here
            started = time.monotonic()
            traffic.start()
            interval = 0.5
            if sys.stdout.isatty():
                watch(name, interval, count=round(args.seconds / interval) + 1)  # frames at 0, interval, ..., seconds
            else:
                time.sleep(args.seconds)  # how long the traffic runs: the demo's length, not a synchronisation
            if interrupt.raised:
                raise KeyboardInterrupt  # the live monitor ended on Ctrl-C: so does the demo
            traffic.join()
            elapsed = time.monotonic() - started
            if traffic.errors:
                raise RuntimeError("traffic failed: " + "; ".join(traffic.errors[:3]))

            counts = traffic.counts
            deadline = time.monotonic() + 60
            while (stats := read_stats(name))["trajectories_processed"] < counts["accepted"] or stats["pending_signals"]:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            after = held_out_accuracy(port, held_x, held_y)
            print()
            print(format_table(read(name).since(first)))  # with rates over the traffic, also when piped (no live frames)
            print()
            requests = counts["routed"] + counts["accepted"] + counts["refused"]
            print(
                f"traffic: {requests:,} requests in {elapsed:.1f} s ({requests / elapsed:,.0f}/s): {counts['routed']:,} routed, "
                f"{counts['accepted']:,} feedback accepted, {counts['refused']:,} refused (lane full)"
            )
            learned = stats["trajectories_processed"] == stats["recorded"] == counts["accepted"]
            exact = learned and stats["lane_dropped"] == counts["refused"]
            print(
                f"learned: {stats['trajectories_processed']:,} trajectories "
                + ("= exactly the feedback the server accepted" if exact else f"but the server accepted {counts['accepted']:,}: MISMATCH")
                + f"; {stats['flushes_performed']:,} flushes, weights generation {stats['weights_generation']:,}"
            )
            print(
                f"routing: held-out accuracy {before:.1%} before learning, {after:.1%} after "
                f"({HELD_OUT} queries; {counts['explored']:,} of the {counts['routed']:,} routed requests explored)"
            )
            if after <= before:
                print(f"routing: not better yet after {counts['accepted']:,} feedbacks; give it more traffic (--seconds 20)")
            return 0 if exact else 1
        except KeyboardInterrupt:
            print("\nsona-shm demo: interrupted; stopping everything", file=sys.stderr)
            return 130
        except DemoError as exc:
            print(f"sona-shm demo: {exc}", file=sys.stderr)
            return 1
        finally:
            if traffic is not None:
                traffic.join()  # idempotent: the clients stop before the server does
            codes = []
            if server is not None:
                codes.append(f"gunicorn exit {stop_gunicorn(server)}")
            if flusher is not None:
                codes.append(f"flusher exit {stop_process(flusher)} (SIGTERM: drained and flushed)")
            removed = segment.unlink(name)
            print(f"sona-shm demo: stopped ({', '.join(codes) or 'nothing started'}); removed {', '.join(removed) or 'nothing'}")


class DemoError(Exception):
    """A failure the demo explains itself (printed without a traceback of the demo's own)."""


#: The last line of a Python traceback: the exception and its message.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b.*$")


def boot_failure(log: str) -> tuple[str | None, list[str]]:
    """The cause of a worker's failed boot in a gunicorn log, and the first worker's traceback (lines).

    The cause is sona_shm's own "cannot attach" line when there is one, else the last
    line of the first traceback (``ModuleNotFoundError: No module named 'x'``); None if
    the log shows neither. Every worker prints the same traceback: one is enough.
    """
    lines = log.splitlines()
    traceback: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            for j in range(i + 1, len(lines)):
                if _EXCEPTION_LINE.match(lines[j]):
                    traceback = lines[i : j + 1]
                    break
            break
    for line in lines:
        if "sona_shm: worker" in line and "cannot attach:" in line:
            return line.split("cannot attach:", 1)[1].strip(), traceback
    return (traceback[-1] if traceback else None), traceback


def explain_gunicorn_failure(what: str, log: str) -> str:
    """The message for a gunicorn that did not serve: the cause first, then one traceback, not the whole log."""
    cause, traceback = boot_failure(log)
    if cause is None:
        return f"{what}; gunicorn's log:\n{log}"
    lines = [f"gunicorn's workers failed to boot: {cause}"]
    missing = re.match(r"ModuleNotFoundError: No module named '([\w.]+)'", cause)
    if missing:
        lines.append(
            f"  the module {missing.group(1)!r} is not installed in {sys.prefix} (the environment the demo runs gunicorn from); "
            f"the demo installs sona_shm with the extras gunicorn,monitor (scripts/demo): install what is missing there"
        )
    lines.append(f"  ({what})")
    if traceback:
        lines.append(f"the first worker's traceback ({len(log.splitlines())} lines of gunicorn's log in all):")
        lines.extend("  " + line for line in traceback)
    return "\n".join(lines)


class _InterruptOnce:
    """SIGINT/SIGTERM handler: raise KeyboardInterrupt the first time, ignore repeats.

    A second Ctrl-C (or ``timeout``, which signals the process and its group) must not
    abandon the clean-up that the first one started.
    """

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.raised:
            self.raised = True
            raise KeyboardInterrupt


def _flusher_ready(name: str) -> bool:
    try:
        return read_stats(name)["flusher"]["alive"]
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
