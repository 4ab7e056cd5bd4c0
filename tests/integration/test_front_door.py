"""The front door (issue 20): the example apps and the demo run with only what the README installs for them.

The test venv holds every extra, so a module an example imports but its extras do not
install goes unnoticed here; ``.ci/run`` proves the real thing from empty venvs
(``scripts/ci_fresh_venvs``). These tests take the one optional module the examples
use, ``prometheus_client``, away from real servers (a package of that name on their
``PYTHONPATH`` that fails to import, as a missing one does) and check that they serve
all but ``/metrics``, which says what to install. And when gunicorn's workers do fail to
boot, the demo prints the cause first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sona_shm.shm.segment import start_ticks
from sona_shm.supervise import child_setup

from children import child_pids, listening_socket, process_running, start_gunicorn, stop_gunicorn, wait_until_serving
from support import ROOT, app_feedback, env, run

H = 32
FLUSHER = ("--hidden-dim", str(H), "--max-steps", "4", "--attention-dim", "8", "--lanes", "4", "--lane-slots", "64", "--capacity", "64")
FLUSHER += ("--routes", str(ROOT / "tests" / "data" / "routes-h32.npz"))
DEMO = str(ROOT / "scripts" / "demo.py")
sys.path.insert(0, str(ROOT / "scripts"))
import demo  # noqa: E402 - scripts/ is not a package


@pytest.fixture
def without_prometheus(tmp_path) -> str:
    """A directory whose ``prometheus_client`` fails to import as a missing module does; put it first on PYTHONPATH."""
    package = tmp_path / "without-prometheus" / "prometheus_client"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'prometheus_client\'", name="prometheus_client")\n')
    return str(package.parent)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.guarantee("the-examples-run-on-the-extras-named-for-them")
@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_each_example_app_serves_without_prometheus_client_and_metrics_says_what_to_install(
    procs, name, tmp_path, without_prometheus, kind
):
    procs.flusher(name, *FLUSHER)
    environment = {**env(), "SONA_SHM_NAME": name, "SONA_SHM_ATTACH_TIMEOUT": "30", "XDG_RUNTIME_DIR": str(tmp_path)}
    environment["PYTHONPATH"] = os.pathsep.join([without_prometheus, environment["PYTHONPATH"]])
    check = subprocess.run([sys.executable, "-c", "import prometheus_client"], env=environment, capture_output=True, text=True, timeout=60)
    assert "No module named 'prometheus_client'" in check.stderr  # what a venv without the prometheus extra says

    sock = listening_socket()
    port = sock.getsockname()[1]
    log = tmp_path / f"{kind}.log"
    with open(log, "w") as out:
        try:
            if kind == "gunicorn":  # router_app as the README runs it: the example configuration, gthread workers
                argv = ("-c", str(ROOT / "examples" / "gunicorn.conf.py"), "--workers", "2")
                proc = start_gunicorn("router_app:app", sock, *argv, stdout=out, stderr=out, env=environment)
            else:
                fd = sock.fileno()
                argv = ["-m", "uvicorn", "--app-dir", str(ROOT / "examples"), "--fd", str(fd), "fastapi_app:app"]
                proc = subprocess.Popen(
                    [sys.executable, *argv], pass_fds=(fd,), stdout=out, stderr=out, env=environment, preexec_fn=child_setup(deadline=600)
                )
        finally:
            sock.close()
    pids = [(proc.pid, start_ticks(proc.pid))]
    try:
        try:
            wait_until_serving(port, proc, timeout=120)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n--- {kind} log ---\n{log.read_text()}") from None
        pids += [(pid, start_ticks(pid)) for pid in child_pids(proc.pid)]
        status, answer = request(port, "POST", "/route", json.dumps({"embedding": [0.5] * H}).encode())
        assert status == 200 and answer["route"] in ("code", "math", "chat", "search")
        assert request(port, "POST", "/feedback", json.dumps(app_feedback(H)).encode()) == (200, {"accepted": True})
        status, answer = request(port, "GET", "/metrics")
        assert status == 501, (status, answer)
        assert answer["error"].startswith("metrics: prometheus_client is not installed in this server's environment")
        assert "pip install 'sona-shm[prometheus]'" in answer["error"]
        assert request(port, "GET", "/stats")[1]["recorded"] == 1
    finally:
        stop_gunicorn(proc)
        left = [pid for pid, ticks in pids if process_running(pid, ticks)]
        assert not left, f"server processes outlived the test: {left}"


@pytest.mark.guarantee("the-examples-run-on-the-extras-named-for-them")
def test_the_demo_runs_without_prometheus_client(name, without_prometheus):
    """What ./scripts/demo met on a fresh clone: its venv has the gunicorn and monitor extras, not prometheus.

    Here the module is taken away through PYTHONPATH, which the demo now passes on to
    gunicorn (it used to replace it); the real empty venv is scripts/ci_fresh_venvs' job.
    """
    environment = {**env(), "PYTHONPATH": os.pathsep.join([without_prometheus, env()["PYTHONPATH"]])}
    command = [sys.executable, "-u", DEMO, "--seconds", "1", "--workers", "2", "--threads", "2", "--clients", "2", "--name", name]
    done = run(command, timeout=300, env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "= exactly the feedback the server accepted" in done.stdout


def test_when_workers_fail_to_boot_the_demo_prints_the_cause_first(name):
    environment = {**env(), "SONA_SHM_ATTACH_TIMEOUT": "soon"}  # every worker's post_fork refuses it
    command = [sys.executable, "-u", DEMO, "--seconds", "1", "--workers", "3", "--name", name]
    done = run(command, timeout=300, env=environment)
    assert done.returncode == 1, done.stdout + done.stderr
    first = done.stderr.splitlines()[0]
    assert first == (
        "sona-shm demo: gunicorn's workers failed to boot: SONA_SHM_ATTACH_TIMEOUT: expected a finite number of seconds >= 0, got 'soon'"
    ), done.stderr
    assert done.stderr.count("Traceback (most recent call last):") == 1  # one worker's, not every worker's
    assert "flusher exit 0" in done.stdout and f"removed /sona_shm.{name}" in done.stdout  # and it cleaned up


def test_the_cause_of_a_missing_module_is_found_in_a_real_gunicorn_log(tmp_path):
    """A real gunicorn whose app imports a module that is not installed: the demo's reading of its log."""
    (tmp_path / "needs_missing.py").write_text("import sona_shm_no_such_module  # noqa\n")
    sock = listening_socket()
    log = tmp_path / "gunicorn.log"
    environment = {**env(), "XDG_RUNTIME_DIR": str(tmp_path)}
    with open(log, "w") as out:
        try:
            proc = start_gunicorn(
                "needs_missing:app", sock, "--pythonpath", str(tmp_path), "--workers", "3", stdout=out, stderr=out, env=environment
            )
        finally:
            sock.close()
    try:
        assert proc.wait(timeout=120) != 0  # gunicorn stops when its workers cannot load the app
    finally:
        stop_gunicorn(proc)
    text = log.read_text()
    cause, traceback = demo.boot_failure(text)
    assert cause == "ModuleNotFoundError: No module named 'sona_shm_no_such_module'"
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == cause
    message = demo.explain_gunicorn_failure("gunicorn exited with code 3 before serving /healthz", text)
    lines = message.splitlines()
    assert lines[0] == f"gunicorn's workers failed to boot: {cause}"
    assert re.match(r"  the module 'sona_shm_no_such_module' is not installed in ", lines[1])
    assert message.count("Traceback (most recent call last):") == 1
