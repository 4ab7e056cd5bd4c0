#!/usr/bin/env python3
"""CI: each example app, installed into an empty venv with only the extras the README names for it, answers requests.

    python scripts/ci_fresh_venvs.py --work DIR      (scripts/ci_fresh_venvs runs it, after the demo)

The test venv holds every extra, so an import an example needs but its extras do not
install never fails there (issue 20: ``prometheus_client``). Here, for each app:

1. ``python3 -m venv DIR/APP`` and ``pip install 'sona_shm-….whl[EXTRAS]'`` with the
   extras the README names (``gunicorn`` for ``examples/router_app.py``, ``fastapi`` for
   ``examples/fastapi_app.py``): a real install, not the checkout, so the app imports the
   installed package. The wheel is built once from the checkout (``pip wheel``, the
   README's other way to install) instead of once per venv: the same package and
   metadata, without compiling the C fast paths twice;
2. that venv's ``sona-shm flusher`` on a scratch engine with the example route table;
3. the server as the README runs it (gunicorn with ``examples/gunicorn.conf.py``, uvicorn
   with ``--app-dir examples``), from a scratch directory, with no ``PYTHONPATH``;
4. ``GET /healthz``, ``POST /route``, ``POST /feedback`` (accepted), and ``GET /metrics``,
   which without the prometheus extra must be the 501 that says what to install;
5. everything stopped, the engine destroyed, the venv removed (also on failure).

Runs from the test venv (it needs sona_shm's supervise helpers and scripts/children.py),
which ``./scripts/test`` made. Exit status 0 when every app answered; the time each step
took is printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sona_shm.supervise import child_setup, stop_process  # noqa: E402 - after the path is set

from children import listening_socket, stop_gunicorn, wait_until_serving  # noqa: E402

ROUTES = ROOT / "tests" / "data" / "routes-h32.npz"  # four routes (code, math, chat, search), h = 32
H = 32
#: Seconds any one child may live (pip included): the kernel ends it then, and when this script dies.
DEADLINE = 600

#: app -> (the extras the README names for it, how the README runs it)
APPS = {
    "router_app": ("gunicorn", "gunicorn"),
    "fastapi_app": ("fastapi", "uvicorn"),
}


def step(what: str, started: float) -> float:
    now = time.monotonic()
    print(f"ci_fresh_venvs: {what} ({now - started:.1f} s)", flush=True)
    return now


def run(argv: list[str], **kwargs) -> None:
    """Run a command to completion (at most DEADLINE seconds); its output goes to ours."""
    subprocess.run(argv, check=True, timeout=DEADLINE, preexec_fn=child_setup(deadline=DEADLINE), **kwargs)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of the servers: no PYTHONPATH, nothing of the test venv."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PIP_CACHE_DIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PIP_")}
    env.update(extra)
    return env


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def build_wheel(work: Path) -> Path:
    """The checkout as a wheel in ``work`` (built once; each venv installs it with its extras)."""
    out = work / "wheel"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps", str(ROOT), "-w", str(out)])
    [wheel] = out.glob("sona_shm-*.whl")
    return wheel


def check_app(app: str, extras: str, server: str, work: Path, wheel: Path) -> None:
    started = time.monotonic()
    venv = work / app
    scratch = work / f"{app}-run"
    scratch.mkdir()
    name = f"ci-fresh-{os.getpid()}-{app.replace('_', '-')}"
    bin_ = venv / "bin"
    flusher = proc = None
    log_path = scratch / f"{server}.log"
    try:
        run([os.environ.get("PYTHON", "python3"), "-m", "venv", str(venv)])  # what scripts/_venv.sh uses
        run([str(bin_ / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{wheel}[{extras}]"], cwd=scratch)
        t = step(f"{app}: empty venv + pip install '{wheel.name}[{extras}]'", started)

        env = clean_env(SONA_SHM_NAME=name, XDG_RUNTIME_DIR=str(scratch))
        with open(scratch / "flusher.log", "w") as log:
            flusher = subprocess.Popen(
                [str(bin_ / "sona-shm"), "flusher", "--name", name, "--rule", "routing", "--routes", str(ROUTES), "--flush-interval", "0.5"]
                + ["--lanes", "4", "--lane-slots", "64", "--capacity", "64", "--quiet"],
                stdout=log,
                stderr=log,
                cwd=scratch,
                env=env,
                preexec_fn=child_setup(deadline=DEADLINE),
            )
        sock = listening_socket()
        port, fd = sock.getsockname()[1], sock.fileno()
        os.set_inheritable(fd, True)
        if server == "gunicorn":  # the README: gunicorn -c examples/gunicorn.conf.py router_app:app
            argv = [str(bin_ / "gunicorn"), "-c", str(ROOT / "examples" / "gunicorn.conf.py"), "--bind", f"fd://{fd}", "--workers", "2"]
            argv.append(f"{app}:app")
        else:  # the README: uvicorn --app-dir examples fastapi_app:app
            argv = [str(bin_ / "uvicorn"), "--app-dir", str(ROOT / "examples"), "--fd", str(fd), f"{app}:app"]
        with open(log_path, "w") as log:
            try:
                proc = subprocess.Popen(
                    argv, pass_fds=(fd,), stdout=log, stderr=log, cwd=scratch, env=env, preexec_fn=child_setup(deadline=DEADLINE)
                )
            finally:
                sock.close()
        wait_until_serving(port, proc, timeout=120)  # /healthz: attached to the engine (which the flusher created meanwhile)

        status, answer = request(port, "POST", "/route", {"embedding": [0.5] * H})
        if status != 200 or answer.get("route") not in ("code", "math", "chat", "search"):
            raise RuntimeError(f"POST /route answered {status}: {answer}")
        status, answer = request(port, "POST", "/feedback", {"embedding": [0.5] * H, "route": answer["route"], "reward": 1})
        if (status, answer) != (200, {"accepted": True}):
            raise RuntimeError(f"POST /feedback answered {status}: {answer}")
        status, answer = request(port, "GET", "/metrics")
        if status != 501 or "pip install 'sona-shm[prometheus]'" not in answer.get("error", ""):
            raise RuntimeError(f"GET /metrics without the prometheus extra answered {status}: {answer}")
        step(f"{app} under {server}: served /healthz, /route, /feedback (accepted), /metrics (501: needs the prometheus extra)", t)
    except BaseException:
        for log in (log_path, scratch / "flusher.log"):
            if log.exists():
                print(f"--- {log.name} ---\n{log.read_text(errors='replace')}", file=sys.stderr)
        raise
    finally:
        if proc is not None:
            stop_gunicorn(proc)  # SIGTERM (uvicorn too); SIGKILL after 30 s, and any worker left
        if flusher is not None:
            stop_process(flusher)
            subprocess.run([str(bin_ / "sona-shm"), "destroy", "--name", name, "--force"], capture_output=True, timeout=60)
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="an existing scratch directory (the caller removes it)")
    p.add_argument("--app", choices=sorted(APPS), action="append", help="only this app (repeatable; default: all)")
    args = p.parse_args(argv)
    started = time.monotonic()
    wheel = build_wheel(args.work)
    step(f"built {wheel.name}", started)
    for app in args.app or APPS:
        extras, server = APPS[app]
        check_app(app, extras, server, args.work, wheel)
    step("every example app answered from a fresh venv", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
