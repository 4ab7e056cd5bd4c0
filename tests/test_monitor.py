"""The monitor: table, JSON, --watch with rates; missing segment and no flusher; it writes nothing."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import numpy as np
import pytest

from sona_shm import Step, Trajectory, monitor, stats
from sona_shm.cli import EXIT_NOT_FOUND, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, main
from sona_shm.errors import SegmentNotFoundError
from sona_shm.monitor import format_table, watch
from sona_shm.stats import EngineStats

from conftest import SMALL
from support import ROOT
from support import run as run_process

H = SMALL["hidden_dim"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_step(reward: float = 1.0) -> Trajectory:
    return Trajectory(np.ones(H, np.float32), [Step(np.arange(H, dtype=np.float32), None, reward)], 0.5)


@pytest.fixture
def busy(engine):
    """An engine with a flusher, one live lane (8 records, 1 not learned, 2 drops) and one lane whose owner left."""
    flusher = engine(lane_slots=8, flush_threshold=3)
    live = engine.attach()
    gone = engine.attach()
    gone.record(one_step())
    gone.close()
    for _ in range(7):
        assert live.record(one_step())
    flusher.scan()
    assert live.record(one_step())
    for _ in range(7):
        live.record(one_step())  # the ring holds 8: seven fit, then...
    assert not live.record(one_step()) and not live.record(one_step())  # ...two are dropped
    flusher.scan()
    assert live.record(one_step())
    return flusher, live


# ----------------------------------------------------------------- table


def test_table_shows_totals_flusher_and_one_row_per_live_lane(busy):
    _, live = busy
    stats = live.stats()
    table = format_table(stats)
    assert stats["trajectories_processed"] == 16 and stats["recorded"] == 17 and stats["lane_dropped"] == 2
    assert re.search(r"trajectories_processed\s+16\b", table)
    assert re.search(r"flushes_performed\s+5\b", table) and re.search(r"updates_applied\s+15\b", table)
    assert re.search(r"recorded\s+17\b", table) and re.search(r"not yet learned\s+1\b", table)
    assert re.search(r"lane drops \(lane full\)\s+2\b", table) and re.search(r"live lanes\s+1 / 4\b", table)
    assert re.search(r"len\s+16 / 64\b", table) and re.search(r"success rate\s+1\.0000", table)
    assert re.search(rf"pid\s+{os.getpid()}\b", table)  # the in-process flusher
    assert re.search(r"pending signals\s+1\b", table) and re.search(r"weights generation\s+5\b", table)
    assert re.search(r"state\s+alive$", table, re.M)
    assert "last flush" in table and "never" not in table.split("last flush")[1].splitlines()[0]
    lane = next(lane for lane in stats["lanes"] if lane["alive"])
    row = re.search(rf"^\s+{lane['lane']}\s+{lane['pid']}\s+16\s+1\s+2\s+1\s+\d+\.\ds ago$", table, re.M)
    assert row, table
    assert "1 more lane(s) free again (their owners exited): 1 records, 0 not yet learned" in table


def test_table_says_clearly_when_no_flusher_runs(capsys, engine, name):
    engine().close()
    code, out, err = run(capsys, "stats", "--name", name)
    assert code == EXIT_NOT_RUNNING
    assert "flusher NOT RUNNING" in out and f"nothing is learned until `sona-shm flusher --name {name}` starts" in out
    assert "(none: no producer is attached)" in out
    assert f"no flusher is running on segment {name!r}" in err


# ----------------------------------------------------------------- JSON


def test_json_has_everything_the_table_shows(capsys, busy, name):
    code, out, _ = run(capsys, "stats", "--name", name, "--json")
    stats = json.loads(out)
    assert code == EXIT_OK
    assert stats["backlog"] == 1 and stats["lanes_live"] == 1 and stats["lane_dropped"] == 2
    rows = sorted((lane["records"], lane["backlog"], lane["drops"], lane["alive"]) for lane in stats["lanes"])
    assert rows == [(1, 0, 0, False), (16, 1, 2, True)]
    assert stats["flusher"]["alive"] and stats["flusher"]["heartbeat_age_s"] >= 0 and stats["last_flush_at"] > 0


def test_json_without_a_flusher_still_prints_and_exits_6(capsys, engine, name):
    engine().close()
    code, out, err = run(capsys, "stats", "--name", name, "--json")
    assert code == EXIT_NOT_RUNNING and json.loads(out)["flusher"]["alive"] is False
    assert "no flusher is running" in err


@pytest.mark.parametrize("form", [[], ["--json"], ["--prometheus"], ["--watch", "0.01", "--count", "2"]])
def test_every_form_on_a_missing_segment_exits_3_and_prints_nothing(capsys, name, form):
    code, out, err = run(capsys, "stats", "--name", name, *form)
    assert code == EXIT_NOT_FOUND and out == ""
    assert f"segment {name!r} does not exist; start `sona-shm flusher --name {name}`" in err


# ----------------------------------------------------------------- watch


def test_watch_plain_draws_count_tables_and_returns_the_last_observation(busy, name):
    out = io.StringIO()
    last = watch(name, 0.01, count=3, out=out, renderer="plain")
    assert isinstance(last, EngineStats) and last.flusher.alive and last.trajectories_processed == 16
    assert last.rates is not None and last.rates.learned_per_s == 0.0  # nothing learned between the frames
    assert out.getvalue().count(f"sona-shm engine {name!r}: flusher alive") == 3
    assert "\x1b[" not in out.getvalue()  # not a terminal: no screen control codes


def test_watch_plain_clears_a_terminal_between_tables(busy, name):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    watch(name, 0.01, count=2, out=out, renderer="plain")
    assert out.getvalue().count("\x1b[H\x1b[2J") == 2


def test_watch_rich_redraws_live(busy, name):
    out = io.StringIO()
    last = watch(name, 0.01, count=2, out=out, renderer="rich")
    text = out.getvalue()
    assert isinstance(last, EngineStats) and last.flusher.alive
    assert text.count(f"sona-shm engine {name!r}: flusher alive") >= 2 and "trajectories_processed" in text
    assert "\x1b[" in text  # cursor movements of a live display


def test_watch_from_the_cli_stops_after_count(capsys, busy, name):
    code, out, _ = run(capsys, "stats", "--name", name, "--watch", "0.01", "--count", "2")
    assert code == EXIT_OK and out.count("trajectories_processed") == 2


def test_watch_ends_cleanly_on_ctrl_c_with_the_last_frame(engine, name, monkeypatch, capsys):
    engine().close()

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(monitor.time, "sleep", interrupted)
    out = io.StringIO()
    last = watch(name, 5, out=out, renderer="plain")
    assert isinstance(last, EngineStats) and not last.flusher.alive
    assert out.getvalue().count("flusher NOT RUNNING") == 1
    code, _, _ = run(capsys, "stats", "--name", name, "--watch", "5")  # the CLI turns that frame into exit 6
    assert code == EXIT_NOT_RUNNING


def test_watch_reports_a_segment_that_goes_away(busy, name, capsys):
    calls = []

    def vanishing(engine_name: str) -> EngineStats:
        calls.append(engine_name)
        if len(calls) > 1:
            raise SegmentNotFoundError(f"segment {engine_name!r} does not exist")
        return stats.read(engine_name)

    out = io.StringIO()
    last = watch(name, 0.01, count=2, out=out, renderer="plain", reader=vanishing)
    assert isinstance(last, SegmentNotFoundError)
    assert "does not exist\n(waiting for it to come back; Ctrl-C to stop)" in out.getvalue()


# ----------------------------------------------------------------- learning, between two reads


def learn(flusher, client, n: int, reward: float = 1.0) -> None:
    for _ in range(n):
        assert client.record(one_step(reward))
    flusher.scan()


def test_two_reads_give_rates_the_adapter_norms_and_how_far_it_moved(engine, name):
    flusher = engine(flush_threshold=2)
    client = engine.attach()
    first = stats.read(name)
    assert first.rates is None and first.adapter.up_norm == 0.0  # up starts at zero
    assert first.adapter.down_norm == pytest.approx(float(np.linalg.norm(first.adapter.down.astype(np.float64))))
    learn(flusher, client, 6)
    second = stats.read(name).since(first)
    rates = second.rates
    assert rates is not None and rates.interval_s == second.observed_at - first.observed_at > 0
    assert rates.learned_per_s == pytest.approx(6 / rates.interval_s) and rates.recorded_per_s == pytest.approx(6 / rates.interval_s)
    assert rates.flushes_per_s == pytest.approx(3 / rates.interval_s)
    up = second.adapter.up.astype(np.float64)
    assert second.adapter.up_norm == pytest.approx(float(np.linalg.norm(up))) and second.adapter.up_norm > 0
    assert rates.up_change_norm == pytest.approx(second.adapter.up_norm)  # moved from zero
    assert rates.down_change_norm == 0.0  # the reference rule never changes down
    third = stats.read(name).since(second)
    assert third.rates.learned_per_s == 0.0 and third.rates.up_change_norm == 0.0


def test_rates_are_not_measured_across_a_recreated_engine(engine, name):
    flusher = engine()
    before = stats.read(name)
    flusher.close()
    from sona_shm.shm import segment

    segment.unlink(name)
    engine()
    after = stats.read(name)
    assert after.created_at != before.created_at and after.since(before).rates is None


def test_the_table_shows_rates_norms_and_movement(engine, name):
    flusher = engine(flush_threshold=2)
    client = engine.attach()
    first = stats.read(name)
    table = format_table(first)
    assert re.search(r"learned\s+-", table) and "rates needs two reads (--watch, --interval)" in table
    assert re.search(r"‖up‖\s+0\b", table) and re.search(r"‖Δup‖ since last read\s+-", table)
    learn(flusher, client, 4)
    second = stats.read(name).since(first)
    table = format_table(second, [0.0, second.rates.learned_per_s])
    assert f"rates over the last {second.rates.interval_s:.1f}s" in table
    learned = re.search(r"learned\s+([\d,.]+)/s", table)
    assert learned and float(learned.group(1).replace(",", "")) == pytest.approx(second.rates.learned_per_s, rel=0.01, abs=0.01)
    assert re.search(rf"‖up‖\s+{second.adapter.up_norm:.6g}", table)
    assert re.search(rf"‖Δup‖ since last read\s+{second.rates.up_change_norm:.6g}", table)
    assert "learned/s, last 2 reads: ▁█" in table


def test_sparkline_scales_to_the_largest_value():
    assert monitor.sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█"
    assert monitor.sparkline([0, 0]) == "▁▁" and monitor.sparkline([]) == ""


def test_watch_keeps_a_history_of_learned_per_second(engine, name):
    flusher = engine(flush_threshold=2)
    client = engine.attach()
    reads = []

    def reader(engine_name: str) -> EngineStats:
        if reads:
            learn(flusher, client, 2 * len(reads))  # more each frame: 2, 4, 6
        reads.append(stats.read(engine_name))
        return reads[-1]

    out = io.StringIO()
    last = watch(name, 0.001, count=4, out=out, renderer="plain", reader=reader)
    assert last.trajectories_processed == 12
    frames = out.getvalue().split("sona-shm engine ")[1:]
    assert "learned/s, last" not in frames[1]  # one rate is not a history yet
    assert "learned/s, last 3 reads: " in frames[3]


def test_buffer_drops_are_explained_right_under_the_buffer(engine, name):
    flusher = engine(capacity=2)
    client = engine.attach()
    learn(flusher, client, 5)
    table = format_table(stats.read(name))
    assert re.search(r"dropped\s+3\b", table)
    assert "(buffer: nobody drains: it keeps the oldest it was given; learning unaffected (dropped = learned but not kept" in table
    assert "buffer full" not in table and stats.read(name).buffer.state == "nobody drains"
    client.drain()
    learn(flusher, client, 3)
    table = format_table(stats.read(name))
    assert "buffer full: drained slower than learned; learning unaffected" in table
    quiet = stats.read(name).as_dict()
    quiet["buffer"]["dropped"] = 0
    assert "buffer full" not in format_table(quiet)  # renderers take the JSON dict too


def test_json_with_an_interval_has_rates(capsys, engine, name):
    engine()
    code, out, _ = run(capsys, "stats", "--name", name, "--json", "--interval", "0.01")
    printed = json.loads(out)
    assert code == EXIT_OK and printed["rates"]["interval_s"] >= 0.01 and printed["rates"]["learned_per_s"] == 0.0
    assert printed["adapter"] == {"up_norm": 0.0, "down_norm": pytest.approx(printed["adapter"]["down_norm"])}
    code, out, _ = run(capsys, "stats", "--name", name, "--json")
    assert json.loads(out)["rates"] is None


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--watch", "0"], "--watch: expected a finite number of seconds > 0, got 0.0"),
        (["--interval", "nan"], "--interval: expected a finite number of seconds > 0, got nan"),
        (["--watch", "1", "--interval", "1"], "--interval: not with --watch"),
        (["--count", "2"], "--count: expected an integer >= 1 together with --watch, got 2"),
        (["--watch", "1", "--count", "0"], "--count: expected an integer >= 1"),
    ],
)
def test_bad_watch_options_exit_2(capsys, name, argv, fragment):
    code, _, err = run(capsys, "stats", "--name", name, *argv)
    assert code == EXIT_USAGE and fragment in err


def test_json_and_prometheus_exclude_each_other(capsys, name):
    with pytest.raises(SystemExit) as exc:
        main(["stats", "--name", name, "--json", "--prometheus"])
    assert exc.value.code == EXIT_USAGE and "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------- read-only, and the script


def test_reading_changes_no_byte_and_takes_no_lock(capsys, engine, name):
    flusher = engine()
    client = engine.attach()
    client.record(one_step())
    flusher.scan()
    flusher.close()  # nothing else writes from here on
    segment = client._segment
    before = bytes(segment.buf)
    for form in ([], ["--json"], ["--prometheus"], ["--watch", "0.01", "--count", "2"]):
        run(capsys, "stats", "--name", name, *form)
    assert bytes(segment.buf) == before
    # The monitor's descriptors are closed: every lock byte is as free or held as before.
    assert segment.held_locks([0, 1, 64, 65, 66, 67]) == [False, False] + [i == client.lane for i in range(4)]


def test_the_script_is_the_same_monitor(engine, name):
    engine().close()  # no flusher: both exit 6 after printing the same text
    outputs = []
    for cmd in ([sys.executable, str(ROOT / "scripts" / "monitor.py")], [sys.executable, "-m", "sona_shm", "stats"]):
        done = run_process([*cmd, "--name", name, "--prometheus"], timeout=60)
        outputs.append((done.returncode, done.stdout, done.stderr))
    assert outputs[0] == outputs[1] and outputs[0][0] == EXIT_NOT_RUNNING and "sona_shm_flusher_up" in outputs[0][1]


def test_no_buffer_is_not_a_failure_in_the_table_json_and_rich(capsys, engine, name):
    """capacity 0 (the routing rule's default): no "success rate 0.0000", but "no buffer"."""
    flusher = engine(capacity=0)
    client = engine.attach()
    learn(flusher, client, 3)
    table = format_table(stats.read(name))
    assert "0.0000" not in table and re.search(r"success rate\s+no buffer", table) and re.search(r"len\s+no buffer", table)
    assert "(buffer: no buffer (capacity 0): nothing is kept for drain; learning unaffected)" in table
    code, out, _ = run(capsys, "stats", "--name", name, "--json")
    buffer = json.loads(out)["buffer"]
    assert code == EXIT_OK and buffer["success_rate"] is None and buffer["state"] == "no buffer" and buffer["dropped"] == 3
    assert "no buffer" in format_table(json.loads(out))  # the dict renders the same


def test_the_implementation_is_shown_in_stats_json_and_the_table(capsys, engine, name):
    from sona_shm.native import IMPLEMENTATION

    engine()
    code, out, _ = run(capsys, "stats", "--name", name, "--json")
    assert code == EXIT_OK and json.loads(out)["implementation"] == IMPLEMENTATION
    assert f"hot paths here: {IMPLEMENTATION}" in format_table(stats.read(name))


def rich_text(observation, width: int) -> str:
    from rich.console import Console

    console = Console(record=True, width=width, file=io.StringIO())
    console.print(monitor.render_rich(observation))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 160])
def test_rich_lays_out_at_80_and_160_columns_without_wrapping_a_label(engine, name, width):
    from sona_shm import RouteTable

    routes = RouteTable.build(np.eye(3, H, dtype=np.float32), ["billing-and-invoices", "tech-support", "sales"])
    flusher = engine(routes=routes, rule="routing", capacity=2)
    client = engine.attach()
    for i in range(6):
        assert client.feedback(np.eye(3, H, dtype=np.float32)[i % 3], best=i % 3)
    flusher.scan()
    first = stats.read(name)
    observation = stats.read(name).since(first)
    text = rich_text(observation, width)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    view = monitor.build_view(observation)
    for section in view.sections:
        for label, value in section.rows:
            assert any(label in line and value in line for line in lines), (label, value, text)  # on one line, whole
    for route in routes.names:
        assert any(line.startswith(route) for line in lines), (route, text)
    assert "nobody drains" in text and "rates over the last" in text and "needs two reads" not in text


def test_rich_draws_no_empty_box_for_no_lanes(engine, name):
    engine()
    text = rich_text(stats.read(name), 100)
    assert "live lanes: none (no producer is attached)" in text and "┏" not in text and "└" not in text


@pytest.mark.parametrize("columns", [80, 160])
def test_the_plain_table_fits_80_and_160_columns(engine, name, columns):
    """Side by side where two sections fit, one by one where they do not: no line is wider than the terminal (but a
    note, which may wrap as prose), so no label is split."""
    from sona_shm import RouteTable

    flusher = engine(routes=RouteTable.build(np.eye(3, H, dtype=np.float32)), rule="routing", capacity=2)
    client = engine.attach()
    for i in range(6):
        assert client.feedback(np.eye(3, H, dtype=np.float32)[i % 3], best=i % 3)
    flusher.scan()
    observation = stats.read(name)
    table = format_table(observation, columns=columns)
    labelled = [line for line in table.splitlines() if not line.lstrip().startswith(("(", "routing", "reference"))]
    assert max(map(len, labelled)) <= columns
    assert ("producers" in table.splitlines()[3]) == (columns == 160)  # side by side only where two fit
    assert max(map(len, format_table(observation).splitlines()[3:6])) > 80  # (what an 80-column terminal wrapped)
