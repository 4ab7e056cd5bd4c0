"""A real gunicorn whose app serves prometheus_client multiprocess metrics together with EngineCollector."""

from __future__ import annotations

import http.client
import os
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sona_shm.shm.segment import start_ticks
from sona_shm.stats import read

from children import child_pids, listening_socket, process_running, start_gunicorn, stop_gunicorn, wait_until_serving
from support import env, wait_for

HERE = Path(__file__).resolve().parent
H = 8


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[str, list]:
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture
def server(procs, name, tmp_path):
    procs.flusher(name, "--hidden-dim", str(H), "--flush-threshold", "5", "--lanes", "4", "--flush-interval", "0.1")
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    sock = listening_socket()
    port = sock.getsockname()[1]
    log = tmp_path / "gunicorn.log"
    environment = {**env(), "SONA_SHM_NAME": name, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "XDG_RUNTIME_DIR": str(tmp_path)}
    with open(log, "w") as out:
        try:
            argv = ("-c", str(HERE / "multiproc_gunicorn_conf.py"), "--pythonpath", str(HERE), "--workers", "2", "--log-level", "info")
            proc = start_gunicorn("multiproc_app:app", sock, *argv, stdout=out, stderr=out, env=environment)
        finally:
            sock.close()
    try:
        wait_until_serving(port, proc, path="/metrics", timeout=120)
        wait_for(lambda: read(name).lanes_live == 2, timeout=120, what="two attached workers")
        yield proc, port, log, metrics_dir
    finally:
        workers = [(pid, start_ticks(pid)) for pid in child_pids(proc.pid)]
        stop_gunicorn(proc)
        assert not [pid for pid, ticks in workers if process_running(pid, ticks)], "workers outlived their master"


def test_app_metrics_and_engine_metrics_in_one_scrape_across_a_dead_worker(server, name):
    proc, port, log, metrics_dir = server
    for _ in range(20):
        assert get(port, "/") == (200, '{"accepted": true}')
    wait_for(lambda: read(name).trajectories_processed == 20, timeout=60, what="20 trajectories learned")
    families = scrape(port)
    assert [s.value for s in families["app_requests"] if s.name == "app_requests_total"] == [20.0]  # summed over workers
    assert [s.value for s in families["app_workers"]] == [2.0]
    engine = [s for s in families["sona_shm_trajectories_processed"] if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in engine] == [({"engine": name}, 20.0)]  # once, not once per worker
    # Every documented series under this recipe: up_change_norm too, from a worker's second scrape on (2 workers,
    # 3 scrapes: one worker scraped twice), though each scrape makes a new collector.
    moved = [scrape(port).get("sona_shm_adapter_up_change_norm") for _ in range(3)]
    assert any(samples and samples[0].labels == {"engine": name} for samples in moved), moved

    workers = child_pids(proc.pid)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)  # child_exit: mark_process_dead, then sona_shm's own hook
    wait_for(lambda: f"worker {victim} exited" in log.read_text(), timeout=60, what="child_exit of the killed worker")
    live_files = lambda: {f.name for f in metrics_dir.glob("gauge_livesum_*.db")}  # noqa: E731 - one per worker that imported the app
    replacement = wait_for(lambda: set(child_pids(proc.pid)) - {victim} - set(workers), timeout=120, what="a replacement worker")
    wait_for(lambda: {f"gauge_livesum_{pid}.db" for pid in replacement} <= live_files(), timeout=120, what="the replacement's app loaded")
    assert f"gauge_livesum_{victim}.db" not in live_files()  # mark_process_dead removed it
    families = scrape(port)
    assert [s.value for s in families["app_workers"]] == [2.0]  # the dead worker's live gauge was dropped (3 without the hook)
    assert [s.value for s in families["app_requests"] if s.name == "app_requests_total"] == [20.0]  # its counts are kept
    assert [s.value for s in families["sona_shm_recorded"] if s.name.endswith("_total")] == [20.0]
