"""sona_shm.prometheus: the EngineCollector in a real prometheus_client registry, its text, promtool's verdict."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY

from sona_shm import Step, Trajectory
from sona_shm.cli import EXIT_NOT_FOUND, EXIT_NOT_RUNNING, EXIT_OK, main
from sona_shm.prometheus import ENGINE_METRICS, FLEET_METRICS, LANE_METRICS, LEARNING_METRICS, ROUTE_METRICS, EngineCollector, exposition
from sona_shm.shm import segment
from sona_shm.stats import read

from conftest import SMALL
from support import run as run_process

H = SMALL["hidden_dim"]


def one_step() -> Trajectory:
    return Trajectory(np.ones(H, np.float32), [Step(np.arange(H, dtype=np.float32), None, 1.0)], 0.5)


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple, float]]:
    """Family name -> {(sample name, sorted labels): value}, through prometheus_client's own parser."""
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


def value(families: dict, sample: str, **labels: str) -> float:
    family = families[sample.removesuffix("_total")]
    return family[(sample, tuple(sorted(labels.items())))]


@pytest.fixture
def busy(engine):
    """A flusher (in-process), one live lane with 5 learned and 1 not yet, one lane whose owner left."""
    flusher = engine(flush_threshold=2, capacity=3)
    live = engine.attach()
    gone = engine.attach()  # another lane: live holds its own
    gone.record(one_step())
    gone.close()
    for _ in range(4):
        live.record(one_step())
    flusher.scan()
    live.record(one_step())
    return flusher, live


def test_a_registered_collector_reports_the_engine(busy, name):
    flusher, live = busy
    registry = CollectorRegistry()
    registry.register(EngineCollector(name))
    families = scrape(registry)
    stats = read(name)
    e = {"engine": name}
    assert value(families, "sona_shm_engine_up", **e) == 1
    assert value(families, "sona_shm_flusher_up", engine=name) == 1
    assert value(families, "sona_shm_flusher_info", engine=name, pid=str(os.getpid())) == 1
    for key in ("trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied"):
        assert value(families, f"sona_shm_{key}_total", **e) == getattr(stats, key)
    assert value(families, "sona_shm_trajectories_processed_total", **e) == 5
    assert value(families, "sona_shm_recorded_total", **e) == 6 and value(families, "sona_shm_backlog", **e) == 1
    assert value(families, "sona_shm_buffer_dropped_total", **e) == 2 and value(families, "sona_shm_buffer_len", **e) == 3
    assert value(families, "sona_shm_buffer_success_rate", **e) == pytest.approx(3 / 5)
    assert value(families, "sona_shm_adapter_up_norm", **e) == pytest.approx(stats.adapter.up_norm) and stats.adapter.up_norm > 0
    assert value(families, "sona_shm_adapter_down_norm", **e) == pytest.approx(stats.adapter.down_norm)
    assert value(families, "sona_shm_lanes_live", **e) == 1 and value(families, "sona_shm_lanes", **e) == SMALL["lanes"]
    ids = {"engine": name, "lane": str(live.lane)}
    assert value(families, "sona_shm_lane_info", **ids, pid=str(os.getpid())) == 1
    assert value(families, "sona_shm_lane_records_total", **ids) == 5 and value(families, "sona_shm_lane_backlog", **ids) == 1
    assert len(families["sona_shm_lane_records"]) == 1  # live lanes only
    assert "sona_shm_adapter_up_change_norm" not in families or not families["sona_shm_adapter_up_change_norm"]  # first scrape

    flusher.scan()  # learns the sixth: the adapter moves
    before = stats.adapter.up.astype(np.float64)
    again = scrape(registry)
    moved = float(np.linalg.norm(read(name).adapter.up.astype(np.float64) - before))
    assert value(again, "sona_shm_trajectories_processed_total", **e) == 6
    assert value(again, "sona_shm_adapter_up_change_norm", **e) == pytest.approx(moved)


def test_every_family_is_described_so_a_second_collector_for_the_same_names_is_refused(name):
    registry = CollectorRegistry()
    registry.register(EngineCollector(name))  # describe() does not read the engine: it need not exist
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(EngineCollector(name))
    described = {f.name for f in EngineCollector(name).describe()}
    assert described == {
        "sona_shm_engine_up",
        "sona_shm_flusher_up",
        "sona_shm_flusher_info",
        "sona_shm_lane_info",
        "sona_shm_engine_rule",
        "sona_shm_fleet_info",
    } | {f"sona_shm_{s.name}" for s in ENGINE_METRICS + LEARNING_METRICS + FLEET_METRICS} | {
        f"sona_shm_{m[0]}" for m in LANE_METRICS + ROUTE_METRICS
    }


def test_one_collector_for_several_engines_and_a_missing_one(engine, name):
    engine()
    other = f"{name}-b"
    try:
        registry = CollectorRegistry()
        registry.register(EngineCollector(name, other))
        families = scrape(registry)
        assert value(families, "sona_shm_engine_up", engine=name) == 1 and value(families, "sona_shm_engine_up", engine=other) == 0
        assert [labels for _, labels in families["sona_shm_trajectories_processed"]] == [(("engine", name),)]
    finally:
        segment.unlink(other)


def test_a_destroyed_and_recreated_engine_is_followed(engine, name):
    flusher = engine()
    collector = EngineCollector(name)
    registry = CollectorRegistry()
    registry.register(collector)
    client = engine.attach()
    client.record(one_step())
    flusher.scan()
    assert value(scrape(registry), "sona_shm_recorded_total", engine=name) == 1
    client.close()
    flusher.close()
    segment.unlink(name)
    assert value(scrape(registry), "sona_shm_engine_up", engine=name) == 0  # nothing held mapped: it is gone
    engine(hidden_dim=8)
    families = scrape(registry)
    assert value(families, "sona_shm_engine_up", engine=name) == 1 and value(families, "sona_shm_recorded_total", engine=name) == 0
    assert value(families, "sona_shm_segment_bytes", engine=name) == read(name).config.segment_bytes
    assert not families.get("sona_shm_adapter_up_change_norm")  # no movement across two engines


def test_it_works_in_the_default_registry_and_unregisters(engine, name):
    engine()
    collector = EngineCollector(name)
    REGISTRY.register(collector)
    try:
        assert f'sona_shm_engine_up{{engine="{name}"}} 1.0' in generate_latest(REGISTRY).decode()
    finally:
        REGISTRY.unregister(collector)


def test_names_are_checked():
    with pytest.raises(ValueError, match="name: expected 1-64 characters"):
        EngineCollector("a/b")
    with pytest.raises(TypeError, match="at least one engine name"):
        EngineCollector()


def test_label_values_are_escaped_by_the_library(busy, name):
    odd = read(name)
    text = exposition(odd, 'a\\b"c\nd').decode()
    assert 'sona_shm_engine_up{engine="a\\\\b\\"c\\nd"} 0.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["engine"] for s in families["sona_shm_engine_up"].samples} == {name, 'a\\b"c\nd'}


# ----------------------------------------------------------------- the command line


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_prometheus_prints_the_collectors_text(capsys, busy, name):
    code, text, _ = run(capsys, "stats", "--name", name, "--prometheus")
    assert code == EXIT_OK
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["sona_shm_trajectories_processed"].type == "counter"
    assert families["sona_shm_trajectories_processed"].samples[0].value == 5
    assert families["sona_shm_backlog"].type == "gauge"


def test_stats_prometheus_with_an_interval_has_the_movement(capsys, engine, name):
    engine()
    code, text, _ = run(capsys, "stats", "--name", name, "--prometheus", "--interval", "0.01")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert code == EXIT_OK and families["sona_shm_adapter_up_change_norm"].samples[0].value == 0.0


def test_stats_prometheus_without_a_flusher_says_down_and_exits_6(capsys, engine, name):
    engine().close()
    code, text, err = run(capsys, "stats", "--name", name, "--prometheus")
    assert code == EXIT_NOT_RUNNING and "no flusher is running" in err
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert [s.value for s in families["sona_shm_flusher_up"].samples] == [0]


def test_stats_prometheus_of_a_missing_engine_exits_3_and_prints_nothing(capsys, name):
    code, text, err = run(capsys, "stats", "--name", name, "--prometheus")
    assert code == EXIT_NOT_FOUND and text == "" and "does not exist" in err


# ----------------------------------------------------------------- promtool


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing under CI=true: ./scripts/test installs it (apt-get install prometheus) when run as root")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; ./scripts/test does it as root)")
    return path


def test_promtool_accepts_the_text(busy, name):
    promtool = _promtool()
    earlier = read(name)
    rated = read(name).since(earlier)
    assert rated.rates is not None
    for text in (exposition(earlier), exposition(rated), exposition(name)):
        done = run_process([promtool, "check", "metrics"], input=text, text=False, timeout=60)
        assert done.returncode == 0, (done.stdout + done.stderr).decode()
        assert done.stdout.decode().strip() == "" and done.stderr.decode().strip() == "", (done.stdout + done.stderr).decode()


def test_promtool_accepts_a_routing_engine_and_no_series_but_info_has_a_pid(engine, name):
    """The route series too (a gauge named *_sum made promtool exit 3); a pid only on the _info series, so a restarted
    flusher or a recycled worker starts no new series; no buffer (capacity 0) gives no success rate, not 0."""
    from sona_shm import RouteTable

    promtool = _promtool()
    flusher = engine(routes=RouteTable.build(np.eye(3, H, dtype=np.float32), ["a", "b", "c"]), rule="routing", capacity=0)
    client = engine.attach()
    x = np.eye(3, H, dtype=np.float32)
    assert client.feedback(x[0], route="a", reward=0.5) and client.feedback(x[1], best="b")
    flusher.scan()
    earlier = read(name)
    rated = read(name).since(earlier)
    for text in (exposition(earlier), exposition(rated)):
        done = run_process([promtool, "check", "metrics"], input=text, text=False, timeout=60)
        assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (done.stdout + done.stderr).decode()
    families = {f.name: f for f in text_string_to_metric_families(exposition(rated).decode())}
    assert [s.value for s in families["sona_shm_route_reward_summed"].samples if s.labels["route"] == "a"] == [0.5]
    assert not families["sona_shm_buffer_success_rate"].samples
    with_pid = {f.name for f in families.values() for s in f.samples if "pid" in s.labels}
    assert with_pid == {"sona_shm_flusher_info", "sona_shm_lane_info"}


def test_a_collector_made_for_each_scrape_still_measures_the_movement(engine, name):
    """The multiprocess recipe builds a registry and a collector per scrape: the previous scrape is the process's."""
    flusher = engine(flush_threshold=1)
    client = engine.attach()

    def fresh_scrape() -> dict:
        registry = CollectorRegistry()
        registry.register(EngineCollector(name))
        return scrape(registry)

    assert not fresh_scrape().get("sona_shm_adapter_up_change_norm")  # the process's first scrape
    before = read(name).adapter.up.astype(np.float64)
    client.record(one_step())
    flusher.scan()
    moved = float(np.linalg.norm(read(name).adapter.up.astype(np.float64) - before))
    assert moved > 0 and value(fresh_scrape(), "sona_shm_adapter_up_change_norm", engine=name) == pytest.approx(moved)
