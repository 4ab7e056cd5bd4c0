"""The ``sona-shm`` command: run the flusher, inspect, create and remove engines, build route tables, drain, checkpoint, restore."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .checks import check_int, check_timeout
from .config import DEFAULT_LR, RULE_SIZES, EngineConfig
from .errors import (  # noqa: F401 - the exit codes are re-exported: scripts and tests name them from here
    EXIT_CHECKPOINT,
    EXIT_DESTROYED,
    EXIT_ERROR,
    EXIT_FLEET,
    EXIT_FLUSHER_RUNNING,
    EXIT_INTERRUPTED,
    EXIT_LAYOUT_MISMATCH,
    EXIT_NOT_FOUND,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    EngineInUseError,
    FleetError,
    FlusherRunningError,
    InvalidInputError,
    LayoutMismatchError,
    SegmentNotFoundError,
    SonaShmError,
    exit_code,
)

#: The demo's producers each hold a lane of its engine (32 lanes), beside its own client.
DEMO_MAX_PRODUCERS = 31

#: The engine's name comes from here when --name is not given (as it does for the gunicorn hooks and the ASGI app).
ENV_NAME = "SONA_SHM_NAME"
#: ... and the fleet's Redis URL when --fleet is given without one (or `sona-shm fleet` without any).
ENV_FLEET_URL = "SONA_SHM_FLEET_URL"


def _by_rule(field: str) -> str:
    return f"reference {RULE_SIZES['reference'][field]:,}, routing {RULE_SIZES['routing'][field]:,}"


_CONFIG_OPTIONS = (
    ("--hidden-dim", "hidden_dim", int, "embedding width h (default 256; with --routes: the table's)"),
    ("--rank", "rank", int, "micro-LoRA rank, 1 or 2 (default 2)"),
    (
        "--lr",
        "lr",
        float,
        f"learning rate (default by --rule: reference {DEFAULT_LR['reference']:g}; "
        f"routing {DEFAULT_LR['routing']:g}, the step of its learned route table)",
    ),
    ("--flush-threshold", "flush_threshold", int, "apply gradients every N signals (default 100; the routing rule's windows grow to it)"),
    ("--capacity", "capacity", int, f"learned trajectories kept for drain; 0: no buffer (default by --rule: {_by_rule('capacity')})"),
    ("--max-steps", "max_steps", int, f"steps one trajectory may hold (default by --rule: {_by_rule('max_steps')}; a feedback is one)"),
    ("--attention-dim", "attention_dim", int, f"attention weights one step may hold (default by --rule: {_by_rule('attention_dim')})"),
    ("--lanes", "lanes", int, "producer processes that can be attached at once (default 32)"),
    ("--lane-slots", "lane_slots", int, f"trajectories a producer may have in flight (default by --rule: {_by_rule('lane_slots')})"),
    ("--rule", "rule", str, "learning rule: reference (the seed's, bit-exact; default) or routing (learns which route serves a query)"),
    ("--temperature", "temperature", float, "the routing rule's softmax temperature over cosine scores (default 10)"),
    ("--max-routes", "max_routes", int, "rows reserved for routes, so that `sona-shm routes add` can add some (default: K + max(16, K))"),
    ("--adapter-lr", "adapter_lr", float, "the routing rule's step of the adapter U, D (default 0: only the route table learns)"),
    ("--fleet-outbox", "fleet_outbox", int, "sealed windows the segment's fleet outbox holds (default 4096 with --fleet, else 0)"),
)


_METAVARS = {"rank": "{1,2}", "lr": "LR", "adapter_lr": "LR", "rule": "{reference,routing}", "temperature": "TAU", "hidden_dim": "H"}


def _add_config_options(p: argparse.ArgumentParser) -> None:
    for flag, dest, kind, text in _CONFIG_OPTIONS:
        p.add_argument(flag, dest=dest, type=kind, default=None, help=text, metavar=_METAVARS.get(dest, "N" if kind is int else "X"))
    p.add_argument(
        "--routes",
        metavar="FILE",
        default=None,
        help="the route table: an .npz of `sona-shm routes build` (vectors, names) or a .npy (K x hidden_dim); needed by --rule routing",
    )
    p.add_argument("--group", action="store_true", help="mode 0660 instead of 0600 (share with the group)")


def _add_name(p: Any, *, required: bool = True) -> None:
    """``--name``, defaulting to ``$SONA_SHM_NAME`` (read when the command line is parsed)."""
    env = os.environ.get(ENV_NAME) or None
    p.add_argument(
        "--name",
        default=env,
        required=required and env is None,
        help=f"the engine's name (default: ${ENV_NAME}" + (f", now {env!r})" if env else ", unset)"),
    )


def _given_config(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The engine options given on the command line, and the route table (or None)."""
    from .learn.routes import load_routes

    given = {dest: getattr(args, dest) for _, dest, _, _ in _CONFIG_OPTIONS if getattr(args, dest) is not None}
    routes = None
    if args.routes is not None:
        routes = load_routes(args.routes, hidden_dim=given.get("hidden_dim"))
        given.setdefault("hidden_dim", routes.vectors.shape[1])  # the table says how wide the embeddings are
    return given, routes


def _command(sub: Any, name: str, summary: str, *examples: str, details: str = "") -> argparse.ArgumentParser:
    """A subcommand with its one-line summary (in the list and atop its --help), some details and examples."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    description = summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else "")
    return sub.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


_DESCRIPTION = """\
Online learning in POSIX shared memory: a flusher per engine learns what producer
processes record; routing engines learn which route serves a query.

Run the flusher, inspect, create and remove engines, build route tables, drain their
buffers, checkpoint and restore, run the demo. `sona-shm COMMAND --help` says more."""

_EPILOG = """\
examples:
  sona-shm routes build --in examples.jsonl --out routes.npz
  sona-shm flusher --name router --rule routing --routes routes.npz
  sona-shm stats --name router --watch"""


def build_parser() -> argparse.ArgumentParser:
    from .native import IMPLEMENTATION

    parser = argparse.ArgumentParser(
        prog="sona-shm", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--version", action="version", version=f"sona-shm {__version__} (hot paths in {IMPLEMENTATION})", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub,
        "flusher",
        "run the flusher of an engine in the foreground (creates or adopts it)",
        "sona-shm flusher --name router --rule routing --routes routes.npz",
        "sona-shm flusher --name router --checkpoint /var/lib/sona-shm/router.safetensors",
        "SONA_SHM_NAME=router sona-shm flusher --fleet redis://redis.internal:6379/0",
        details="It learns what the producers of the engine record and publishes the weights they read. SIGTERM or\n"
        "Ctrl-C: it drains the lanes, flushes, writes the checkpoint (if any) and exits 0.\n"
        "The sizes of a new engine default by rule: see --capacity, --max-steps, --attention-dim, --lane-slots.",
    )
    _add_name(p)
    _add_config_options(p)
    p.add_argument(
        "--flush-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also apply pending gradients this often (0: only by threshold; default 0)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=None,
        help="save the adapter here (safetensors) periodically and at shutdown; restore from it when the segment is new",
    )
    p.add_argument(
        "--checkpoint-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between checkpoints (0: only at shutdown; default 60)",
    )
    p.add_argument(
        "--checkpoint-keep",
        type=int,
        default=None,
        metavar="K",
        help="keep the last K checkpoints beside PATH, timestamped (PATH.YYYYMMDDTHHMMSS.ffffffZ; PATH is the newest); "
        "default 0: PATH alone",
    )
    guard = p.add_argument_group("reward guard (routing engines: pause, and roll back, when the reward of feedback falls)")
    guard.add_argument(
        "--guard-reward",
        type=float,
        default=None,
        metavar="DROP",
        help="pause learning when the mean reward of the last N feedbacks falls more than DROP (in (0, 1]) below its level at "
        "the last good checkpoint; needs --checkpoint and --checkpoint-keep",
    )
    guard.add_argument(
        "--guard-window",
        type=int,
        default=None,
        metavar="N",
        help="the feedbacks of the moving reward (default 500; also without a guard, for the monitor and checkpoints)",
    )
    guard.add_argument(
        "--guard-rollback", action="store_true", help="when the guard pauses learning, also roll back to the last good checkpoint"
    )
    fleet = p.add_argument_group("fleet (many hosts learn one adapter through Redis; pip install 'sona-shm[fleet]')")
    add_fleet_target_options(fleet)
    fleet.add_argument("--fleet-key", metavar="KEY", default=None, help="the fleet's name in Redis (default: the engine name)")
    fleet.add_argument(
        "--host-id", metavar="ID", default=None, help="this host in the fleet (default: hostname + a hash of /etc/machine-id and --name)"
    )
    fleet.add_argument(
        "--fleet-lag",
        type=int,
        default=None,
        metavar="N",
        help="a new window starts only while at most N own windows are not yet back from the stream (0: lock-step; default: the outbox)",
    )
    fleet.add_argument(
        "--fleet-snapshot-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between the snapshots this host offers the fleet (the stream is trimmed up to the older kept one; default 60)",
    )
    fleet.add_argument(
        "--fleet-min-replicas",
        type=int,
        default=None,
        metavar="N",
        help="a window is applied (and leaves the outbox) only once WAIT confirmed N Redis replicas hold it: a failover loses none",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")

    p = _command(
        sub,
        "fleet",
        "the hosts of a fleet in Redis: list them, retire one",
        "sona-shm fleet hosts --fleet redis://redis.internal:6379/0 --fleet-key router",
        f"{ENV_FLEET_URL}=redis://redis.internal:6379/0 sona-shm fleet hosts --fleet-key router",
    )
    fleet_sub = p.add_subparsers(dest="fleet_command", required=True, metavar="{hosts,remove-host}")
    for command, text, example in (
        ("hosts", "list the fleet's hosts: lease, last seq in the stream", "sona-shm fleet hosts --fleet-key router --json"),
        (
            "remove-host",
            "retire a host id (its flusher must be stopped)",
            "sona-shm fleet remove-host --fleet-key router --host-id web-3-1a2b3c4d",
        ),
    ):
        q = _command(
            fleet_sub, command, text, example, details=f"Redis: --fleet URL, --fleet-url-file, --fleet-sentinel or ${ENV_FLEET_URL}."
        )
        add_fleet_target_options(q)
        q.add_argument("--fleet-key", metavar="KEY", required=True, help="the fleet's name in Redis")
        q.add_argument("--timeout", type=float, default=5.0, help="seconds Redis may take to answer (default 5)")
        if command == "hosts":
            q.add_argument("--json", action="store_true", help="print a JSON object: host id -> lease, last seq, token")
        else:
            q.add_argument("--host-id", metavar="ID", required=True, help="the host to retire (as `sona-shm fleet hosts` lists it)")

    p = _command(
        sub,
        "stats",
        "print an engine's counters (no lock taken, nothing written)",
        "sona-shm stats --name router",
        "sona-shm stats --name router --watch 1",
        "sona-shm stats --name router --interval 5 --json",
        "sona-shm stats --name router --prometheus",
    )
    add_stats_options(p)

    p = _command(
        sub,
        "list",
        "the engines on this host, with their flusher's state (no lock taken, nothing written)",
        "sona-shm list",
        "sona-shm list --json",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = _command(
        sub,
        "create",
        "create an engine's segment without running its flusher",
        "sona-shm create --name router --rule routing --routes routes.npz --group",
        details="The sizes default by rule, as for `sona-shm flusher`; an engine that exists is left as it is.",
    )
    _add_name(p)
    _add_config_options(p)

    p = _command(
        sub,
        "destroy",
        "remove an engine's segment and doorbell",
        "sona-shm destroy --name router",
        details="Refused while its flusher runs or producers are attached, unless --force.",
    )
    _add_name(p)
    p.add_argument(
        "--force", action="store_true", help="even while its flusher runs or producers are attached (they then stop with an error)"
    )

    p = _command(
        sub,
        "drain",
        "move learned trajectories out of an engine's buffer into a file: .npz, .jsonl or .parquet",
        "sona-shm drain --name router --out feedback.jsonl",
        "sona-shm drain --name router --out feedback.parquet --max 10000",
        "sona-shm drain --name router --out batch.npz",
        details="The format follows the file's suffix:\n"
        "  .npz      the arrays of TrajectoryBatch, padded to the engine's max_steps (numpy.load reads it)\n"
        "  .jsonl    one JSON object per trajectory: query, quality, route, route_index, best_index, best,\n"
        "            reward (what the route taken earned), probability, and only the real steps\n"
        "  .parquet  the same rows as a Parquet table (pip install 'sona-shm[parquet]')\n"
        "The file is written and synced before the trajectories leave the buffer. The engine needs a\n"
        "buffer (--capacity N; a routing engine has none unless given one).",
    )
    _add_name(p)
    p.add_argument("--out", required=True, metavar="FILE", help="a new file (never overwritten): FILE.npz, FILE.jsonl or FILE.parquet")
    p.add_argument("--max", type=int, default=None, metavar="N", help="at most N trajectories (default: all buffered)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="wait this long for another consumer (default 10)")

    p = _command(
        sub,
        "checkpoint",
        "write an engine's adapter to a safetensors file (no lock, nothing written to it)",
        "sona-shm checkpoint --name router --out router-2026-12-07.safetensors",
    )
    _add_name(p)
    p.add_argument("--out", required=True, metavar="PATH", help="the checkpoint file to write")

    p = _command(
        sub,
        "export",
        "write an engine's adapter (or a checkpoint's) as a PEFT LoRA adapter directory",
        "sona-shm export --name router --peft ./router-adapter",
        "sona-shm export --from-checkpoint router.safetensors --peft ./router-adapter --module q_proj",
    )
    env_name = os.environ.get(ENV_NAME) or None
    source = p.add_mutually_exclusive_group(required=env_name is None)
    source.add_argument(
        "--name",
        default=env_name,
        help=f"a live engine (read without a lock, nothing written to it; default: ${ENV_NAME} unless --from-checkpoint)",
    )
    source.add_argument("--from-checkpoint", dest="from_checkpoint", metavar="FILE", help="a checkpoint file of `sona-shm checkpoint`")
    p.add_argument("--peft", required=True, metavar="DIR", help="write adapter_model.safetensors and adapter_config.json into DIR")
    p.add_argument("--module", default="adapter", help="the target module's name in the model (default: adapter)")

    p = _command(
        sub,
        "restore",
        "replace an engine's learned state by a checkpoint (only while no flusher runs)",
        "sona-shm restore --name router --from router-2026-12-07.safetensors",
    )
    _add_name(p)
    p.add_argument("--from", dest="source", required=True, metavar="PATH", help="a checkpoint file of `sona-shm checkpoint` or the flusher")

    p = _command(
        sub,
        "pause",
        "stop learning while the engine keeps serving its adapter (what arrives is counted and kept, never learned)",
        "sona-shm pause --name router",
    )
    _add_name(p)
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="wait this long for the flusher (default 10)")

    p = _command(sub, "resume", "learn again, from the next trajectory committed", "sona-shm resume --name router")
    _add_name(p)
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="wait this long for the flusher (default 10)")

    p = _command(
        sub,
        "checkpoints",
        "list an engine's kept checkpoints: time, generation, moving reward (nothing written)",
        "sona-shm checkpoints --name router",
        "sona-shm checkpoints --name router --json",
    )
    _add_name(p)
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = _command(
        sub,
        "rollback",
        "replace a live engine's learned state by one of its checkpoints, through the running flusher (no restart)",
        "sona-shm rollback --name router --back 2",
        "sona-shm rollback --name router --to /var/lib/sona-shm/router/router.safetensors",
    )
    _add_name(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--to", metavar="FILE", default=None, help="a checkpoint file of this engine")
    which.add_argument(
        "--back",
        type=int,
        default=None,
        metavar="K",
        help="the K-th newest kept checkpoint (1: the newest; default), as `checkpoints` lists them",
    )
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="wait this long for the flusher (default 30)")

    p = _command(
        sub,
        "evaluate",
        "estimate from logged feedback the mean reward of the current adapter, no adaptation and a checkpoint (IPS, SNIPS)",
        "sona-shm evaluate --name router",
        "sona-shm evaluate --from feedback.npz --against router.safetensors --json",
    )
    _add_name(p, required=False)
    p.add_argument(
        "--from",
        dest="files",
        action="append",
        default=[],
        metavar="FILE",
        help="logged feedback in a file of `sona-shm drain` (again for more files); instead of the engine's buffer",
    )
    p.add_argument("--against", metavar="CHECKPOINT", default=None, help="also a checkpoint file (e.g. one `checkpoints` lists)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the intervals (default 0.95)")
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = _command(
        sub,
        "routes",
        "build a route table from examples; list an engine's routes, or add, rename or retire one while it runs",
        "sona-shm routes build --in examples.jsonl --out routes.npz",
        "sona-shm routes list --name router",
        "sona-shm routes add --name router billing --vector billing-examples.npy",
    )
    routes = p.add_subparsers(dest="routes_command", required=True, metavar="{build,list,add,rename,retire}")
    q = _command(
        routes,
        "build",
        "write a route table (.npz) from example embeddings in JSON lines",
        "sona-shm routes build --in examples.jsonl --out routes.npz",
        details='Each line of --in is one JSON object: {"name": "billing", "embedding": [0.12, -0.03, ...]}\n'
        "(other fields, such as \"text\", are ignored). A route's vector is the mean of its examples'\n"
        "unit vectors, as RouteTable.from_examples makes it; routes keep the order their names first\n"
        "appear in. Use the embedding model that will embed the queries.",
    )
    q.add_argument("--in", dest="source", required=True, metavar="FILE", help="example embeddings, one JSON object per line")
    q.add_argument("--out", required=True, metavar="FILE", help="the route table to write (a new .npz file; --routes reads it)")
    q = _command(
        routes,
        "list",
        "the routes, their state and what was learned of them (no lock taken, nothing written)",
        "sona-shm routes list --name router --json",
    )
    _add_name(q)
    q.add_argument("--json", action="store_true", help="print a JSON array")
    q = _command(
        routes,
        "add",
        "add a route (its vector, or the mean of its examples' unit vectors)",
        "sona-shm routes add --name router refunds --vector refunds-examples.npy",
    )
    _add_name(q)
    q.add_argument("route", metavar="ROUTE", help="the new route's name (at most 64 UTF-8 bytes)")
    q.add_argument(
        "--vector",
        required=True,
        metavar="FILE",
        help="a .npy of one vector (hidden_dim values) or of example embeddings (n x hidden_dim: their mean direction)",
    )
    q = _command(
        routes, "rename", "rename a route; what it learned and its counts stay", "sona-shm routes rename --name router billing payments"
    )
    _add_name(q)
    q.add_argument("route", metavar="ROUTE", help="the route, by name or index")
    q.add_argument("new_name", metavar="NEW_NAME", help="its new name (at most 64 UTF-8 bytes)")
    q = _command(
        routes,
        "retire",
        "retire a route: never chosen or learned again; it keeps its index and counts",
        "sona-shm routes retire --name router legacy",
    )
    _add_name(q)
    q.add_argument("route", metavar="ROUTE", help="the route, by name or index")
    for command, q in routes.choices.items():
        if command in ("add", "rename", "retire"):
            q.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="wait this long for the flusher (default 10)")

    p = _command(
        sub,
        "demo",
        "flusher + producer processes on a scratch engine, then the stats",
        "sona-shm demo",
        "sona-shm demo --producers 8 --trajectories 100000",
    )
    p.add_argument("--producers", type=int, default=4, help=f"producer processes, 1 to {DEMO_MAX_PRODUCERS} (default 4)")
    p.add_argument("--trajectories", type=int, default=20_000, help="per producer, 1 to 10,000,000 (default 20000)")
    p.add_argument("--name", default=None, help="engine name (default: a fresh scratch name, removed at the end)")
    return parser


def add_fleet_target_options(group: Any) -> None:
    """Where the fleet's Redis is (``flusher`` and ``fleet``): the URL, or a file or variable holding it; Sentinels."""
    group.add_argument(
        "--fleet",
        metavar="URL",
        nargs="?",
        const="",
        default=None,
        help="join the fleet in this Redis: redis://[[USER]:PASSWORD@]HOST:PORT[/DB] (rediss:// for TLS); without URL: "
        "the URL in $SONA_SHM_FLEET_URL (keeps a password out of the process table)",
    )
    group.add_argument("--fleet-url-file", metavar="FILE", default=None, help="read the fleet's Redis URL from FILE (its first line)")
    group.add_argument(
        "--fleet-sentinel",
        metavar="HOST:PORT[,...]",
        default=None,
        help="follow the primary these Redis Sentinels name (checked at every lease renewal); the URL then gives only credentials, db, TLS",
    )
    group.add_argument("--fleet-service", metavar="NAME", default=None, help="the name the Sentinels monitor the primary by")


def fleet_target(args: argparse.Namespace) -> Any:
    """The fleet's :class:`~sona_shm.fleet.stream.Target` from ``--fleet [URL]``, ``--fleet-url-file``, ``$SONA_SHM_FLEET_URL``
    and ``--fleet-sentinel``/``--fleet-service``; None when none of them is given."""
    if args.fleet is None and args.fleet_url_file is None and args.fleet_sentinel is None:
        return None
    from .fleet.stream import Target, parse_sentinels, safe_url

    if args.fleet and args.fleet_url_file:
        raise InvalidInputError("--fleet URL and --fleet-url-file: give one of them")
    url = args.fleet or ""
    if args.fleet_url_file is not None:
        try:
            with open(args.fleet_url_file, encoding="utf-8") as f:
                url = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(
                f"--fleet-url-file: cannot read {args.fleet_url_file!r} ({type(exc).__name__}: {exc.args[-1]})"
            ) from None
        if not url:
            raise InvalidInputError(f"--fleet-url-file: {args.fleet_url_file!r} holds no URL on its first line")
    elif not url:
        url = os.environ.get(ENV_FLEET_URL, "")
        if not url and args.fleet_sentinel is None:
            raise InvalidInputError(
                "--fleet: no URL given and $SONA_SHM_FLEET_URL is empty; give --fleet URL, --fleet-url-file or the variable"
            )
    if not url:
        url = "redis://"  # Sentinels name the primary; no credentials
    sentinels: tuple[tuple[str, int], ...] = ()
    if args.fleet_sentinel is not None:
        try:
            sentinels = parse_sentinels(args.fleet_sentinel)
        except ValueError as exc:
            raise InvalidInputError(f"--fleet-sentinel: {exc}") from None
        if not args.fleet_service:
            raise InvalidInputError("--fleet-sentinel: needs --fleet-service NAME (the name the Sentinels monitor the primary by)")
    elif args.fleet_service is not None:
        raise InvalidInputError("--fleet-service: needs --fleet-sentinel HOST:PORT[,...]")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidInputError(f"--fleet: expected a Redis URL redis://HOST:PORT[/DB] (or rediss://, unix://), got {safe_url(url)}")
    return Target(url, sentinels, args.fleet_service)


def add_stats_options(p: argparse.ArgumentParser) -> None:
    """The monitor's options (shared by ``sona-shm stats`` and ``scripts/monitor.py``)."""
    _add_name(p)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the stats dict as JSON")
    form.add_argument("--prometheus", action="store_true", help="print the Prometheus text exposition format")
    form.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw the table every SECONDS (default 2) until Ctrl-C; uses rich if installed",
    )
    p.add_argument("--count", type=int, default=None, metavar="N", help="with --watch: stop after N tables")
    p.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="read twice, SECONDS apart; print the second read with the rates between them (learned/s, adapter movement)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except SonaShmError as exc:
        print(f"sona-shm: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:  # a command that does not handle it (the flusher and --watch do): no traceback
        print("sona-shm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _flusher(args: argparse.Namespace) -> int:
    from .engine.flusher import Flusher
    from .shm.segment import DEFAULT_MODE, GROUP_MODE

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s sona-shm flusher[%(process)d] %(levelname)s %(message)s",
    )
    check_timeout(args.flush_interval, "--flush-interval")
    if args.checkpoint_interval is not None and not args.checkpoint:
        raise InvalidInputError("--checkpoint-interval: needs --checkpoint PATH")
    interval = check_timeout(60.0 if args.checkpoint_interval is None else args.checkpoint_interval, "--checkpoint-interval")
    keep, guard, window = _safety_options(args)
    given, routes = _given_config(args)
    EngineConfig.check_fields(given)  # bad options are refused before anything else happens
    fleet = _fleet_options(args)
    # The handlers go in before the flusher takes the segment's flusher lock: from that
    # moment a supervisor sees a live flusher and may stop it, and a SIGTERM must then
    # mean drain, flush and exit 0, not death by signal. They are put back on the way out
    # (main() may run inside another program, such as a test).
    stop: dict[str, Any] = {"requested": False, "flusher": None}

    def request_stop(signum: int, frame: Any) -> None:
        stop["requested"] = True  # only flags: the loop drains, flushes and exits
        if stop["flusher"] is not None:
            stop["flusher"].stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        flusher = Flusher(
            args.name,
            config_overrides=given,
            routes=routes,
            flush_interval=args.flush_interval,
            mode=GROUP_MODE if args.group else DEFAULT_MODE,
            checkpoint=args.checkpoint,
            checkpoint_interval=interval,
            fleet=fleet,
            checkpoint_keep=keep,
            guard=guard,
            moving_window=window,
        )
        stop["flusher"] = flusher
        if stop["requested"]:  # a signal that came while the flusher was being set up
            flusher.stop_requested = True
        try:
            flusher.run()
        finally:
            flusher.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _safety_options(args: argparse.Namespace) -> tuple[int, Any, int]:
    """``(checkpoint_keep, GuardOptions or None, moving window)`` of the flusher's options, checked."""
    from .engine.guard import DEFAULT_WINDOW, MAX_WINDOW, GuardOptions
    from .store.history import MAX_KEEP

    keep = 0
    if args.checkpoint_keep is not None:
        keep = check_int("--checkpoint-keep", args.checkpoint_keep, 1, MAX_KEEP)
        if not args.checkpoint:
            raise InvalidInputError(f"--checkpoint-keep: needs --checkpoint PATH (the kept files go beside it), got {keep}")
    window = DEFAULT_WINDOW if args.guard_window is None else check_int("--guard-window", args.guard_window, 1, MAX_WINDOW)
    if args.guard_reward is None:
        if args.guard_rollback:
            raise InvalidInputError("--guard-rollback: needs --guard-reward DROP")
        return keep, None, window
    guard = GuardOptions(args.guard_reward, window, args.guard_rollback)
    if args.fleet is not None:
        raise InvalidInputError(
            "--guard-reward: not with --fleet; every host must apply the same windows, so one host cannot pause or roll back"
        )
    return keep, guard, window


def _fleet_options(args: argparse.Namespace) -> Any:
    """The fleet options given, checked (None without --fleet); the others need --fleet."""
    extra = [
        flag
        for flag, value in (
            ("--fleet-key", args.fleet_key),
            ("--host-id", args.host_id),
            ("--fleet-lag", args.fleet_lag),
            ("--fleet-snapshot-interval", args.fleet_snapshot_interval),
            ("--fleet-min-replicas", args.fleet_min_replicas),
            ("--fleet-service", args.fleet_service),
        )
        if value is not None
    ]
    target = fleet_target(args)
    if target is None:
        if extra:
            raise InvalidInputError(f"{extra[0]}: needs --fleet URL")
        return None
    from .fleet.member import DEFAULT_SNAPSHOT_INTERVAL, FleetOptions, default_host_id
    from .fleet.stream import import_redis

    options = FleetOptions(
        url=target.url,
        key=args.fleet_key if args.fleet_key is not None else args.name,
        host_id=args.host_id if args.host_id is not None else default_host_id(args.name),
        lag=args.fleet_lag,
        snapshot_interval=DEFAULT_SNAPSHOT_INTERVAL if args.fleet_snapshot_interval is None else args.fleet_snapshot_interval,
        sentinels=target.sentinels,
        service=target.service,
        min_replicas=0 if args.fleet_min_replicas is None else args.fleet_min_replicas,
    )
    import_redis()  # refuses now, with the install command, if redis-py is missing
    return options


def _fleet(args: argparse.Namespace) -> int:
    """``sona-shm fleet hosts|remove-host``: the hosts Redis knows of a fleet; retire one."""
    from .fleet.replica import host_key
    from .fleet.stream import FleetLog, LinkDown, connect, import_redis

    if args.fleet is None and args.fleet_url_file is None and args.fleet_sentinel is None and os.environ.get(ENV_FLEET_URL):
        args.fleet = ""  # the URL in the variable: what `--fleet` without URL means
    target = fleet_target(args)
    if target is None:
        raise InvalidInputError(f"sona-shm fleet: needs --fleet URL (or --fleet-url-file, ${ENV_FLEET_URL}, --fleet-sentinel)")
    import_redis()
    try:
        fleet = FleetLog(connect(target, timeout=args.timeout), args.fleet_key)
    except LinkDown as exc:
        raise FleetError(f"sona-shm fleet: Redis did not answer ({exc})") from None
    try:
        if args.fleet_command == "hosts":
            hosts = fleet.hosts()
            if args.json:
                print(json.dumps(hosts, indent=2, sort_keys=True))
            else:
                print(f"{'host id':40} {'lease (s)':>9} {'last seq':>10} token")
                for host, row in hosts.items():
                    print(f"{host:40} {row['lease_s']:>9.1f} {row['last_seq']:>10} {row['token']}")
            return EXIT_OK
        status, seconds = fleet.remove_host(args.host_id, f"{host_key(args.host_id):016x}")
        if status == "busy":
            raise FlusherRunningError(
                f"sona-shm fleet remove-host: {args.host_id!r} holds a lease for {seconds:.1f} s more: its flusher runs "
                "(stop it first; a dead one's lease expires by itself)"
            )
        if status == "unknown":
            raise FleetError(f"sona-shm fleet remove-host: fleet {args.fleet_key!r} has no host {args.host_id!r} (`sona-shm fleet hosts`)")
        print(f"removed host {args.host_id!r} from fleet {args.fleet_key!r}")
        return EXIT_OK
    except LinkDown as exc:
        raise FleetError(f"sona-shm fleet: Redis did not answer ({exc})") from None
    finally:
        fleet.close()


def _stats(args: argparse.Namespace) -> int:
    from .monitor import format_table, watch
    from .stats import EngineStats, read

    if args.watch is not None:
        check_timeout(args.watch, "--watch", positive=True)
    if args.count is not None and (args.watch is None or args.count < 1):
        raise InvalidInputError(f"--count: expected an integer >= 1 together with --watch, got {args.count}")
    if args.interval is not None:
        if args.watch is not None:
            raise InvalidInputError(f"--interval: not with --watch (every redraw measures the rates since the last), got {args.interval}")
        check_timeout(args.interval, "--interval", positive=True)
    if args.prometheus:
        try:
            from .prometheus import exposition
        except ImportError as exc:
            raise SonaShmError(str(exc)) from None
    if args.watch is not None:
        last = watch(args.name, args.watch, count=args.count)
        if isinstance(last, SegmentNotFoundError):
            return EXIT_NOT_FOUND
        return EXIT_OK if isinstance(last, EngineStats) and last.flusher.alive else EXIT_NOT_RUNNING
    stats = read(args.name)
    if args.interval is not None:
        time.sleep(args.interval)  # the measuring interval the user asked for
        stats = read(args.name).since(stats)
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2, sort_keys=True))
    elif args.prometheus:
        sys.stdout.write(exposition(stats).decode("utf-8"))
    else:
        print(format_table(stats, columns=shutil.get_terminal_size().columns if sys.stdout.isatty() else None))
    if not stats.flusher.alive:
        # Said on stderr too, so --json and --prometheus output stays machine-readable.
        print(f"sona-shm: no flusher is running on segment {args.name!r}; start `sona-shm flusher --name {args.name}`", file=sys.stderr)
        return EXIT_NOT_RUNNING
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from .stats import list_engines

    engines = list_engines()
    if args.json:
        print(json.dumps([e.as_dict() for e in engines], indent=2))
        return EXIT_OK
    if not engines:
        print("sona-shm: no engines on this host (no sona_shm.* object in /dev/shm)")
        return EXIT_OK
    header = ("name", "flusher", "pid", "hidden", "rank", "lanes live", "learned", "MiB")
    rows = [header]
    for e in engines:
        lanes = f"{e.lanes_live} / {e.lanes}" if e.lanes is not None else "-"
        rows.append(
            (
                e.name,
                e.state,
                str(e.flusher_pid or "-") if e.state in ("alive", "not running") else "-",
                str(e.hidden_dim) if e.hidden_dim is not None else "-",
                str(e.rank) if e.rank is not None else "-",
                lanes,
                f"{e.trajectories_processed:,}" if e.trajectories_processed is not None else "-",
                f"{e.size_bytes / 2**20:.1f}",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for e in engines:
        if e.reason:
            print(f"  {e.name}: {e.reason}")
    return EXIT_OK


def _create(args: argparse.Namespace) -> int:
    from .engine.provision import create
    from .shm.segment import DEFAULT_MODE, GROUP_MODE

    given, routes = _given_config(args)
    created = create(args.name, config_overrides=given, routes=routes, mode=GROUP_MODE if args.group else DEFAULT_MODE)
    print(f"sona-shm: segment {args.name!r} {'created' if created else 'already exists; left as it is'}")
    return EXIT_OK


def _destroy(args: argparse.Namespace) -> int:
    from .engine.provision import destroy

    removed = destroy(args.name, force=args.force)
    print(f"sona-shm: removed {', '.join(removed)}")
    return EXIT_OK


def _drain(args: argparse.Namespace) -> int:
    from .engine.consumer import drain_to_file

    if args.max is not None and args.max < 0:
        raise InvalidInputError(f"--max: expected N >= 0, got {args.max}")
    check_timeout(args.timeout, "--timeout")
    try:
        drained = drain_to_file(args.name, args.out, n=args.max, timeout=args.timeout)
    except SonaShmError:
        raise  # (SegmentNotFoundError is a FileNotFoundError too: it keeps its own exit code)
    except OSError as exc:  # a full disk, a read-only or special file system (/proc), permissions: nothing left the buffer
        raise SonaShmError(f"out: cannot write {args.out!r} ({exc.strerror or exc}); nothing was drained") from None
    print(f"sona-shm: drained {drained} trajectories from {args.name!r} into {args.out}")
    if not drained:
        from .stats import read

        if read(args.name).config.capacity == 0:
            print(
                f"sona-shm: engine {args.name!r} keeps no buffer (created with capacity 0, the routing rule's default): nothing "
                "is kept for drain; create it with --capacity N to export what it learns",
                file=sys.stderr,
            )
    return EXIT_OK


def _checkpoint(args: argparse.Namespace) -> int:
    from .store.checkpoint import checkpoint_segment

    saved = checkpoint_segment(args.name, args.out)
    print(
        f"sona-shm: wrote {args.out}: generation {saved.generation}, "
        f"{saved.counters['trajectories_processed']} trajectories processed, {saved.counters['pending']} pending"
    )
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint, export_engine

    if args.from_checkpoint is not None:  # before --name: that may be only $SONA_SHM_NAME's default
        done = export_checkpoint(args.from_checkpoint, args.peft, module=args.module)
        source = args.from_checkpoint
    else:
        done = export_engine(args.name, args.peft, module=args.module)
        source = f"engine {args.name!r}"
    print(
        f"sona-shm: exported {source} (rank {done.rank}, hidden_dim {done.hidden_dim}, generation {done.generation}, "
        f"{done.trajectories_processed} trajectories learned) as a PEFT LoRA adapter on module {done.module!r}: {', '.join(done.files)}"
    )
    return EXIT_OK


def _restore(args: argparse.Namespace) -> int:
    from .store.checkpoint import restore

    generation = restore(args.name, args.source)
    print(f"sona-shm: restored segment {args.name!r} from {args.source}; weights generation is now {generation}")
    return EXIT_OK


def _routes(args: argparse.Namespace) -> int:
    from .engine import routes as route_changes
    from .shm.segment import Segment
    from .stats import read

    if args.routes_command == "build":
        return _routes_build(args.source, args.out)
    if args.routes_command == "list":
        stats = read(args.name)
        rows = [
            {"index": i, **{k: v for k, v in vars(r).items()}, "state": "retired" if r.retired else "active"}
            for i, r in enumerate(stats.routes)
        ]
        if args.json:
            print(json.dumps(rows))
            return EXIT_OK
        if not rows:
            print(f"sona-shm: engine {args.name!r} has no route table")
            return EXIT_OK
        print(f"{'index':>5}  {'name':<24} {'state':<8} {'chosen':>8} {'best':>8} {'mean reward':>11} {'drift':>7} {'bias':>7}")
        for r in rows:
            mean = "-" if r["mean_reward"] is None else f"{r['mean_reward']:.3f}"
            counts = f"{r['chosen']:>8} {r['best']:>8} {mean:>11}"
            print(f"{r['index']:>5}  {r['name']:<24} {r['state']:<8} {counts} {r['drift']:>7.3f} {r['bias']:>7.3f}")
        return EXIT_OK
    timeout = check_timeout(args.timeout, "--timeout")
    segment = Segment.open(args.name, writable=True)
    try:
        if args.routes_command == "add":
            vector = _route_vector(args.vector)
            index = route_changes.change(segment, "add", name=args.route, vector=vector, timeout=timeout)
            print(f"sona-shm: engine {args.name!r}: added route {index} {args.route!r}")
        else:
            which = _route_argument(segment, args.route)
            if args.routes_command == "rename":
                index = route_changes.change(segment, "rename", route=which, name=args.new_name, timeout=timeout)
                print(f"sona-shm: engine {args.name!r}: route {index} is now {args.new_name!r}")
            else:
                index = route_changes.change(segment, "retire", route=which, timeout=timeout)
                print(f"sona-shm: engine {args.name!r}: retired route {index} {args.route!r}")
    finally:
        segment.close()
    return EXIT_OK


def _pause_resume(args: argparse.Namespace) -> int:
    from .engine import admin
    from .shm.segment import Segment

    timeout = check_timeout(args.timeout, "--timeout")
    segment = Segment.open(args.name, writable=True)
    try:
        reply = (admin.pause if args.command == "pause" else admin.resume)(segment, timeout=timeout)
        learning = read_learning(segment)
    finally:
        segment.close()
    if args.command == "pause":
        print(
            f"sona-shm: engine {args.name!r}: learning paused ({learning.paused_by}); it serves weights generation "
            f"{reply.generation}; what producers commit is counted and kept for consumers, not learned"
        )
    else:
        print(
            f"sona-shm: engine {args.name!r}: learning resumed; {learning.paused_skipped:,} trajectories taken in while paused "
            "(ever) were not learned"
        )
    return EXIT_OK


def read_learning(segment: Any) -> Any:
    """The learning section of the stats of a mapped engine."""
    from .shm.ledger import Ledger
    from .stats import collect

    ledger = Ledger(segment)
    try:
        learning = collect(segment, ledger).learning
    finally:
        ledger.close()
    assert learning is not None
    return learning


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, render

    evaluation = evaluate(args.name, files=args.files, against=args.against, confidence=args.confidence)
    print(json.dumps(evaluation.as_dict(), indent=2) if args.json else render(evaluation))
    return EXIT_OK


def _checkpoints(args: argparse.Namespace) -> int:
    from .store.history import checkpoint_history

    rows = checkpoint_history(args.name)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return EXIT_OK
    if not rows:
        print(f"sona-shm: engine {args.name!r} keeps no checkpoints (start its flusher with --checkpoint PATH --checkpoint-keep K)")
        return EXIT_OK
    header = ("back", "written", "generation", "learned", "signals", "moving reward", "paused", "note", "file")
    table = [header]
    for r in rows:
        e = r.entry
        table.append(
            (
                str(r.back),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.written_at)) if e.written_at else "?",
                "?" if e.generation is None else str(e.generation),
                "?" if e.trajectories_processed is None else f"{e.trajectories_processed:,}",
                "?" if e.signals_accumulated is None else f"{e.signals_accumulated:,}",
                "-" if e.moving_reward is None else f"{e.moving_reward:.4f}",
                {0: "no", 1: "request", 2: "guard"}.get(e.paused, "?") if e.paused is not None else "?",
                r.note,
                e.path,
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return EXIT_OK


def _rollback(args: argparse.Namespace) -> int:
    from .engine import admin
    from .shm.segment import Segment
    from .store.history import resolve_back

    timeout = check_timeout(args.timeout, "--timeout")
    segment = Segment.open(args.name, writable=True)
    try:
        path = args.to if args.to is not None else resolve_back(segment, 1 if args.back is None else args.back)
        reply = admin.rollback(segment, path, timeout=timeout)
        learning = read_learning(segment)
    finally:
        segment.close()
    state = f"learning stays paused ({learning.paused_by}): `sona-shm resume --name {args.name}`" if learning.paused else "learning goes on"
    print(
        f"sona-shm: engine {args.name!r} rolled back to {path}: weights generation {reply.generation}, the learning of "
        f"{reply.discarded:,} signals discarded; {state}"
    )
    return EXIT_OK


def _routes_build(source: str, out: str) -> int:
    """``sona-shm routes build``: a route table from example embeddings in JSON lines, written as a new .npz."""
    from .learn.routes import RouteTable, read_examples

    if not out.endswith(".npz"):
        raise InvalidInputError(f"--out: expected a file name ending in .npz (numpy would add the suffix), got {out!r}")
    examples = read_examples(source)
    table = RouteTable.from_examples(examples, where=f"examples file {source}")
    try:
        with open(out, "xb") as f:  # never replaces a table someone runs with
            table.save(f)
    except FileExistsError:
        raise InvalidInputError(f"--out: expected a new file, {out!r} exists (remove it or pick another name)") from None
    except OSError as exc:
        raise SonaShmError(f"--out: cannot write {out!r} ({exc.strerror or exc})") from None
    count = sum(len(e) for e in examples.values())
    print(
        f"sona-shm: wrote {out}: {len(table)} routes of hidden_dim {table.vectors.shape[1]} from {count} examples "
        f"({', '.join(table.names)}); use it with `sona-shm flusher --name NAME --rule routing --routes {out}`"
    )
    return EXIT_OK


def _route_vector(path: str) -> Any:
    """The vector ``sona-shm routes add --vector FILE`` gives: one vector, or the mean direction of example embeddings."""
    import zipfile

    import numpy as np

    from .learn.routes import mean_direction, numpy_file_kind

    if not os.path.isfile(path) or numpy_file_kind(path, "--vector") != "npy":  # numpy takes other files for pickles
        raise InvalidInputError(f"--vector: expected a .npy file (numpy.save) of one vector or of example embeddings, got {path!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"--vector: expected a .npy file of one vector or of example embeddings, got {path!r} ({exc})") from None
    if not isinstance(data, np.ndarray):
        data.close()
        raise InvalidInputError(f"--vector: expected a .npy file (one array), got an .npz archive {path!r}")
    return mean_direction(data, f"--vector {path}") if data.ndim == 2 else data


def _route_argument(segment: Any, text: str) -> Any:
    """A route given on the command line: its name, or else an index written in digits."""
    from .shm.ledger import read_route_table

    table = read_route_table(segment)
    if table is not None and text not in table.names and text.isdigit():
        return int(text)
    return text


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    check_int("--producers", args.producers, 1, DEMO_MAX_PRODUCERS)
    check_int("--trajectories", args.trajectories, 1, 10_000_000)
    return run_demo(producers=args.producers, trajectories=args.trajectories, name=args.name)


_COMMANDS = {
    "flusher": _flusher,
    "fleet": _fleet,
    "stats": _stats,
    "list": _list,
    "create": _create,
    "destroy": _destroy,
    "drain": _drain,
    "checkpoint": _checkpoint,
    "export": _export,
    "restore": _restore,
    "pause": _pause_resume,
    "resume": _pause_resume,
    "checkpoints": _checkpoints,
    "rollback": _rollback,
    "evaluate": _evaluate,
    "routes": _routes,
    "demo": _demo,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
