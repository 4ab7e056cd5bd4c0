"""The monitor: table, JSON, Prometheus text, --watch; missing segment and no flusher; it writes nothing."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sona_shm import Step, Trajectory, monitor
from sona_shm.cli import EXIT_NOT_FOUND, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, main
from sona_shm.monitor import format_prometheus, format_table, read_stats, watch

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


# ----------------------------------------------------------------- Prometheus

_SAMPLE = re.compile(r'^(sona_shm_[a-z_]+)\{((?:[a-z_]+="(?:[^"\\\n]|\\["\\n])*",?)*)\} (\S+)$')


def parse_strictly(text: str) -> dict[str, tuple[str, list[tuple[dict[str, str], float]]]]:
    """Our own reading of the 0.0.4 text format: HELP then TYPE before a family's samples, grouped."""
    assert text.endswith("\n") and "\n\n" not in text
    families: dict[str, tuple[str, list]] = {}
    current = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in families, f"{name} described twice"
            assert lines[i + 1].startswith(f"# TYPE {name} "), f"no TYPE after HELP of {name}"
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current and kind in ("counter", "gauge")
            assert name.endswith("_total") == (kind == "counter"), f"{name}: counters and only counters end in _total"
            families[name] = (kind, [])
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            assert match.group(1) == current, f"sample of {match.group(1)} outside its family"
            labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', match.group(2)))
            families[current][1].append((labels, float(match.group(3))))
    return families


def test_prometheus_text_parses_and_matches_the_stats(capsys, busy, name):
    code, text, _ = run(capsys, "stats", "--name", name, "--prometheus")
    assert code == EXIT_OK
    stats = read_stats(name)
    ours = parse_strictly(text)
    theirs = {f.name: f for f in text_string_to_metric_families(text)}  # the reference parser agrees
    assert {f"{n}_total" if f.type == "counter" else n for n, f in theirs.items()} == set(ours)

    def value(metric: str, **labels: str) -> float:
        samples = [v for lab, v in ours[metric][1] if lab == {"engine": name, **labels}]
        assert len(samples) == 1, (metric, ours[metric])
        return samples[0]

    for key in ("trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied"):
        assert value(f"sona_shm_{key}_total") == stats[key]
    assert value("sona_shm_recorded_total") == 17 and value("sona_shm_lane_dropped_total") == 2 and value("sona_shm_backlog") == 1
    assert value("sona_shm_pending_signals") == 1 and value("sona_shm_weights_generation") == 5
    assert value("sona_shm_buffer_len") == 16 and value("sona_shm_buffer_success_rate") == 1.0
    assert value("sona_shm_flusher_up", pid=str(stats["flusher"]["pid"])) == 1
    assert value("sona_shm_lanes") == 4 and value("sona_shm_lanes_live") == 1
    assert value("sona_shm_last_flush_timestamp_seconds") == stats["last_flush_at"]
    lane = next(lane for lane in stats["lanes"] if lane["alive"])
    ids = {"lane": str(lane["lane"]), "pid": str(lane["pid"])}
    assert value("sona_shm_lane_records_total", **ids) == 16 and value("sona_shm_lane_drops_total", **ids) == 2
    assert value("sona_shm_lane_backlog", **ids) == 1
    assert len(ours["sona_shm_lane_records_total"][1]) == 1  # live lanes only


def test_prometheus_without_a_flusher_says_down_and_exits_6(capsys, engine, name):
    engine().close()
    code, text, err = run(capsys, "stats", "--name", name, "--prometheus")
    assert code == EXIT_NOT_RUNNING and "no flusher is running" in err
    up = parse_strictly(text)["sona_shm_flusher_up"][1]
    assert [v for _, v in up] == [0]


def test_prometheus_escapes_help_and_label_values():
    odd = 'a\\b"c\nd'
    text = format_prometheus(_fake_stats(odd))
    assert 'engine="a\\\\b\\"c\\nd"' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["sona_shm_trajectories_processed"].samples[0].labels == {"engine": odd}


def _fake_stats(name: str) -> dict:
    """A stats dict as collect_stats makes it, for an engine name no segment could have."""
    return {
        "name": name,
        "observed_at": 1.0,
        "config": {
            "hidden_dim": 4,
            "rank": 1,
            "lr": 0.1,
            "flush_threshold": 1,
            "capacity": 1,
            "lanes": 1,
            "lane_slots": 1,
            "segment_bytes": 1,
        },
        **dict.fromkeys(("trajectories_processed", "signals_accumulated", "flushes_performed", "updates_applied"), 0),
        "pending_signals": 0,
        "weights_generation": 0,
        "last_flush_at": None,
        "recorded": 0,
        "lane_dropped": 0,
        "backlog": 0,
        "lanes_live": 0,
        "buffer": {"len": 0, "dropped": 0, "success_rate": 1.0, "capacity": 1, "drained": 0},
        "flusher": {"pid": 0, "alive": False, "heartbeat_at": None, "heartbeat_age_s": None, "started_at": None, "idle": False, "scans": 0},
        "lanes": [],
    }


# ----------------------------------------------------------------- watch


def test_watch_plain_draws_count_tables(busy, name):
    out = io.StringIO()
    assert watch(name, 0.01, count=3, out=out, renderer="plain") == EXIT_OK
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
    assert watch(name, 0.01, count=2, out=out, renderer="rich") == EXIT_OK
    text = out.getvalue()
    assert text.count(f"sona-shm engine {name!r}: flusher alive") >= 2 and "trajectories_processed" in text
    assert "\x1b[" in text  # cursor movements of a live display


def test_watch_from_the_cli_stops_after_count(capsys, busy, name):
    code, out, _ = run(capsys, "stats", "--name", name, "--watch", "0.01", "--count", "2")
    assert code == EXIT_OK and out.count("trajectories_processed") == 2


def test_watch_ends_cleanly_on_ctrl_c_with_the_last_frames_status(engine, name, monkeypatch):
    engine().close()

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(monitor.time, "sleep", interrupted)
    out = io.StringIO()
    assert watch(name, 5, out=out, renderer="plain") == EXIT_NOT_RUNNING
    assert out.getvalue().count("flusher NOT RUNNING") == 1


def test_watch_reports_a_segment_that_goes_away(busy, name, monkeypatch):
    real = monitor.read_stats
    calls = []

    def vanishing(engine_name: str) -> dict:
        calls.append(engine_name)
        if len(calls) > 1:
            from sona_shm.errors import SegmentNotFoundError

            raise SegmentNotFoundError(f"segment {engine_name!r} does not exist")
        return real(engine_name)

    monkeypatch.setattr(monitor, "read_stats", vanishing)
    out = io.StringIO()
    assert watch(name, 0.01, count=2, out=out, renderer="plain") == EXIT_NOT_FOUND
    assert "does not exist\n(waiting for it to come back; Ctrl-C to stop)" in out.getvalue()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--watch", "0"], "--watch: expected seconds > 0, got 0.0"),
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
